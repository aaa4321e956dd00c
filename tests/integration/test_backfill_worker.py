"""Backfills on real Celery workers: exactly once through SIGKILLs, pause and resume."""

from __future__ import annotations

import json
import os
import signal
import time

import psycopg2
import pytest

from jobs import api
from tests.integration.conftest import (
    Config,
    Databases,
    Worker,
    db_url,
    query,
    runbook_cli,
    until,
)

pytestmark = pytest.mark.integration

ROWS = 20_000


def make_table(config: Config, databases: Databases) -> tuple[str, str]:
    dbname = databases.create()
    query(
        dbname,
        f"""
        CREATE TABLE large (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0, new_column text);
        INSERT INTO large (id) SELECT g * 3 FROM generate_series(1, {ROWS}) g;  -- gaps
        -- Slow per row, so the test can act while the backfill runs (sqlguard cannot see
        -- inside functions; the operator owns them).
        CREATE FUNCTION slow_one() RETURNS int LANGUAGE sql AS 'SELECT 1 FROM pg_sleep(0.0002)';
        ANALYZE large;
    """,
    )
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), backup=False)
    return name, dbname


def wait_for_rows(backfill_id: str, name: str, rows: int, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = api.backfill_status(backfill_id, name)
        if now["rows_done"] >= rows or now["state"] in {"succeeded", "paused", "errored"}:
            return now
        time.sleep(0.05)
    pytest.fail(f"backfill {backfill_id} did not reach {rows} rows: {now}")


def wait_until_succeeded(backfill_id: str, name: str) -> dict:
    """Every row done (after kills, through redeliveries), then the backfill settled."""
    done = wait_for_rows(backfill_id, name, ROWS, timeout_s=120)
    deadline = time.monotonic() + 60
    while done["state"] != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.2)
        done = api.backfill_status(backfill_id, name)
    assert done["state"] == "succeeded", done
    return done


@pytest.mark.parametrize("slices", [1, 2])
def test_every_row_updated_exactly_once_through_three_worker_kills(
    worker: Worker, config: Config, databases: Databases, slices: int
) -> None:
    name, dbname = make_table(config, databases)
    backfill_id = api.enqueue_backfill(
        "large",
        "counter = counter + slow_one(), new_column = 'v'",
        target=name,
        where="new_column IS NULL",
        batch_size=200,
        slices=slices,
    )
    assert worker.proc is not None
    for threshold in (2000, 6000, 11000):
        now = wait_for_rows(backfill_id, name, threshold)
        assert now["state"] == "running", now
        for pid in worker.pool_pids():  # no chance to clean up: acks_late brings the slice back
            os.kill(int(pid), signal.SIGKILL)
    done = wait_until_succeeded(backfill_id, name)
    assert done["rows_done"] == ROWS
    assert query(dbname, "SELECT count(*), min(counter), max(counter) FROM large") == [(ROWS, 1, 1)]
    assert query(
        dbname,
        f"SELECT sum(rows) FROM runbook.backfill_batches WHERE backfill_id = '{backfill_id}'",
    ) == [(ROWS,)]
    # Each slice walked its own part of the key range, and both did work.
    per_slice = query(
        dbname,
        "SELECT slice, sum(rows) FROM runbook.backfill_batches "
        f"WHERE backfill_id = '{backfill_id}' GROUP BY slice ORDER BY slice",
    )
    assert len(per_slice) == slices and all(rows > ROWS / (3 * slices) for _, rows in per_slice)


