"""`runbook demo` as a user runs it: a real subprocess, its own worker, a scratch database.

The demo starts its own worker on a queue of its own, so these tests need no `worker`
fixture. Each run uses a database name of its own (RUNBOOK_DEMO_DB) and drops it afterwards,
so a user's `runbook_demo` is never touched.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import ADMIN_URL, REDIS_URL, RUNBOOK, admin_exec, query

pytestmark = pytest.mark.integration

HEAD = "e3f4g5h6i7j8"
ROWS = 3000


def run_demo(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        # The demo writes its own runbook.toml and picks its own queue; a backup dir from
        # the caller's environment would send the dump outside the test's tmp dir.
        if k not in ("RUNBOOK_CONFIG", "RUNBOOK_QUEUE", "RUNBOOK_BACKUP_DIR")
    }
    base.update(
        RUNBOOK_DEMO_ADMIN_URL=ADMIN_URL,
        CELERY_BROKER_URL=REDIS_URL,
        CELERY_RESULT_BACKEND=REDIS_URL,
        RUNBOOK_DEMO_ROWS=str(ROWS),
        RUNBOOK_DEMO_TIMEOUT="240",
    )
    base.update(env)
    return subprocess.run(
        [RUNBOOK, "demo"],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_runs_the_reference_history_to_head(services: None, tmp_path: Path) -> None:
    dbname = f"runbook_demo_test_{uuid.uuid4().hex[:8]}"
    try:
        proc = run_demo(tmp_path, RUNBOOK_DEMO_DB=dbname)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        assert "Traceback" not in output
        assert re.search(r"^\s*state\s+succeeded$", proc.stdout, re.M), output
        assert f"w5x6y7z8a9b0 -> {HEAD} (now at {HEAD})" in proc.stdout
        # The backup check in words, not a Python dict.
        assert "a trial restore into a scratch database held the same" in proc.stdout, output
        assert "{'" not in proc.stdout, output
        for line in ("backup", f"upgrade  {HEAD}", f"verify   {HEAD}"):
            assert any(line in out and "succeeded" in out for out in proc.stdout.splitlines()), (
                line,
                output,
            )

        # The database really is at head, backfilled, and the backup is in ./backups/demo.
        assert query(dbname, "SELECT version_num FROM alembic_version") == [(HEAD,)]
        assert query(dbname, "SELECT count(*), count(new_column) FROM large_table") == [
            (ROWS, ROWS)
        ]
        dumps = list((tmp_path / "backups" / "demo").glob("demo-*.dump"))
        assert len(dumps) == 1 and dumps[0].stat().st_size > 0
        assert str(dumps[0]) in proc.stdout
        (state,) = query(dbname, "SELECT state FROM runbook.runs")[0]
        assert state == "succeeded"
    finally:
        admin_exec(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def test_demo_without_postgres_says_so_in_one_line(tmp_path: Path) -> None:
    proc = run_demo(
        tmp_path,
        RUNBOOK_DEMO_ADMIN_URL="postgresql://postgres@127.0.0.1:1/postgres",
        RUNBOOK_DEMO_DB=f"runbook_demo_test_{uuid.uuid4().hex[:8]}",
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert len(output.strip().splitlines()) == 1, output
    assert "Traceback" not in output
    assert "PostgreSQL" in output and "127.0.0.1:1" in output
    assert "docker compose up -d postgres redis" in output
    assert not (tmp_path / "backups").exists()


def test_demo_without_broker_says_so_in_one_line(services: None, tmp_path: Path) -> None:
    proc = run_demo(
        tmp_path,
        CELERY_BROKER_URL="redis://127.0.0.1:1/0",
        RUNBOOK_DEMO_DB=f"runbook_demo_test_{uuid.uuid4().hex[:8]}",
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert len(output.strip().splitlines()) == 1, output
    assert "Traceback" not in output
    assert "Redis" in output and "CELERY_BROKER_URL" in output
    assert "docker compose up -d postgres redis" in output


def test_demo_refuses_to_drop_a_database_not_named_like_a_demo(tmp_path: Path) -> None:
    proc = run_demo(tmp_path, RUNBOOK_DEMO_DB="app")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert len(output.strip().splitlines()) == 1, output
    assert "runbook_demo" in output
