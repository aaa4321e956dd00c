"""jobs/pg/replication.py's verdicts, on readings made up here (the reads themselves are
tests/integration/test_replication.py's)."""

from __future__ import annotations

from jobs.pg.replication import Bounds, Replication, Slot, Standby, over_bounds

MB = 1_000_000


def _standby(lag_bytes: int, lag_s: float | None = 0.1) -> Replication:
    return Replication(standbys=(Standby("standby1", "streaming", lag_s, lag_bytes),))


def test_within_the_byte_bound_is_not_over() -> None:
    assert not over_bounds(_standby(10 * MB), Bounds(max_lag_bytes=16 * MB))


def test_the_next_batch_counts_against_the_byte_bound() -> None:
    verdict = over_bounds(_standby(10 * MB), Bounds(max_lag_bytes=16 * MB), ahead_bytes=7 * MB)
    assert verdict.reason == (
        "replica lag 10.0 MB on standby1 (max_replica_lag_bytes 16.0 MB, with the next 7.0 MB)"
    )
    assert not over_bounds(_standby(8 * MB), Bounds(max_lag_bytes=16 * MB), ahead_bytes=7 * MB)


def test_a_lag_already_over_says_so_without_the_next_batch() -> None:
    verdict = over_bounds(_standby(20 * MB), Bounds(max_lag_bytes=16 * MB), ahead_bytes=7 * MB)
    assert verdict.reason == "replica lag 20.0 MB on standby1 (max_replica_lag_bytes 16.0 MB)"


def test_time_lag_comes_first_and_ignore_checks_nothing() -> None:
    rep = _standby(20 * MB, lag_s=3.4)
    assert (
        over_bounds(rep, Bounds()).reason == "replica lag 3.4 s on standby1 (max_replica_lag 2 s)"
    )
    assert not over_bounds(rep, Bounds(mode="ignore"), ahead_bytes=10**9)


def test_a_slot_retaining_too_much_wal() -> None:
    rep = Replication(slots=(Slot("cdc", "logical", False, 2 << 30),))
    assert over_bounds(rep, Bounds()).reason == (
        "slot cdc retains 2.1 GB of WAL (max_retained_wal 1.1 GB)"
    )
