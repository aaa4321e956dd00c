"""The reference history (migrations/) through the runner, then back down with Alembic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from migrations.seed import seed
from tests.integration.conftest import REPO, Config, Databases, Worker, db_url, runbook_cli

pytestmark = pytest.mark.integration

HISTORY = [
    "x6y7z8a9b0c1",
    "y7z8a9b0c1d2",
    "z8a9b0c1d2e3",
    "a9b0c1d2e3f4",
    "b0c1d2e3f4g5",
    "c1d2e3f4g5h6",
    "d2e3f4g5h6i7",
    "e3f4g5h6i7j8",
]


def alembic(dbname: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), *args],
        cwd=REPO,
        env={"DATABASE_URL": db_url(dbname), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def one(dbname: str, sql: str) -> object:
    conn = psycopg2.connect(db_url(dbname))
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_reference_history_to_head_through_the_runner_and_down_with_alembic(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    dbname = databases.create()
    assert alembic(dbname, "upgrade", "w5x6y7z8a9b0").returncode == 0
    conn = psycopg2.connect(db_url(dbname))
    with conn:
        seed(conn, large_rows=3000)
    conn.close()
    name = f"ref_{dbname}"
    config.add(
        name,
        url=db_url(dbname),
        alembic_ini=str(REPO / "alembic.ini"),
        backup_dir=str(tmp_path / "backups"),
    )

    result = runbook_cli("apply", "--target", name, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "succeeded", run["error"]
    assert run["from_revision"] == "w5x6y7z8a9b0" and run["current_revision"] == HISTORY[-1]
    upgrades = [s["revision"] for s in run["steps"] if s["kind"] == "upgrade"]
    verifies = [s for s in run["steps"] if s["kind"] == "verify"]
    assert upgrades == HISTORY
    assert [s["revision"] for s in verifies] == HISTORY
    # Every reference revision declares its own check, and each one passed.
    assert all(s["detail"]["revision_check"] == "passed" for s in verifies)
    assert len({s["detail"]["fingerprint"] for s in verifies}) >= 7  # schema moved each time
    assert one(dbname, "SELECT count(*) FROM large_table WHERE new_column IS NULL") == 0
    assert (
        one(dbname, "SELECT count(*) FROM calendar_events WHERE event_type = 'monitoring_deadline'")
        == 0
    )
    assert (
        one(
            dbname, "SELECT count(*) FROM calendar_events WHERE event_type = 'next_plan_start_date'"
        )
        == 4
    )

    # Back down with plain Alembic, as far as downgrades can go.
    down = alembic(dbname, "downgrade", "x6y7z8a9b0c1")
    assert down.returncode == 0, down.stderr
    assert one(dbname, "SELECT version_num FROM alembic_version") == "x6y7z8a9b0c1"
    assert one(dbname, "SELECT to_regclass('push_subscriptions')") is None
    stuck = alembic(dbname, "downgrade", "w5x6y7z8a9b0")
    assert stuck.returncode != 0 and "NotImplementedError" in stuck.stderr
    assert one(dbname, "SELECT version_num FROM alembic_version") == "x6y7z8a9b0c1"
