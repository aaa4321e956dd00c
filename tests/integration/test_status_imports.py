"""`runbook status RUN` loads only what reading the ledger needs: not Alembic, pglast, boto3
or Celery (jobs/lazy.py), whose imports would make every status call slow to start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from jobs.ledger import runs, schema
from jobs.states import RUNNING
from tests.integration.conftest import Config, Databases, db_url
from tests.projects import trivial_history, write_project

pytestmark = pytest.mark.integration

NOT_FOR_STATUS = ("alembic", "pglast", "boto3", "botocore", "celery", "kombu", "redis")


def test_status_of_a_run_reads_the_ledger_only(
    config: Config, databases: Databases, tmp_path: Path
) -> None:
    dbname = databases.create()
    engine = create_engine(
        db_url(dbname).replace("postgresql://", "postgresql+psycopg2://"), poolclass=NullPool
    )
    with engine.connect() as conn:
        schema.ensure(conn)
        run_id = runs.admit(
            conn, target="st", kind="apply", from_revision=None, to_revision="r0001", options={}
        )
        # A worker has it. (For a run still enqueued, status also asks Redis whether a worker
        # refused it: jobs/refusals.py, plain redis-py.)
        runs.transition(conn, runs.get_run(conn, run_id), RUNNING)
    engine.dispose()
    name = config.add(
        f"st_{dbname}",
        url=db_url(dbname),
        alembic_ini=str(write_project(tmp_path / "p", trivial_history(1))),
        backup_dir=str(tmp_path / "backups"),
    )
    code = f"import sys; sys.argv = ['runbook', 'status', {run_id!r}, '--target', {name!r}]; from jobs.cli.commands import run; run()"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=dict(os.environ, RUNBOOK_CONFIG=str(config.path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run {run_id} running" in proc.stderr
    names = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"sqlalchemy", "psycopg2", "jobs"} <= names  # it did read the ledger
    assert sorted(names & set(NOT_FOR_STATUS)) == []