def test_pause_resume_and_the_cli(worker: Worker, config: Config, databases: Databases) -> None:
    name, dbname = make_table(config, databases)
    args = ["--target", name, "--table", "large", "--set", "counter = counter + slow_one()"]
    dry = runbook_cli("backfill", *args, "--batch-size", "200", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert len(report["batches"]) == 3 and report["batches"][0]["keys"] == 200
    assert all(b["rows"] == b["keys"] for b in report["batches"])  # no WHERE: every key
    assert report["projected_s"] > 0 and report["rolled_back"]
    assert query(dbname, "SELECT max(counter) FROM large") == [(0,)]
    assert query(dbname, "SELECT to_regclass('runbook.backfills')") == [(None,)]  # no ledger
    started = runbook_cli(
        "backfill",
        "--target",
        name,
        "--table",
        "large",
        "--set",
        "counter = counter + slow_one()",
        "--batch-size",
        "200",
    )
    assert started.returncode == 0, started.stderr
    backfill_id = started.stdout.strip()
    wait_for_rows(backfill_id, name, 2000)
    paused = runbook_cli("pause", backfill_id)
    assert paused.returncode == 0, paused.stderr
    now = wait_for_rows(backfill_id, name, ROWS + 1, timeout_s=30)  # returns once paused
    assert now["state"] == "paused"
    held = now["rows_done"]
    time.sleep(1.0)
    assert api.backfill_status(backfill_id, name)["rows_done"] == held  # no batch after pause
    resumed = runbook_cli("resume", backfill_id)
    assert resumed.returncode == 0, resumed.stderr
    watched = runbook_cli("status", backfill_id, "--watch", "--json", timeout=180)
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["state"] == "succeeded"
    assert query(dbname, "SELECT min(counter), max(counter) FROM large") == [(1, 1)]
    listed = runbook_cli("backfills", "--target", name, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(b["backfill_id"], b["state"]) for b in json.loads(listed.stdout)] == [
        (backfill_id, "succeeded")
    ]
    table = runbook_cli("backfills", "--target", name)  # a finished backfill's total is exact
    assert f"│ {ROWS} " in table.stdout and f"~{ROWS}" not in table.stdout, table.stdout
    bad = runbook_cli(
        "backfill", "--target", name, "--table", "large", "--set", "counter = 1; DROP TABLE large"
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert query(dbname, "SELECT count(*) FROM large") == [(ROWS,)]


def test_a_worker_killed_while_its_batch_update_waits_commits_nothing_and_the_batch_is_redone(
    worker: Worker, config: Config, databases: Databases
) -> None:
    name, dbname = make_table(config, databases)
    locked_key = 3 * 5000  # a row in the middle of the walk
    holder = psycopg2.connect(db_url(dbname))
    with holder.cursor() as cur:  # the application holds this row: the batch reaching it waits
        cur.execute("SELECT id FROM large WHERE id = %s FOR UPDATE", (locked_key,))
    try:
        backfill_id = api.enqueue_backfill(
            "large", "counter = counter + 1", target=name, batch_size=500
        )

        def waiting_update() -> bool:
            return (
                query(
                    dbname,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE 'runbook%' AND wait_event_type = 'Lock' "
                    "AND query LIKE 'UPDATE%'",
                )[0][0]
                == 1
            )

        until("the batch UPDATE to wait on the held row", waiting_update, 60)
        killed_at = query(dbname, "SELECT clock_timestamp()")[0][0]
        for pid in worker.pool_pids():  # mid-statement: no chance to commit or record anything
            os.kill(int(pid), signal.SIGKILL)
    finally:
        holder.rollback()
        holder.close()
    wait_until_succeeded(backfill_id, name)
    assert query(dbname, "SELECT count(*), min(counter), max(counter) FROM large") == [(ROWS, 1, 1)]
    # The batch holding that row was redone after the kill, and recorded once.
    covering = query(
        dbname,
        "SELECT committed_at FROM runbook.backfill_batches WHERE backfill_id = "
        f"'{backfill_id}' AND coalesce(lo::bigint, 0) < {locked_key} AND hi::bigint >= {locked_key}",
    )
    assert len(covering) == 1, covering
    assert covering[0][0] > killed_at
    assert query(
        dbname,
        f"SELECT sum(rows) FROM runbook.backfill_batches WHERE backfill_id = '{backfill_id}'",
    ) == [(ROWS,)]
