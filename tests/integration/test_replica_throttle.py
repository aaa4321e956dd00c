"""A backfill that minds the target's replicas, on a real primary with a streaming standby
(tests/integration/replication_support.py), started with the installed `runbook` and walked by
a `runbook worker`: it waits while standby1's replay lags or a slot retains WAL past its
bounds, keeps its WAL within max_wal_rate, pauses when a throttle outlives max_throttle, and
is not held up by a standby that is gone."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import Config, Worker, runbook_cli, until
from tests.integration.replication_support import STANDBY_NAME, ReplicatedPostgres

pytestmark = pytest.mark.integration

CHECK_S = 0.25  # the target's throttle_check (the default)


@pytest.fixture(scope="module")
def pair(services: None) -> Iterator[ReplicatedPostgres]:
    pg = ReplicatedPostgres()
    yield pg
    pg.stop()


class Table:
    """A database of its own on the primary, its table ``items`` and a target naming it."""

    def __init__(
        self, pair: ReplicatedPostgres, config: Config, rows: int, pad: int, **target: Any
    ):
        self.pair = pair
        self.db = f"rt_{uuid.uuid4().hex[:8]}"
        pair.primary.sql(f"CREATE DATABASE {self.db}")
        self.sql(
            f"""
            CREATE TABLE items (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0,
                pad text NOT NULL);
            INSERT INTO items (id, pad) SELECT g, repeat('x', {pad}) FROM generate_series(1, {rows}) g;
            -- Slow per row, so the test can act while the backfill runs.
            CREATE FUNCTION slow_one() RETURNS int LANGUAGE sql AS 'SELECT 1 FROM pg_sleep(0.0002)';
            ANALYZE items;
            """
        )
        self.rows = rows
        self.name = config.add(
            f"t_{self.db}", url=pair.primary.url(self.db), backup=False, **target
        )

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        return self.pair.primary.sql(statement, self.db)

    def backfill(self, set_sql: str, *options: str) -> str:
        started = runbook_cli(
            "backfill", "--target", self.name, "--table", "items", "--set", set_sql, *options
        )
        assert started.returncode == 0, started.stderr
        return started.stdout.strip()

    def rows_done(self, backfill_id: str) -> int:
        return int(
            self.sql(
                "SELECT coalesce(sum(rows_done), 0) FROM runbook.backfill_slices "
                f"WHERE backfill_id = '{backfill_id}'"
            )[0][0]
        )

    def status(self, backfill_id: str) -> dict[str, Any]:
        shown = runbook_cli("status", backfill_id, "--json")
        assert shown.returncode == 0, shown.stderr
        return dict(json.loads(shown.stdout))

    def status_line(self, backfill_id: str) -> str:
        shown = runbook_cli("status", backfill_id)
        assert shown.returncode == 0, shown.stderr
        return shown.stdout.strip()

    def wait_state(self, backfill_id: str, state: str, timeout_s: float = 60) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            row = self.sql(f"SELECT state FROM runbook.backfills WHERE id = '{backfill_id}'")
            return self.status(backfill_id) if row and row[0][0] == state else None

        return dict(until(f"backfill {backfill_id} {state}", reached, timeout_s))

    def counters(self) -> list[tuple[Any, ...]]:
        return self.sql("SELECT count(*), min(counter), max(counter) FROM items")


def wal_lsn(pair: ReplicatedPostgres) -> int:
    return int(pair.primary.sql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")[0][0])


def test_replay_paused_stops_the_backfill_within_a_check_and_it_resumes_by_itself(
    pair: ReplicatedPostgres, config: Config, worker: Worker
) -> None:
    table = Table(pair, config, rows=8_000, pad=1000)
    bound = 1 << 20
    backfill_id = table.backfill(
        "counter = counter + slow_one()",
        "--max-replica-lag-bytes",
        "1MiB",
        "--max-replica-lag",
        "60s",  # the byte bound is the one crossed here
        "--batch-size",
        "200",
    )
    until("the first rows", lambda: table.rows_done(backfill_id) >= 1000, 30)
    pair.pause_replay()
    try:
        until("the lag to cross the bound", lambda: (pair.lag_bytes() or 0) > bound, 30)
        crossed = time.monotonic()
        # One check interval, one batch in flight, and this test's own polling.
        time.sleep(CHECK_S + 0.75)
        held = table.rows_done(backfill_id)
        assert time.monotonic() - crossed < 2.0  # else the sample is too late to mean much
        time.sleep(2.0)
        assert table.rows_done(backfill_id) == held, "it wrote on while the standby lagged"
        assert held < table.rows
        now = table.status(backfill_id)
        assert now["state"] == "running"
        assert now["throttling"] and f"on {STANDBY_NAME}" in now["throttling"], now
        assert now["throttling"].startswith("replica lag "), now
        line = table.status_line(backfill_id)
        assert "waiting: replica lag" in line and STANDBY_NAME in line, line
    finally:
        pair.resume_replay()
    done = table.wait_state(backfill_id, "succeeded")
    assert table.counters() == [(table.rows, 1, 1)]  # every row exactly once
    assert done["throttled_s"] >= 2.0 and done["throttling"] is None
    assert STANDBY_NAME in done["throttle"]


def test_the_wal_the_backfill_writes_stays_within_max_wal_rate(
    pair: ReplicatedPostgres, config: Config, worker: Worker
) -> None:
    rate = 6_000_000  # bytes a second: about 16 s for this table
    table = Table(pair, config, rows=200_000, pad=300)
    backfill_id = table.backfill("counter = counter + 1", "--max-wal-rate", "6")
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        samples.append((time.monotonic(), wal_lsn(pair)))
        state = table.sql(f"SELECT state FROM runbook.backfills WHERE id = '{backfill_id}'")
        if state and state[0][0] in ("succeeded", "errored", "paused"):
            break
        time.sleep(0.2)
    assert state[0][0] == "succeeded", state
    assert table.counters() == [(table.rows, 1, 1)]
    start, end = samples[0][0], samples[-1][0]
    assert end - start >= 10, "too quick to measure: the bound did not bind"

    def position_at(t: float) -> int:
        return next(lsn for at, lsn in samples if at >= t)

    windows = []
    t = start + 5
    while t + 5 <= end:
        windows.append((position_at(t + 5) - position_at(t)) / 5)
        t += 5
    assert windows and max(windows) <= 1.2 * rate, [round(w / 1e6, 1) for w in windows]
    # It ran near the bound, not far below it.
    total = (samples[-1][1] - samples[0][1]) / (end - start)
    assert total >= 0.5 * rate, total
    done = table.status(backfill_id)
    assert done["throttled_s"] > 0
    reasons = table.sql(
        f"SELECT throttle_reason FROM runbook.backfill_slices WHERE backfill_id = '{backfill_id}'"
    )
    assert reasons[0][0].startswith("WAL rate ") and "over max_wal_rate 6 MB/s" in reasons[0][0]


def test_a_slot_retaining_too_much_wal_holds_the_backfill_until_it_is_dropped(
    pair: ReplicatedPostgres, config: Config, worker: Worker
) -> None:
    table = Table(pair, config, rows=5_000, pad=100, max_retained_wal="2MB")
    table.sql("SELECT pg_create_logical_replication_slot('cdc_held', 'test_decoding')")
    try:
        table.sql(
            "CREATE TABLE filler AS SELECT g, repeat('f', 500) AS pad FROM generate_series(1, 20000) g"
        )
        backfill_id = table.backfill("counter = counter + 1")
        now = until(
            "the backfill to wait on the slot",
            lambda: (s := table.status(backfill_id))["throttling"] and s,
            30,
        )
        assert now["throttling"].startswith("slot cdc_held retains "), now
        assert "(max_retained_wal 2.0 MB)" in now["throttling"]
        time.sleep(1.0)
        assert table.rows_done(backfill_id) == 0
    finally:
        table.sql("SELECT pg_drop_replication_slot('cdc_held')")
    table.wait_state(backfill_id, "succeeded", timeout_s=30)
    assert table.counters() == [(table.rows, 1, 1)]


def test_a_throttle_longer_than_max_throttle_pauses_and_resume_finishes(
    pair: ReplicatedPostgres, config: Config, worker: Worker
) -> None:
    table = Table(pair, config, rows=5_000, pad=100)
    pair.pause_replay()
    try:
        table.sql(
            "CREATE TABLE filler AS SELECT g, repeat('f', 500) AS pad FROM generate_series(1, 10000) g"
        )
        until("the lag to pass 1 MiB", lambda: (pair.lag_bytes() or 0) > 1 << 20, 30)
        backfill_id = table.backfill(
            "counter = counter + 1", "--max-replica-lag-bytes", "1MiB", "--max-throttle", "2s"
        )
        paused = table.wait_state(backfill_id, "paused", timeout_s=30)
        assert paused["rows_done"] == 0
        reason = paused["pause_reason"]
        assert reason.startswith("replica lag ") and f"on {STANDBY_NAME}" in reason, reason
        assert reason.endswith("(max_throttle)"), reason
        line = table.status_line(backfill_id)
        assert "paused: replica lag" in line and "(max_throttle)" in line, line
    finally:
        pair.resume_replay()
    resumed = runbook_cli("resume", backfill_id)
    assert resumed.returncode == 0, resumed.stderr
    done = table.wait_state(backfill_id, "succeeded", timeout_s=30)
    assert done["pause_reason"] is None
    assert table.counters() == [(table.rows, 1, 1)]


def test_a_stopped_standby_is_noted_not_waited_for(
    pair: ReplicatedPostgres, config: Config, worker: Worker
) -> None:
    table = Table(pair, config, rows=5_000, pad=100)
    backfill_id = table.backfill("counter = counter + slow_one()", "--batch-size", "200")
    until("the first rows", lambda: table.rows_done(backfill_id) >= 1000, 30)
    seen = table.sql(f"SELECT standbys_seen FROM runbook.backfills WHERE id = '{backfill_id}'")
    assert seen == [([STANDBY_NAME],)]
    stopped_at = time.monotonic()
    pair.standby.stop("fast")
    done = table.wait_state(backfill_id, "succeeded", timeout_s=30)
    assert time.monotonic() - stopped_at < 25
    assert table.counters() == [(table.rows, 1, 1)]
    note = f"standby {STANDBY_NAME} gone from pg_stat_replication: not waited for"
    assert done["replica_note"] == note
    assert note in table.status_line(backfill_id)
    assert worker.log_text().count(f"backfill {backfill_id}: {note}") == 1  # logged once
