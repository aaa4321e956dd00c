"""Leases and the reconciler: work whose worker died or whose message was lost goes on
without a person; a poison run stops after a bounded number of deliveries."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from jobs import api
from jobs.backfill import control, create, slices
from jobs.backfill import spec as backfill_spec
from jobs.backfill.slices import run_slice_and_continue
from jobs.config import load_settings, normalize_url
from jobs.dispatch import SliceMessage
from jobs.ledger import backfills, leases
from jobs.run import lease
from tests.integration.conftest import (
    REDIS_URL,
    Config,
    Databases,
    Worker,
    db_url,
    project_target,
    query,
    runbook_cli,
)
from tests.projects import Rev

pytestmark = pytest.mark.integration

LEASE_S = 3


@pytest.fixture
def reconciling_worker(
    services: None, config: Config, tmp_path: Path, worker: Worker
) -> Iterator[Worker]:
    """A second worker whose reconciler looks every second, with a 3 s lease."""
    w = Worker(config, tmp_path / "reconciler.log")
    w.start(concurrency=1, RUNBOOK_RECONCILE_S="1", RUNBOOK_LEASE_S=str(LEASE_S))
    yield w
    w.stop()


def wait_state(run_id: str, name: str, states: set[str], timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = api.status(run_id, name)
        if run["state"] in states:
            return run
        time.sleep(0.2)
    pytest.fail(f"run {run_id} never reached {states}: {run}")


def test_a_run_whose_message_was_lost_is_sent_again(
    reconciling_worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    revisions = [
        Rev("l1", "op.execute('CREATE TABLE lost (id int)')", "op.execute('DROP TABLE lost')")
    ]
    name, dbname = project_target(config, databases, tmp_path, revisions, backup=False)
    # The message goes to a queue no worker reads: as good as lost with Redis.
    nowhere = dataclasses.replace(load_settings(), queue=f"nobody-{dbname}")
    run_id = api.enqueue(name, settings=nowhere)
    started = time.monotonic()
    run = wait_state(run_id, name, {"succeeded", "failed"}, timeout_s=60)
    redis_lib.Redis.from_url(REDIS_URL).delete(nowhere.queue)  # the lost message, left behind
    assert run["state"] == "succeeded", run["error"]
    assert time.monotonic() - started >= LEASE_S - 0.5  # only once the lease ran out
    assert query(dbname, "SELECT to_regclass('lost') IS NOT NULL") == [(True,)]
    assert "has no live lease: sending it again" in reconciling_worker.log_text()


def test_a_poison_run_fails_after_a_bounded_number_of_deliveries(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    # Its upgrade kills the process running it, every time it is delivered.
    killer = (
        "import os, signal\n"
        "if not op.get_context().as_sql:  # plan and preflight render it offline: spare them\n"
        "    os.kill(os.getpid(), signal.SIGKILL)"
    )
    revisions = [
        Rev(
            "p1",
            "op.execute('CREATE TABLE before_poison (id int)')",
            "op.execute('DROP TABLE before_poison')",
        ),
        Rev("p2", killer, "pass"),
    ]
    name, dbname = project_target(config, databases, tmp_path, revisions, backup=False)
    run_id = api.enqueue(name)
    run = wait_state(run_id, name, {"succeeded", "failed", "rolled_back"}, timeout_s=120)
    assert run["state"] == "failed"
    assert f"started {lease.MAX_UNFINISHED} times in a row without returning" in run["error"]
    # Applied before the poison stays applied and recorded; the poison never committed.
    assert query(dbname, "SELECT version_num FROM alembic_version") == [("p1",)]
    assert worker.proc is not None and worker.proc.poll() is None  # the worker lives on


def test_a_slice_whose_worker_died_is_taken_over(
    reconciling_worker: Worker, config: Config, databases: Databases
) -> None:
    dbname = databases.create()
    query(
        dbname,
        """
        CREATE TABLE items (id int PRIMARY KEY, counter int NOT NULL DEFAULT 0);
        INSERT INTO items (id) SELECT generate_series(1, 3000);
        """,
    )
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), backup=False)
    engine = create_engine(normalize_url(db_url(dbname)).sqlalchemy_url(), poolclass=NullPool)
    spec = backfill_spec.Spec(table="items", key="id", set_sql="counter = counter + 1", slices=2)
    with engine.connect() as conn:
        backfill_id = create.create(conn, name, spec)
        # Started, but its tasks died before their first batch: nobody will send them.
        before = control.start(conn, backfill_id)
    deadline = time.monotonic() + 60
    while get_state(engine, backfill_id) != "succeeded":
        assert time.monotonic() < deadline, get_state(engine, backfill_id)
        time.sleep(0.2)
    assert query(dbname, "SELECT min(counter), max(counter) FROM items") == [(1, 1)]
    with engine.connect() as conn:
        after = {p.slice: p.generation for p in backfills.list_slices(conn, backfill_id)}
    assert all(after[n] > g for n, g in before)  # taken over with a new generation
    engine.dispose()


def get_state(engine, backfill_id: str) -> str:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return control.get(conn, backfill_id).state


def test_a_slice_that_keeps_dying_errors_the_backfill(config: Config, databases: Databases) -> None:
    dbname = databases.create()
    query(
        dbname,
        "CREATE TABLE items (id int PRIMARY KEY, counter int NOT NULL DEFAULT 0); "
        "INSERT INTO items (id) SELECT generate_series(1, 500);",
    )
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), backup=False)
    engine = create_engine(normalize_url(db_url(dbname)).sqlalchemy_url(), poolclass=NullPool)
    with engine.connect() as conn:
        backfill_id = create.create(conn, name, backfill_spec.Spec("items", "id", "counter = 1"))
        [(number, generation)] = control.start(conn, backfill_id)
        for _ in range(lease.MAX_UNFINISHED):  # deliveries that died before returning
            leases.begin_slice_delivery(conn, backfill_id, number, generation)
    sent: list[tuple[str, str]] = []
    result = run_slice_and_continue(
        load_settings(),
        name,
        backfill_id,
        number,
        generation,
        send_next=lambda *a: pytest.fail("nothing may be sent"),
        resume_run=lambda run_id, target: sent.append((run_id, target)),
    )
    assert result["outcome"] == "errored" and result["state"] == "errored"
    assert "started 5 times in a row" in result["error"]
    assert query(dbname, "SELECT max(counter) FROM items") == [(0,)]
    engine.dispose()


def test_a_slice_whose_worker_keeps_dying_errors_the_backfill_on_a_real_worker(
    worker: Worker, config: Config, databases: Databases
) -> None:
    dbname = databases.create()
    query(
        dbname,
        "CREATE TABLE items (id int PRIMARY KEY, counter int NOT NULL DEFAULT 0); "
        "INSERT INTO items (id) SELECT generate_series(1, 2000); "
        "CREATE FUNCTION slow_one() RETURNS int LANGUAGE sql AS 'SELECT 1 FROM pg_sleep(0.002)'",
    )
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), backup=False)
    backfill_id = api.enqueue_backfill(
        "items", "counter = counter + slow_one()", target=name, batch_size=100
    )

    def unfinished() -> int:
        rows = query(dbname, "SELECT unfinished FROM runbook.backfill_slices")
        return int(rows[0][0])

    # Each time one of the first five deliveries of the slice has started, its worker process
    # is killed (as an OOM kill would), before the delivery returns. The sixth is left alone:
    # killed between counting itself and stopping the slice, it would make a seventh.
    killed = 0
    deadline = time.monotonic() + 120
    while api.backfill_status(backfill_id, name)["state"] == "running":
        assert time.monotonic() < deadline, api.backfill_status(backfill_id, name)
        if killed < lease.MAX_UNFINISHED and unfinished() > killed:
            for pid in worker.pool_pids():
                os.kill(int(pid), signal.SIGKILL)
            killed += 1
        time.sleep(0.05)
    done = api.backfill_status(backfill_id, name)
    assert done["state"] == "errored", done
    assert f"started {lease.MAX_UNFINISHED} times in a row" in done["error"], done["error"]
    # Five deliveries died; the sixth found that out and stopped the slice.
    assert killed == lease.MAX_UNFINISHED, killed
    assert done["rows_done"] < 2000
    assert worker.proc is not None and worker.proc.poll() is None  # the worker lives on
    # Resume continues from the checkpoint once the slice is no longer being killed.
    assert runbook_cli("resume", backfill_id).returncode == 0
    deadline = time.monotonic() + 120
    while api.backfill_status(backfill_id, name)["state"] != "succeeded":
        now = api.backfill_status(backfill_id, name)
        assert time.monotonic() < deadline, (
            json.dumps(now, default=str),
            query(dbname, "SELECT row_to_json(s)::text FROM runbook.backfill_slices s"),
        )
        time.sleep(0.2)
    assert query(dbname, "SELECT min(counter), max(counter) FROM items") == [(1, 1)]


class _DiedBeforeSending(Exception):
    """Raised when the test's first delivery dies between its hand-off and queueing."""


