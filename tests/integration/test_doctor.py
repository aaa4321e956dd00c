"""The doctor on databases broken on purpose, one way each (the runbook's §8).

Each test brings a scratch database to a revision with Alembic's own API, breaks it the way
§8 describes, and checks the finding; every diagnosis must leave the database unchanged.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from jobs.config import Target, normalize_url
from jobs.insight import doctor
from jobs.ledger import runs, schema
from jobs.pg import db
from jobs.project.runtime import Project
from jobs.run import verify
from tests.integration.conftest import Databases, db_url, schema_dump
from tests.integration.test_bad_input import upgrade
from tests.projects import Rev, write_project

pytestmark = pytest.mark.integration

ACCOUNTS = Rev(
    "a1",
    """
    op.create_table('accounts', sa.Column('id', sa.Integer, primary_key=True),
                    sa.Column('email', sa.Text, nullable=True))
    """,
    "op.drop_table('accounts')",
)
PUSH = Rev(
    "a2",
    """
    op.create_table('push_subscriptions', sa.Column('id', sa.Integer, primary_key=True),
                    sa.Column('endpoint', sa.Text))
    op.create_index('ix_push_endpoint', 'push_subscriptions', ['endpoint'])
    """,
    "op.drop_table('push_subscriptions')",
)
EMAIL_NOT_NULL = Rev(
    "a3",
    "op.alter_column('accounts', 'email', existing_type=sa.Text, nullable=False)",
    "op.alter_column('accounts', 'email', existing_type=sa.Text, nullable=True)",
)
REVS = [ACCOUNTS, PUSH, EMAIL_NOT_NULL]


def make(
    tmp_path: Path, databases: Databases, revs: list[Rev], at: str | None
) -> tuple[Target, str]:
    """A project of ``revs`` and a database brought to revision ``at``."""
    dbname = databases.create()
    ini = write_project(tmp_path / "project", revs)
    if at:
        upgrade(ini, dbname, at)
    target = Target(
        name="t", url=normalize_url(db_url(dbname)), alembic_ini=ini, backup_dir=tmp_path / "b"
    )
    return target, dbname


def sql(dbname: str, statement: str) -> str:
    return subprocess.run(
        ["psql", "-At", "-v", "ON_ERROR_STOP=1", "-d", db_url(dbname), "-c", statement],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def snapshot(dbname: str) -> str:
    dump = schema_dump(dbname, with_ledger=True)
    if "alembic_version" not in dump:
        return dump
    return dump + sql(dbname, "SELECT string_agg(version_num, ',' ORDER BY 1) FROM alembic_version")


def diagnose(target: Target, dbname: str) -> list[dict[str, str]]:
    """The doctor's findings, checking it changed nothing and left no transaction open."""
    before = snapshot(dbname)
    with db.connect(target) as conn:
        findings = doctor.diagnose(target, conn)
        assert not conn.in_transaction()
    assert snapshot(dbname) == before
    for f in findings:
        assert set(f) == {"code", "message", "fix"}
        assert all("\n" not in v and v for v in f.values()), f
    return findings


def codes(findings: list[dict[str, str]]) -> list[str]:
    return [f["code"] for f in findings]


def by_code(findings: list[dict[str, str]], code: str) -> dict[str, str]:
    return next(f for f in findings if f["code"] == code)


def test_a_healthy_database_has_no_findings(tmp_path: Path, databases: Databases) -> None:
    target, dbname = make(tmp_path, databases, REVS, "head")
    sql(dbname, "INSERT INTO accounts (email) VALUES ('a@example.com')")
    assert diagnose(target, dbname) == []


def test_a_database_behind_head(tmp_path: Path, databases: Databases) -> None:
    target, dbname = make(tmp_path, databases, REVS, "a1")
    found = diagnose(target, dbname)
    assert codes(found) == ["behind"]
    assert found[0]["message"] == (
        "the database is at a1, 2 revisions behind head a3: a2, a3 "
        "(§8 error 4: Target database is not up to date)"
    )
    assert found[0]["fix"] == "`runbook apply --target t`"


def test_a_database_never_migrated_is_behind_from_no_revision(
    tmp_path: Path, databases: Databases
) -> None:
    target, dbname = make(tmp_path, databases, REVS, None)
    found = diagnose(target, dbname)
    assert codes(found) == ["behind"]
    assert "at no revision (never migrated), 3 revisions behind head a3" in found[0]["message"]


@pytest.mark.parametrize(
    ("stored", "nearest", "why"),
    [("a2x", "a2", "its id starts with it"), ("zzzz", None, None)],
    ids=["typo", "no clue"],
)
def test_an_unknown_revision_in_alembic_version(
    stored: str, nearest: str | None, why: str | None, tmp_path: Path, databases: Databases
) -> None:
    target, dbname = make(tmp_path, databases, REVS, "a2")
    sql(dbname, f"UPDATE alembic_version SET version_num = '{stored}'")
    found = diagnose(target, dbname)
    assert codes(found) == ["unknown_revision"]
    message, fix = found[0]["message"], found[0]["fix"]
    assert message.startswith(f"alembic_version holds revision '{stored}', which the scripts")
    assert "§8 error 1" in message
    if nearest:
        assert message.endswith(f"; nearest known revision: {nearest} ({why})")
        assert (
            fix
            == f"check that the schema is at {nearest}, then `runbook stamp --target t {nearest}`"
        )
    else:
        assert fix.endswith("then `runbook stamp --target t <rev>`")


