"""The pure parts of a backfill's replica checks (jobs/backfill/replicas.py): the WAL pacer's
arithmetic, its cap on a batch's rows, and the note for a standby that is gone."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.backfill.replicas import WalPacer, gone_note
from jobs.backfill.spec import replica_bounds
from jobs.config import Target, normalize_url

MB = 1_000_000


def test_the_pacer_sleeps_what_the_wal_written_costs_at_the_rate() -> None:
    pacer = WalPacer(20 * MB, burst_s=0.0)
    pacer.start(0, now=100.0)
    # 2 MB in 0.05 s is 40 MB/s: at 20 MB/s it costs 0.1 s, 0.05 s of which went by.
    assert pacer.after_batch(2 * MB, now=100.05, rows=1000) == pytest.approx(0.05)
    assert pacer.last_rate == pytest.approx(40 * MB)
    assert pacer.reason() == "WAL rate 40.0 MB/s over max_wal_rate 20 MB/s"
    # After sleeping it (now 100.1), a slow batch within the rate owes nothing.
    assert pacer.after_batch(3 * MB, now=100.3, rows=500) == 0.0


def test_the_pacer_keeps_every_window_within_the_rate_plus_its_burst() -> None:
    rate, burst = 10 * MB, 0.1
    pacer = WalPacer(rate, burst_s=burst)
    now, position = 0.0, 0
    pacer.start(position, now)
    history = [(now, position)]
    for _ in range(2000):  # batches of 1 MB in 20 ms, far faster than the rate
        now += 0.02
        position += MB
        now += pacer.after_batch(position, now, rows=1000)
        history.append((now, position))
    for i, (start, at) in enumerate(history):
        for end, later in history[i + 1 :]:
            # One batch of WAL may go before its sleep is known.
            assert later - at <= rate * (end - start + burst) + MB + 1
    total_s = history[-1][0]
    assert 2000 * MB / total_s == pytest.approx(rate, rel=0.01)


def test_credit_from_a_pause_is_capped_at_the_burst() -> None:
    pacer = WalPacer(10 * MB, burst_s=0.1)
    pacer.start(0, now=0.0)
    # Idle for 10 s (a replica throttle, say), then 5 MB in 50 ms: only 0.1 s of credit.
    pacer.restart(0, now=10.0)
    assert pacer.after_batch(5 * MB, now=10.05, rows=1) == pytest.approx(0.5 - 0.1 - 0.05)


def test_the_pacer_caps_a_batch_at_the_rows_the_rate_allows_per_batch() -> None:
    pacer = WalPacer(20 * MB)
    assert pacer.max_rows(50) is None  # nothing measured yet
    pacer.start(0, now=0.0)
    pacer.after_batch(2 * MB, now=0.05, rows=1000)  # 2000 bytes a row
    # 20 MB/s x 50 ms = 1 MB a batch = 500 rows.
    assert pacer.max_rows(50) == 500
    pacer.after_batch(2 * MB + 4 * MB, now=0.5, rows=1000)  # 4000 bytes a row now
    assert pacer.bytes_per_row == pytest.approx(3000)  # recent batches, weighed
    assert pacer.max_rows(50) == 333


def test_a_server_without_a_wal_position_is_not_paced() -> None:
    pacer = WalPacer(MB)
    pacer.start(None, now=0.0)
    assert pacer.after_batch(None, now=1.0, rows=10) == 0.0


def test_a_standby_seen_then_gone_is_noted_and_one_back_clears_the_note() -> None:
    assert gone_note([], ["standby1"]) == (["standby1"], None)
    assert gone_note(["standby1"], ["standby1", "standby2"]) == (["standby1", "standby2"], None)
    seen, note = gone_note(["standby1", "standby2"], ["standby2"])
    assert seen == ["standby1", "standby2"]
    assert note == "standby standby1 gone from pg_stat_replication: not waited for"
    assert gone_note(seen, ["standby2", "standby1"]) == (seen, None)


def test_a_backfill_takes_the_target_s_bounds_unless_given_its_own(tmp_path: Path) -> None:
    target = Target(
        "t",
        normalize_url("postgresql://u@h/db"),
        tmp_path,
        tmp_path,
        max_replica_lag_ms=5000,
        max_wal_rate_bytes=20 * MB,
    )
    assert replica_bounds(target, max_replica_lag_bytes=MB, max_throttle_ms=None) == {
        "max_replica_lag_ms": 5000,
        "max_replica_lag_bytes": MB,
        "max_retained_wal_bytes": 1 << 30,
        "max_wal_rate_bytes": 20 * MB,
        "max_throttle_ms": 30 * 60_000,
    }


def test_how_long_a_throttle_held_reads_in_seconds_then_minutes() -> None:
    from jobs.backfill.pacing import held_for

    assert held_for(3.4) == "3 s"
    assert held_for(119) == "119 s"
    assert held_for(1800) == "30 min"


def test_a_throttle_holding_says_for_how_long_and_one_over_says_nothing() -> None:
    from datetime import UTC, datetime, timedelta

    from jobs.ledger.records import Throttle

    now = datetime.now(UTC)
    holding = Throttle("replica lag 3.4 s on standby1", now, now - timedelta(seconds=12))
    assert holding.holding_s() == pytest.approx(12, abs=1)
    assert Throttle("autovacuum is working on items", now).holding_s() is None
