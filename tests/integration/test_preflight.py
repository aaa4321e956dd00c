"""Preflight, recorded at the start of every apply: it fails before anything changes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from jobs import api
from jobs.config import load_settings
from jobs.errors import PreflightFailed
from jobs.pg import db
from jobs.project.runtime import Project
from jobs.run import preflight
from tests.integration.conftest import (
    Config,
    Databases,
    Worker,
    db_url,
    missing,
    project_target,
    runbook_cli,
    schema_dump,
)
from tests.projects import Rev

pytestmark = pytest.mark.integration

REVS = [
    Rev(
        "q1",
        "op.execute('CREATE TABLE queue (id int PRIMARY KEY, v int)')",
        "op.execute('DROP TABLE queue')",
    ),
    Rev(
        "q2",
        "op.execute('ALTER TABLE queue ADD COLUMN note text')",
        "op.execute('ALTER TABLE queue DROP COLUMN note')",
    ),
]


def setup(
    config: Config, databases: Databases, tmp_path: Path, **options: object
) -> tuple[str, str]:
    name, dbname = project_target(
        config,
        databases,
        tmp_path,
        REVS,
        backup_dir=str(tmp_path / "b"),
        **options,
    )
    first = api.enqueue(name, "q1")
    assert first and api.wait(first, name, timeout_s=60)["state"] == "succeeded"
    return name, dbname


def test_an_idle_transaction_on_a_touched_table_fails_the_run_before_the_backup(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    name, dbname = setup(config, databases, tmp_path, preflight_wait="1s")
    idle = psycopg2.connect(db_url(dbname), application_name="forgotten-console")
    with idle.cursor() as cur:
        cur.execute("SELECT * FROM queue")  # now idle in transaction, holding a share lock
    before = schema_dump(dbname)
    backups_before = api.list_backups(name)
    try:
        run_id = api.enqueue(name)
        assert run_id
        run = api.wait(run_id, name, timeout_s=60)
    finally:
        idle.close()
    assert run["state"] == "failed"
    assert [s["kind"] for s in run["steps"]] == ["preflight"]
    pid_error = run["steps"][0]["error"]
    assert "(forgotten-console, idle in transaction" in pid_error and "public.queue" in pid_error
    assert run["error"] == pid_error
    assert schema_dump(dbname) == before
    assert api.list_backups(name) == backups_before  # failed before the backup


def test_invalid_index_and_full_disk_are_refused(
    worker: Worker,
    config: Config,
    databases: Databases,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name, dbname = setup(config, databases, tmp_path)
    conn = psycopg2.connect(db_url(dbname))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO queue VALUES (1, 1), (2, 1)")
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cur.execute("CREATE UNIQUE INDEX CONCURRENTLY queue_v ON queue (v)")
    run_id = api.enqueue(name)
    assert run_id
    run = api.wait(run_id, name, timeout_s=60)
    assert run["state"] == "failed"
    assert run["error"].startswith("invalid index public.queue_v already present")
    with conn.cursor() as cur:
        cur.execute("DROP INDEX queue_v")
    conn.close()

    # The backup directory's disk is smaller than the database (as the OS would report it).
    target = load_settings().target(name)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(1, 1, 1024))
    with db.connect(target) as c:
        with pytest.raises(PreflightFailed, match="has 0 MiB free, less than"):
            preflight.preflight(c, target, Project(target), "q1", "q2", ["queue"], backup=True)
        checked = preflight.preflight(
            c, target, Project(target), "q1", "q2", ["queue"], backup=False
        )
    assert checked["tables"] == ["queue"] and checked["waited_s"] == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), for a backup directory that a database outgrows."""
    where = tmp_path / "small-disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        missing(f"cannot mount a tmpfs (root is needed): {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_a_full_backup_disk_fails_the_run_in_preflight_on_a_real_worker(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path, small_disk: Path
) -> None:
    name, dbname = setup(config, databases, tmp_path)
    # Even an empty database (about 7 MiB) outgrows the 1 MiB disk.
    config.add(name, **{**config.targets[name], "backup_dir": str(small_disk / "backups")})
    before = schema_dump(dbname)
    result = runbook_cli("apply", "--target", name, "--wait", "--json")
    assert result.returncode == 1, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "failed"
    assert re.match(
        rf"backup_dir {small_disk / 'backups'} has [01] MiB free, less than the database's "
        r"\d+ MiB; free space or set backup_dir",
        run["error"],
    ), run["error"]
    assert [(s["kind"], s["state"]) for s in run["steps"]] == [("preflight", "failed")]
    assert schema_dump(dbname) == before
    assert list((small_disk / "backups").iterdir()) == []  # no partial dump either