def _record_upgrades(target: Target, dbname: str, revisions: list[str]) -> str:
    """A ledger whose one run applied ``revisions``; the run's id."""
    project = Project(target)
    with db.connect(target) as conn:
        schema.ensure(conn)
        run_id = runs.admit(
            conn, target="t", kind="apply", from_revision=None, to_revision=None, options={}
        )
        run = runs.get_run(conn, run_id)
        for rev in revisions:
            step = runs.start_step(conn, run, "upgrade", rev)
            known = rev in {r.id for r in REVS}
            sha = project.revision(rev).sha256 if known else "0" * 64
            runs.finish_step(conn, step, "succeeded", file_sha256=sha)
    return run_id


def test_an_unknown_revision_gets_its_nearest_known_one_from_the_ledger(
    tmp_path: Path, databases: Databases
) -> None:
    target, dbname = make(tmp_path, databases, REVS, "a2")
    _record_upgrades(target, dbname, ["a1", "a2"])
    sql(dbname, "UPDATE alembic_version SET version_num = 'f00dface'")
    found = diagnose(target, dbname)
    assert codes(found) == ["unknown_revision"]
    assert found[0]["message"].endswith(
        "; nearest known revision: a2 (where the ledger last recorded the database)"
    )
    assert found[0]["fix"] == "check that the schema is at a2, then `runbook stamp --target t a2`"


def test_a_schema_matching_a_recorded_fingerprint_names_its_revision(
    tmp_path: Path, databases: Databases
) -> None:
    target, dbname = make(tmp_path, databases, REVS, "a1")
    run_id = _record_upgrades(target, dbname, ["a1", "a2"])  # the ledger alone would say a2
    with db.connect(target) as conn:
        run = runs.get_run(conn, run_id)
        for rev, fp in [("a1", verify.fingerprint(conn)), ("a2", "f" * 64)]:
            step = runs.start_step(conn, run, "verify", rev)
            runs.finish_step(conn, step, "succeeded", fingerprint=fp)
    sql(dbname, "UPDATE alembic_version SET version_num = 'f00dface'")
    found = diagnose(target, dbname)
    assert found[0]["message"].endswith(
        "; nearest known revision: a1 (the schema matches the fingerprint runbook recorded there)"
    )


def test_a_revision_runbook_applied_whose_file_is_gone_means_the_code_is_behind(
    tmp_path: Path, databases: Databases
) -> None:
    target, dbname = make(tmp_path, databases, REVS, "a2")
    run_id = _record_upgrades(target, dbname, ["a1", "a2", "b9"])
    sql(dbname, "UPDATE alembic_version SET version_num = 'b9'")
    found = diagnose(target, dbname)
    assert codes(found) == ["unknown_revision"]
    assert (
        f"runbook applied it in run {run_id}: the database is ahead of this code"
        in (found[0]["message"])
    )
    assert "nearest known revision: a2" in found[0]["message"]
    assert found[0]["fix"].startswith("deploy the code that has revision b9")


def test_several_heads_are_reported_and_the_rest_still_checked(
    tmp_path: Path, databases: Databases
) -> None:
    revs = [*REVS, Rev("b1", "op.execute('CREATE TABLE b1 (id int)')", down="a2")]
    target, dbname = make(tmp_path, databases, revs[:2], "a2")
    write_project(tmp_path / "project", revs)
    sql(dbname, "UPDATE alembic_version SET version_num = 'nope'")
    found = diagnose(target, dbname)
    assert codes(found) == ["several_heads", "unknown_revision"]
    assert found[0]["message"].startswith("the scripts have 2 heads (a3, b1)")
    assert found[0]["fix"].startswith('`alembic merge heads -m "merge heads"`')


def test_several_rows_in_alembic_version(tmp_path: Path, databases: Databases) -> None:
    target, dbname = make(tmp_path, databases, REVS, "a2")
    sql(dbname, "INSERT INTO alembic_version VALUES ('a1')")
    found = diagnose(target, dbname)
    assert codes(found) == ["several_versions"]
    assert found[0]["message"].startswith("alembic_version holds 2 rows (a1, a2)")
    assert found[0]["fix"] == "`runbook stamp --target t a2` (the other rows are its ancestors)"


