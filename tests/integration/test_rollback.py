"""Rollback that never loses data: restore when downgrades cannot undo, operator rollback,
per-table restore, verified backups (real Postgres, Redis and worker)."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from jobs import api
from tests.integration.conftest import (
    Config,
    Databases,
    Worker,
    db_url,
    project_target,
    query,
    reference_copy,
    runbook_cli,
    schema_dump,
    seeded_reference_db,
)
from tests.projects import Rev

pytestmark = pytest.mark.integration

FAILING = '''"""fails after the whole reference history"""
from alembic import op

revision = "f1f1f1f1f1f1"
down_revision = "e3f4g5h6i7j8"


def upgrade():
    op.execute("CREATE TABLE half_done (id int)")
    op.execute("SELECT 1/0")


def downgrade():
    op.execute("DROP TABLE half_done")
'''


def data_dump(dbname: str) -> str:
    out = subprocess.run(
        ["pg_dump", "--data-only", "--exclude-schema=runbook", "--inserts", "-d", db_url(dbname)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "\n".join(sorted(line for line in out.splitlines() if line.startswith("INSERT")))


def test_enum_revision_then_failure_is_restored_to_identical_schema_and_data(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    ini = reference_copy(tmp_path, FAILING)
    dbname = seeded_reference_db(databases, ini)
    schema_before, data_before = schema_dump(dbname), data_dump(dbname)
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), alembic_ini=str(ini), backup_dir=str(tmp_path / "b"))

    result = runbook_cli("apply", "--target", name, "--wait", "--json")
    assert result.returncode == 1
    run = json.loads(result.stdout)
    assert run["state"] == "restored", run["error"]
    # The plan knew before the run which revisions a downgrade cannot undo.
    assert "x6y7z8a9b0c1" in run["irreversible"]
    assert "division by zero" in run["error"] and "restored from backup" in run["error"]
    kinds = [(s["kind"], s["revision"], s["state"]) for s in run["steps"]]
    assert ("downgrade", "x6y7z8a9b0c1", "failed") in kinds
    restore = next(s for s in run["steps"] if s["kind"] == "restore")
    assert restore["state"] == "succeeded"
    assert restore["detail"]["checked"]["revision"] == "w5x6y7z8a9b0"
    assert run["current_revision"] == "w5x6y7z8a9b0"
    assert schema_dump(dbname) == schema_before
    assert data_dump(dbname) == data_before
    # The ledger survived the restore: this very run is still recorded, steps and all.
    assert query(dbname, f"SELECT count(*) FROM runbook.steps WHERE run_id = '{run['id']}'")[0][
        0
    ] == len(run["steps"])
    verification = run["backup"]["verification"]
    assert verification["restore"]["scratch_restore"] == "ok"


def test_downgrade_that_does_nothing_is_caught_by_the_fingerprint_and_restored(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    revisions = [
        Rev(
            "p1",
            "op.execute('CREATE TABLE kept (id int PRIMARY KEY, v text)')",
            "op.execute('DROP TABLE kept')",
        ),
        Rev("p2", "op.add_column('kept', sa.Column('extra', sa.Text()))", "pass"),
        Rev("p3", "op.execute('SELECT 1/0')"),
    ]
    name, dbname = project_target(
        config,
        databases,
        tmp_path,
        revisions,
        backup_dir=str(tmp_path / "b"),
    )
    first = api.enqueue(name, "p1")
    assert first and api.wait(first, name, timeout_s=60)["state"] == "succeeded"
    query(dbname, "INSERT INTO kept SELECT g, 'v' || g FROM generate_series(1, 25) g")
    before = schema_dump(dbname)

    run_id = api.enqueue(name)
    assert run_id
    run = api.wait(run_id, name, timeout_s=90)
    assert run["state"] == "restored", run["error"]
    assert run["irreversible"]["p2"] == "its downgrade did not restore the schema"
    down = next(s for s in run["steps"] if s["kind"] == "downgrade")
    assert down["state"] == "failed" and "did not bring the schema back" in down["error"]
    assert schema_dump(dbname) == before
    assert query(dbname, "SELECT count(*) FROM kept") == [(25,)]


def test_operator_rollback_refuses_data_loss_then_keeps_it_in_a_verified_backup(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    ini = reference_copy(tmp_path)
    dbname = seeded_reference_db(databases, ini)
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), alembic_ini=str(ini), backup_dir=str(tmp_path / "b"))
    applied = api.enqueue(name)
    assert applied and api.wait(applied, name, timeout_s=90)["state"] == "succeeded"
    query(
        dbname,
        "INSERT INTO push_subscriptions (staff_id, endpoint, p256dh_key, auth_key) "
        "SELECT id, 'https://push.example/' || email, 'k', 'a' FROM staffs",
    )

    refused = runbook_cli("rollback", "--target", name, "--to", "y7z8a9b0c1d2")
    assert refused.returncode == 2
    assert "drops table push_subscriptions holding 4 rows" in refused.stderr
    assert refused.stderr.count("\n") == 1
    ahead = runbook_cli("rollback", "--target", name, "--to", "head")
    assert ahead.returncode == 0 and "nothing to do" in ahead.stderr

    result = runbook_cli(
        "rollback",
        "--target",
        name,
        "--to",
        "y7z8a9b0c1d2",
        "--accept-data-loss",
        "--wait",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "succeeded", run["error"]
    assert [s["revision"] for s in run["steps"] if s["kind"] == "downgrade"] == [
        "e3f4g5h6i7j8",
        "d2e3f4g5h6i7",
        "c1d2e3f4g5h6",
        "b0c1d2e3f4g5",
        "a9b0c1d2e3f4",
        "z8a9b0c1d2e3",
    ]
    assert run["steps"][0]["kind"] == "backup"
    assert query(dbname, "SELECT to_regclass('push_subscriptions')") == [(None,)]
    ahead = runbook_cli("rollback", "--target", name, "--to", "head")
    assert (
        ahead.returncode == 2 and "is not behind the current revision y7z8a9b0c1d2" in ahead.stderr
    )
    backup = Path(run["backup"]["path"])
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert isinstance(run["backup"]["verification"]["restore"], dict)

    # The rows are in that backup: bring the one table back, leave the others as they are.
    query(dbname, "INSERT INTO staffs (name, email) VALUES ('New Hire', 'new@example.com')")
    staffs_before = query(dbname, "SELECT count(*) FROM staffs")
    result = runbook_cli(
        "restore",
        "--target",
        name,
        "--backup",
        run["backup"]["id"],
        "--table",
        "push_subscriptions",
        "--wait",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "succeeded"
    assert query(dbname, "SELECT count(*) FROM push_subscriptions") == [(4,)]
    assert query(dbname, "SELECT count(*) FROM staffs") == staffs_before
    assert query(
        dbname, "SELECT indexname FROM pg_indexes WHERE tablename = 'push_subscriptions' ORDER BY 1"
    ) == [
        ("idx_push_subscriptions_staff_id",),
        ("push_subscriptions_endpoint_key",),
        ("push_subscriptions_pkey",),
    ]

    listed = json.loads(runbook_cli("backups", "--target", name, "--json").stdout)
    assert run["backup"]["id"] in [b["id"] for b in listed]
    assert {"id", "run", "taken_at", "size", "sha256", "verified"} <= set(listed[0])

    # The whole database back to that backup, taken at head: the record says the database is
    # at head now, as its version table does, in the summary and in status.
    whole = runbook_cli("restore", "--target", name, "--backup", run["backup"]["id"], "--wait")
    assert whole.returncode == 0, whole.stderr
    (version,) = query(dbname, "SELECT version_num FROM alembic_version")[0]
    assert version == "e3f4g5h6i7j8"
    assert f"y7z8a9b0c1d2 -> e3f4g5h6i7j8 (now at {version})" in whole.stderr, whole.stderr
    restored_id = whole.stdout.strip()
    shown = json.loads(runbook_cli("status", restored_id, "--json").stdout)
    assert shown["current_revision"] == version


def test_restore_refuses_unknown_missing_corrupt_and_foreign_tables(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    revisions = [
        Rev(
            "c1",
            "op.execute('CREATE TABLE stuff (id int PRIMARY KEY)')",
            "op.execute('DROP TABLE stuff')",
        )
    ]
    name, dbname = project_target(
        config,
        databases,
        tmp_path,
        revisions,
        backup_dir=str(tmp_path / "b"),
    )
    run_id = api.enqueue(name)
    assert run_id
    run = api.wait(run_id, name, timeout_s=60)
    backup_id, path = run["backup"]["id"], Path(run["backup"]["path"])
    before = schema_dump(dbname, with_ledger=True)

    def refused(*args: str) -> str:
        result = runbook_cli("restore", "--target", name, *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        return result.stderr

    assert "unknown backup 'nope'" in refused("--backup", "nope")
    assert "holds no table ghost" in refused("--backup", backup_id, "--table", "ghost")
    with path.open("ab") as fh:
        fh.write(b"tampered")
    assert "does not match its recorded sha256" in refused("--backup", backup_id)
    path.unlink()
    assert "is missing and no copy could be fetched" in refused("--backup", backup_id)
    assert schema_dump(dbname, with_ledger=True) == before


def test_hooks_run_around_the_run_and_after_run_whatever_the_outcome(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    log = tmp_path / "hooks.log"
    revisions = [
        Rev("h1", "op.execute('CREATE TABLE h (id int)')", "op.execute('DROP TABLE h')"),
        Rev("h2", "op.execute('SELECT 1/0')"),
    ]
    name, dbname = project_target(
        config,
        databases,
        tmp_path,
        revisions,
        backup=False,
        before_run=f'echo "before $RUNBOOK_RUN_ID $RUNBOOK_STATE" >> {log}',
        after_run=f'echo "after $RUNBOOK_RUN_ID $RUNBOOK_STATE" >> {log}',
    )
    run_id = api.enqueue(name)
    assert run_id
    run = api.wait(run_id, name, timeout_s=60)
    assert run["state"] == "rolled_back"
    assert log.read_text().splitlines() == [
        f"before {run_id} running",
        f"after {run_id} rolled_back",
    ]
    hooks = [(s["kind"], s["revision"], s["state"]) for s in run["steps"] if s["kind"] == "hook"]
    assert hooks == [("hook", "before_run", "succeeded"), ("hook", "after_run", "succeeded")]


def test_backup_runs_copy_retention_and_restore_from_the_copy(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    revisions = [
        Rev(
            "k1",
            "op.execute('CREATE TABLE notes (id int PRIMARY KEY, body text)')",
            "op.execute('DROP TABLE notes')",
        )
    ]
    name, dbname = project_target(
        config,
        databases,
        tmp_path,
        revisions,
        backup_dir=str(tmp_path / "local"),
        backup_copy_to=str(tmp_path / "elsewhere"),
        keep_backups=2,
    )
    first = api.enqueue(name)
    assert first and api.wait(first, name, timeout_s=60)["state"] == "succeeded"
    query(dbname, "INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 30) g")

    ids = []
    for _ in range(2):
        result = runbook_cli("backup", "--target", name, "--wait", "--json")
        assert result.returncode == 0, result.stderr
        run = json.loads(result.stdout)
        assert run["kind"] == "backup" and run["state"] == "succeeded"
        (copy,) = run["backup"]["copies"]
        assert copy["sha256"] == run["backup"]["sha256"]
        assert Path(copy["location"]).parent == tmp_path / "elsewhere"
        ids.append(run["backup"]["id"])
    listed = api.list_backups(name)
    assert [b["id"] for b in listed] == list(reversed(ids))  # the apply's backup was removed
    assert len(list((tmp_path / "local").glob("*.dump"))) == 2
    assert len(list((tmp_path / "elsewhere").iterdir())) == 2

    # The local file is lost; the copy brings it back for a restore.
    query(dbname, "DELETE FROM notes WHERE id > 10")
    Path(listed[0]["path"]).unlink()
    result = runbook_cli("restore", "--target", name, "--backup", ids[-1], "--wait", "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "succeeded", run["error"]
    assert query(dbname, "SELECT count(*) FROM notes") == [(30,)]
    assert Path(listed[0]["path"]).exists()
