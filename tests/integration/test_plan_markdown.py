"""`runbook plan --format markdown` on the reference history, through the installed CLI, read
as a reviewer reads the pull-request comment."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, Config, Databases, db_url, runbook_cli
from tests.integration.replication_support import STANDBY_NAME, ReplicatedPostgres

pytestmark = pytest.mark.integration

PASSWORD = "pr-comment-secret"  # the shared server trusts local logins and ignores it
IRREVERSIBLE = {
    "x6y7z8a9b0c1": "PostgreSQL cannot remove an ENUM value; restore from backup",
    "d2e3f4g5h6i7": "its downgrade() does nothing",
}


def at_base(config: Config, databases: Databases, **options: object) -> str:
    """A target on a fresh, empty database for the reference history (repo root)."""
    dbname = databases.create()
    return config.add(
        f"md_{dbname}",
        url=db_url(dbname, password=PASSWORD),
        alembic_ini=str(REPO / "alembic.ini"),
        backup_dir=str(Path("/tmp") / dbname),
        **options,
    )


def section(markdown: str, title: str) -> str:
    """The text under ``#### title`` up to the next heading."""
    found = re.search(rf"^#### {re.escape(title)}\n(.*?)(?=^#### |\Z)", markdown, re.M | re.S)
    assert found, f"no {title!r} section in:\n{markdown}"
    return found.group(1)


def test_the_markdown_plan_says_what_a_reviewer_needs(config: Config, databases: Databases) -> None:
    # statement_timeout as README's target example sets it: runbook then sets it on every
    # session of the run, so squawk's require-statement-timeout is moot and not shown.
    name = at_base(config, databases, statement_timeout="15min")
    done = runbook_cli("plan", "--target", name, "--format", "markdown")
    assert done.returncode == 0, done.stderr
    md = done.stdout
    as_json = json.loads(runbook_cli("plan", "--target", name, "--json").stdout)
    pending = [r["id"] for r in as_json["revisions"] if r["status"] == "pending"]
    assert len(pending) == 9 and as_json["current"] is None

    head = md.splitlines()[0]
    assert head == f"### runbook plan for `{name}`: `base` → `e3f4g5h6i7j8`"
    assert "**9 pending revisions** · 2 irreversible · lint: 0 errors" in md

    table = md.split("#### SQL")[0]
    rows = {
        line.split(" | ")[0][3:-1]: line for line in table.splitlines() if line.startswith("| `")
    }
    assert [rev for rev in rows if rev in pending] == pending  # every one, in order
    for rev, why in IRREVERSIBLE.items():
        assert f"| **no**: {why} |" in rows[rev]
    reversible = [rev for rev in pending if rev not in IRREVERSIBLE]
    assert all(" | yes | " in rows[rev] for rev in reversible)
    assert "calendar_events (new)" in rows["x6y7z8a9b0c1"]

    sql = section(md, "SQL")
    blocks = re.findall(
        r"<summary><code>(\w+)</code>.*?</summary>\n\n```sql\n(.*?)\n```\n", sql, re.S
    )
    assert [rev for rev, _ in blocks] == pending
    enum_sql = dict(blocks)["x6y7z8a9b0c1"]
    assert (
        "ALTER TYPE calendar_event_type ADD VALUE IF NOT EXISTS 'next_plan_start_date'" in enum_sql
    )
    assert sql.count("<details>") == sql.count("</details>") == 9

    findings = section(md, "Lint findings")
    assert (
        "| `x6y7z8a9b0c1` | ban-add-enum-value | warning | ALTER TYPE calendar_event_type"
        in findings
    )
    assert "require-statement-timeout" not in md
    assert "require-lock-timeout" not in md
    # Markdown and JSON come from the same plan: the same findings, one row each.
    in_json = [(r["id"], f["rule"]) for r in as_json["revisions"] for f in r["lint"]]
    in_md = re.findall(r"^\| `(\w+)` \| ([\w-]+) \|", findings, re.M)
    assert in_md == in_json and in_json

    assert "- `d2e3f4g5h6i7`: large_table SET new_column = 'default_value'" in md
    assert "- no standbys or replication slots" in section(md, "Standbys and replication slots")
    assert PASSWORD not in md and "postgresql://" not in md