def test_a_continuation_lost_at_the_hand_off_is_queued_again_by_the_redelivered_task(
    config: Config, databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    dbname = databases.create()
    query(
        dbname,
        "CREATE TABLE items (id int PRIMARY KEY, counter int NOT NULL DEFAULT 0); "
        "INSERT INTO items (id) SELECT generate_series(1, 3000);",
    )
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), backup=False)
    engine = create_engine(normalize_url(db_url(dbname)).sqlalchemy_url(), poolclass=NullPool)
    with engine.connect() as conn:
        spec = backfill_spec.Spec("items", "id", "counter = counter + 1", batch_size=100)
        backfill_id = create.create(conn, name, spec)
        [(number, generation)] = control.start(conn, backfill_id)
    monkeypatch.setattr(slices, "SLICE_SECONDS", 0)  # one batch, then hand the slice on

    def die(_sent_slice: SliceMessage) -> None:
        raise _DiedBeforeSending

    with pytest.raises(_DiedBeforeSending):  # handed off, then killed before it queued
        run_slice_and_continue(load_settings(), name, backfill_id, number, generation, die)
    sent: list[tuple[int, int]] = []

    def record(sent_slice: SliceMessage) -> None:
        sent.append((sent_slice.slice_no, sent_slice.generation))

    # acks_late brings the same message back: it is fenced, and queues what was lost.
    again = run_slice_and_continue(load_settings(), name, backfill_id, number, generation, record)
    assert again["outcome"] == "fenced" and sent == [(number, generation + 1)]
    # Once the continuation has started, a further copy queues nothing.
    with engine.connect() as conn:
        leases.begin_slice_delivery(conn, backfill_id, number, generation + 1)
    run_slice_and_continue(load_settings(), name, backfill_id, number, generation, record)
    assert sent == [(number, generation + 1)]
    assert query(dbname, "SELECT max(counter) FROM items") == [(1,)]
    engine.dispose()