@pytest.mark.parametrize("with_index", [True, False], ids=["all of it", "part of it"])
def test_a_pending_revision_creating_what_already_exists(
    with_index: bool, tmp_path: Path, databases: Databases
) -> None:
    target, dbname = make(tmp_path, databases, REVS, "a1")
    sql(dbname, "CREATE TABLE push_subscriptions (id serial PRIMARY KEY, endpoint text)")
    if with_index:
        sql(dbname, "CREATE INDEX ix_push_endpoint ON push_subscriptions (endpoint)")
    found = diagnose(target, dbname)
    assert codes(found) == ["behind", "already_exists"]
    exists = found[1]
    names = "table push_subscriptions" + (", index ix_push_endpoint" if with_index else "")
    assert exists["message"] == (
        f"pending revision a2 creates {names}, which already "
        f"{'exist' if with_index else 'exists'} (§8 error 2: relation already exists)"
    )
    if with_index:
        assert exists["fix"] == (
            "the schema already has all a2 creates: check it matches, then "
            "`runbook stamp --target t a2`"
        )
    else:
        assert exists["fix"].startswith("a2 would fail half-way: drop table push_subscriptions")


def test_a_pending_column_that_already_exists_further_up(
    tmp_path: Path, databases: Databases
) -> None:
    revs = [*REVS, Rev("a4", "op.add_column('accounts', sa.Column('plan', sa.Text))")]
    target, dbname = make(tmp_path, databases, revs, "a2")
    sql(dbname, "ALTER TABLE accounts ADD COLUMN plan text")
    found = diagnose(target, dbname)
    assert codes(found) == ["behind", "already_exists"]
    assert found[1]["message"].startswith("pending revision a4 creates column accounts.plan")
    assert found[1]["fix"] == (
        "the schema already has all a4 creates: `runbook apply --target t --to a3`, check it "
        "matches, then `runbook stamp --target t a4`"
    )


def test_a_pending_not_null_on_a_column_holding_nulls(tmp_path: Path, databases: Databases) -> None:
    target, dbname = make(tmp_path, databases, REVS, "a2")
    sql(dbname, "INSERT INTO accounts (email) VALUES (NULL), (NULL), (NULL), ('a@example.com')")
    found = diagnose(target, dbname)
    assert codes(found) == ["behind", "not_null_violation"]
    assert found[1]["message"] == (
        "pending revision a3 sets accounts.email NOT NULL, but 3 rows hold NULL there "
        "(§8 error 3: NotNullViolation)"
    )
    assert found[1]["fix"].startswith(
        "backfill first: `UPDATE accounts SET email = <value> WHERE email IS NULL`"
    )


def test_a_backfill_before_the_not_null_is_no_finding(tmp_path: Path, databases: Databases) -> None:
    backfilled = Rev(
        "a3",
        """
        op.execute("UPDATE accounts SET email = 'unknown' WHERE email IS NULL")
        op.alter_column('accounts', 'email', existing_type=sa.Text, nullable=False)
        """,
    )
    target, dbname = make(tmp_path, databases, [ACCOUNTS, PUSH, backfilled], "a2")
    sql(dbname, "INSERT INTO accounts (email) VALUES (NULL)")
    assert codes(diagnose(target, dbname)) == ["behind"]


def test_a_pending_not_null_column_without_default_on_a_table_with_rows(
    tmp_path: Path, databases: Databases
) -> None:
    revs = [
        ACCOUNTS,
        Rev("a2", "op.add_column('accounts', sa.Column('plan', sa.Text, nullable=False))"),
        Rev(
            "a3",
            "op.add_column('accounts', sa.Column('tier', sa.Text, nullable=False, server_default='free'))",
        ),
    ]
    target, dbname = make(tmp_path, databases, revs, "a1")
    assert codes(diagnose(target, dbname)) == ["behind"]  # no rows: nothing to violate
    sql(dbname, "INSERT INTO accounts (email) VALUES ('a@example.com')")
    found = diagnose(target, dbname)
    assert codes(found) == ["behind", "not_null_violation"]
    assert found[1]["message"] == (
        "pending revision a2 adds accounts.plan NOT NULL without a default, but accounts has "
        "rows (§8 error 3: NotNullViolation)"
    )


def test_a_revision_that_cannot_be_rendered_offline(tmp_path: Path, databases: Databases) -> None:
    reads = Rev(
        "a2",
        """
        rows = op.get_bind().execute(sa.text('SELECT id FROM accounts')).fetchall()
        op.execute('CREATE TABLE copies (id int)')
        """,
    )
    target, dbname = make(tmp_path, databases, [ACCOUNTS, reads], "a1")
    found = diagnose(target, dbname)
    assert codes(found) == ["behind", "unrenderable"]
    assert found[1]["message"].startswith("cannot render the upgrade of a2 offline (")
    assert found[1]["message"].endswith("; its SQL was not checked")


def test_an_unusable_project_is_a_finding_not_a_crash(tmp_path: Path, databases: Databases) -> None:
    target, dbname = make(tmp_path, databases, REVS, "a1")
    (tmp_path / "project" / "migrations" / "versions" / "a2.py").write_text("this is not python")
    found = diagnose(target, dbname)
    assert codes(found) == ["project"]
    assert "a revision file cannot be loaded" in found[0]["message"]
