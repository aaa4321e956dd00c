"""`runbook status` reads the ledger with plain psycopg2 (jobs/ledger/read.py): not
SQLAlchemy, Alembic, pglast, boto3 or Celery (jobs/lazy.py), whose imports would make every
status call slow to start. So for a run, for a backfill and for an id that is neither."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from jobs.fleet import store
from jobs.ledger import backfills, runs, schema
from jobs.states import RUNNING
from tests.integration.conftest import Config, Databases, db_url
from tests.projects import trivial_history, write_project

pytestmark = pytest.mark.integration

NOT_FOR_STATUS = ("sqlalchemy", "alembic", "pglast", "boto3", "botocore", "celery", "kombu")


def status_imports(
    config: Config, *args: str, control_url: str = ""
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """`runbook status ARGS` through the console script's entry point; the top-level
    packages it imported (from `python -X importtime`)."""
    code = f"import sys; sys.argv = ['runbook', 'status', *{list(args)!r}]; from jobs.cli.commands import run; run()"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=dict(os.environ, RUNBOOK_CONFIG=str(config.path), RUNBOOK_CONTROL_URL=control_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    names = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return proc, names


def test_status_of_a_run_a_backfill_or_neither_reads_without_sqlalchemy(
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
        # refused it: jobs/run/refusals.py, plain redis-py.)
        runs.transition(conn, runs.get_run(conn, run_id), RUNNING)
        backfill_id = backfills.create_backfill(
            conn,
            target="st",
            run_id=None,
            revision=None,
            table_name="public.items",
            key_column="id",
            key_type="bigint",
            set_sql="v = 1",
            where_sql=None,
            state="succeeded",
            upper_key="10",
            bounds=["10"],
            on_error="stop",
            rows_total_estimate=10,
            estimate_kind="counted",
            settings={k: 1000 for k in backfills.BACKFILL_SETTINGS},
            finished=True,
        )
    engine.dispose()
    name = config.add(
        f"st_{dbname}",
        url=db_url(dbname),
        alembic_ini=str(write_project(tmp_path / "p", trivial_history(1))),
        backup_dir=str(tmp_path / "backups"),
    )

    proc, names = status_imports(config, run_id, "--target", name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run {run_id} running" in proc.stderr
    assert {"psycopg2", "jobs"} <= names  # it did read the ledger
    assert sorted(names & set(NOT_FOR_STATUS)) == []

    proc, names = status_imports(config, backfill_id, "--target", name, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'"backfill_id": "{backfill_id}"' in proc.stdout
    assert sorted(names & set(NOT_FOR_STATUS)) == []

    proc, names = status_imports(config, "no-such-id", "--target", name)
    assert proc.returncode == 2
    assert "unknown run or backfill 'no-such-id'" in proc.stderr
    assert sorted(names & set(NOT_FOR_STATUS)) == []

    # With a control database, the run is found through its index (jobs/fleet/index.py),
    # still without SQLAlchemy, and without --target.
    control = databases.create()
    engine = create_engine(
        db_url(control).replace("postgresql://", "postgresql+psycopg2://"), poolclass=NullPool
    )
    with engine.connect() as conn:
        store.ensure(conn)
        store.note_work(conn, run_id, "run", name)
    engine.dispose()
    proc, names = status_imports(config, run_id, control_url=db_url(control))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run {run_id} running" in proc.stderr
    assert sorted(names & set(NOT_FOR_STATUS)) == []