def test_without_statement_timeout_the_finding_names_runbooks_fix(
    config: Config, databases: Databases
) -> None:
    name = at_base(config, databases)
    done = runbook_cli("plan", "--target", name, "--format", "markdown", "--to", "x6y7z8a9b0c1")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "require-statement-timeout" in line]
    assert len(rows) == 2  # the initial schema's CREATE TABLE and the ENUM's ALTER TYPE
    assert all(
        f'set statement_timeout (e.g. "15min") on target {name} in runbook.toml' in r for r in rows
    )
    assert PASSWORD not in done.stdout + done.stderr


def test_formats_that_disagree_or_do_not_exist_are_one_line_exit_2(
    config: Config, databases: Databases
) -> None:
    name = at_base(config, databases)
    both = runbook_cli("plan", "--target", name, "--json", "--format", "markdown")
    assert both.returncode == 2 and both.stdout == ""
    assert both.stderr.count("\n") == 1 and "--json and --format markdown disagree" in both.stderr
    unknown = runbook_cli("plan", "--target", name, "--format", "yaml")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1 and "'yaml' is not one of" in unknown.stderr
    agree = runbook_cli(
        "plan", "--target", name, "--json", "--format", "json", "--to", "w5x6y7z8a9b0"
    )
    assert agree.returncode == 0 and json.loads(agree.stdout)["to"] == "w5x6y7z8a9b0"
    text = runbook_cli("plan", "--target", name, "--format", "text", "--to", "w5x6y7z8a9b0")
    assert text.returncode == 0 and text.stdout.startswith(f"target {name}: base -> w5x6y7z8a9b0")


@pytest.fixture(scope="module")
def pair(services: None) -> Iterator[ReplicatedPostgres]:
    pg = ReplicatedPostgres()
    yield pg
    pg.stop()


def test_the_standbys_and_slots_are_in_the_comment_with_what_preflight_would_refuse(
    pair: ReplicatedPostgres, config: Config, tmp_path: Path
) -> None:
    dbname = f"md_{uuid.uuid4().hex[:8]}"
    pair.primary.sql(f"CREATE DATABASE {dbname}")
    pair.primary.sql("SELECT pg_create_logical_replication_slot('cdc_md', 'test_decoding')")
    try:
        pair.primary.sql(
            "CREATE TABLE filler_md AS SELECT g, repeat('x', 500) AS pad "
            "FROM generate_series(1, 20000) g"
        )
        url = pair.primary.url(dbname).replace("postgres@", f"postgres:{PASSWORD}@", 1)
        assert PASSWORD in url
        name = config.add(
            f"md_repl_{dbname}",
            url=url,
            alembic_ini=str(REPO / "alembic.ini"),
            backup_dir=str(tmp_path / "b"),
            max_retained_wal="1MB",
        )
        done = runbook_cli("plan", "--target", name, "--format", "markdown", "--to", "w5x6y7z8a9b0")
    finally:
        pair.primary.sql("SELECT pg_drop_replication_slot('cdc_md')")
    assert done.returncode == 0, done.stderr
    facts = section(done.stdout, "Standbys and replication slots")
    assert f"- standby {STANDBY_NAME}: streaming, lag " in facts
    assert "- slot cdc_md (logical, inactive): retains " in facts
    assert re.search(
        r"^- \*\*over bounds\*\*: slot cdc_md retains .* WAL \(max_retained_wal 1\.0 MB\).*; "
        r"apply would refuse in preflight$",
        facts,
        re.M,
    ), facts
    assert PASSWORD not in done.stdout + done.stderr
