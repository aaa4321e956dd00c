"""Many requests at once: one run per target, targets in parallel, backfills side by side.

Runs are held in their upgrade by a *gate*: the revision waits (pg_sleep in a loop, at most two
minutes) until the test puts a row in the target's ``gate`` table. So a run is provably
still going while the test looks, and provably overlapping another, without fixed sleeps.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from jobs import api
from jobs.pg.db import ADMISSION_LOCK_KEY
from tests.integration.conftest import (
    REPO,
    RUNBOOK,
    Config,
    Databases,
    Worker,
    db_url,
    gated_target,
    open_gate,
    query,
    until,
    upgrade_running,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def second_worker(
    worker: Worker, config: Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """Another worker process on the same queue, next to the session's (2 processes each)."""
    w = Worker(config, tmp_path_factory.mktemp("worker2") / "worker.log")
    w.start(concurrency=2)
    yield w
    w.stop()


def pool_pids(w: Worker) -> set[str]:
    return set(w.pool_pids())


def test_five_applies_at_once_admit_exactly_one(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    # Admission waits on the admission lock up to lock_timeout: long enough here for the test
    # to hold it until all five have arrived.
    name, dbname = gated_target(config, databases, tmp_path, lock_timeout="60s")
    holder = psycopg2.connect(db_url(dbname))
    holder.autocommit = True
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (ADMISSION_LOCK_KEY,))
    # Five `runbook apply` processes started together, as five CI jobs or operators would.
    procs = [
        subprocess.Popen(
            [RUNBOOK, "apply", "--target", name],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    results = []
    try:
        # All five wait at the admission lock the test holds: they arrive together, whatever
        # their start-up took. Then the test lets them in.
        def waiting() -> bool:
            rows = query(
                dbname,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            return rows[0][0] == 5

        until("five applies waiting at admission", waiting, 60)
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (ADMISSION_LOCK_KEY,))
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            results.append((proc.returncode, stdout, stderr))
    finally:
        holder.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        # The run waits at its gate until every apply has answered: none of them could have
        # come after it finished.
        open_gate(dbname)

    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1, results
    run_id = winners[0][1].strip()
    assert len(run_id) == 16 and winners[0][2] == "", winners
    assert len(losers) == 4
    for code, stdout, stderr in losers:
        assert code == 2, (code, stdout, stderr)
        assert stdout == ""
        assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
        assert stderr.startswith(f"runbook: error: target {name!r} is busy: run {run_id} is "), (
            stderr
        )
    assert query(dbname, "SELECT id FROM runbook.runs") == [(run_id,)]

    final = api.wait(run_id, name, timeout_s=90)
    assert final["state"] == "succeeded", final
    assert query(dbname, "SELECT version_num FROM alembic_version") == [("g1",)]


def test_three_targets_run_in_parallel_on_two_workers(
    worker: Worker,
    second_worker: Worker,
    config: Config,
    databases: Databases,
    tmp_path: Path,
) -> None:
    targets = [gated_target(config, databases, tmp_path / f"t{i}") for i in range(3)]
    runs: dict[str, tuple[str, str]] = {}  # run id -> (target, database)
    for name, dbname in targets:
        run_id = api.enqueue(name)
        assert run_id
        runs[run_id] = (name, dbname)
    try:
        # All three in their upgrade at the same moment: they run side by side.
        until(
            "all three runs to be in their upgrade at once",
            lambda: all(upgrade_running(r, t) for r, (t, _) in runs.items()),
            timeout_s=90,
        )
        holders = {
            run_id: query(dbname, f"SELECT heartbeat_by FROM runbook.runs WHERE id = '{run_id}'")[
                0
            ][0]
            for run_id, (_, dbname) in runs.items()
        }
    finally:
        for _, dbname in targets:
            open_gate(dbname)
    finals = {run_id: api.wait(run_id, name, timeout_s=90) for run_id, (name, _) in runs.items()}
    assert all(f["state"] == "succeeded" for f in finals.values()), finals

    # Each run's upgrade overlaps every other's in the ledger's own timestamps.
    spans = []
    for final in finals.values():
        step = next(s for s in final["steps"] if s["kind"] == "upgrade")
        spans.append(
            (
                datetime.fromisoformat(step["started_at"]),
                datetime.fromisoformat(step["finished_at"]),
            )
        )
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans
    starts = [datetime.fromisoformat(f["started_at"]) for f in finals.values()]
    ends = [datetime.fromisoformat(f["finished_at"]) for f in finals.values()]
    assert max(starts) < min(ends), (starts, ends)

    # Three different pool processes held them, of both worker processes.
    pids = {str(h).rsplit(":", 1)[1] for h in holders.values()}
    assert len(pids) == 3, holders
    assert pids & pool_pids(worker), (holders, pool_pids(worker))
    assert pids & pool_pids(second_worker), (holders, pool_pids(second_worker))


BACKFILLS = 10
ROWS = 3000


def test_ten_backfills_at_once_update_every_row_exactly_once(
    worker: Worker, second_worker: Worker, config: Config, databases: Databases
) -> None:
    dbname = databases.create()
    tables = [f"big_{i}" for i in range(BACKFILLS)]
    query(
        dbname,
        "".join(
            f"CREATE TABLE {t} (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0);"
            f"INSERT INTO {t} (id) SELECT g * 7 FROM generate_series(1, {ROWS}) g;"
            f"ANALYZE {t};"
            for t in tables
        ),
    )
    name = config.add(f"t_{dbname}", url=db_url(dbname), backup=False)

    # Ten enqueues released together, the first of them creating the ledger.
    barrier = threading.Barrier(BACKFILLS)
    ids: dict[str, str] = {}
    errors: list[BaseException] = []

    def enqueue(table: str) -> None:
        try:
            barrier.wait(timeout=30)
            ids[table] = api.enqueue_backfill(
                table, "counter = counter + 1", target=name, batch_size=500
            )
        except BaseException as exc:  # reported below, with the table
            errors.append(exc)

    threads = [threading.Thread(target=enqueue, args=(t,)) for t in tables]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(set(ids.values())) == BACKFILLS, ids

    def all_done() -> dict[str, dict[str, Any]] | None:
        now = {t: api.backfill_status(b, name) for t, b in ids.items()}
        stopped = {t: s for t, s in now.items() if s["state"] in {"errored", "paused", "cancelled"}}
        if stopped:
            pytest.fail(f"backfills stopped: {stopped}")
        return now if all(s["state"] == "succeeded" for s in now.values()) else None

    done = until("ten backfills to succeed", all_done, timeout_s=120)
    for table, status in done.items():
        assert status["rows_done"] == ROWS, status
        assert query(dbname, f"SELECT count(*), min(counter), max(counter) FROM {table}") == [
            (ROWS, 1, 1)
        ], table
    batches = dict(
        query(
            dbname,
            "SELECT backfill_id, sum(rows)::int FROM runbook.backfill_batches GROUP BY backfill_id",
        )
    )
    assert batches == {b: ROWS for b in ids.values()}, batches
