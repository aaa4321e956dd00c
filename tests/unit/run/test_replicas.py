"""The run's side of replication (jobs/run/replicas.py): preflight's refusal line, what is
recorded, and the wait after a rewrite, on a fake clock; no database."""

from __future__ import annotations

import pytest

from jobs.pg import replication
from jobs.pg.replication import Bounds, Replication, Slot, Standby
from jobs.run import replicas

MB = 1_000_000


def lagging(lag_bytes: int, name: str = "standby1") -> Replication:
    return Replication(standbys=(Standby(name, "streaming", 0.1, lag_bytes),), wal_position=1)


def test_the_refusal_names_the_standby_or_slot_and_says_what_to_do() -> None:
    bounds = Bounds(max_lag_bytes=64 * MB, max_retained_bytes=1 * MB)
    rep = Replication(
        standbys=(Standby("standby1", "streaming", 0.2, 80 * MB),),
        slots=(Slot("cdc", "logical", False, 5 * MB),),
    )
    line = replicas.refusal(replication.over_bounds(rep, bounds), "prod")
    assert line == (
        "replica lag 80.0 MB on standby1 (max_replica_lag_bytes 64.0 MB) (and 1 more); "
        'wait for it to catch up, or set replicas = "ignore" on target prod'
    )
    slot_only = Replication(slots=rep.slots)
    assert replicas.refusal(replication.over_bounds(slot_only, bounds), "prod") == (
        "slot cdc retains 5.0 MB of WAL (max_retained_wal 1.0 MB); let its consumer catch up, "
        "drop it if nothing reads it any more (SELECT pg_drop_replication_slot('cdc')), or "
        'set replicas = "ignore" on target prod'
    )
    assert "\n" not in line
    ignored = replication.over_bounds(rep, Bounds(max_lag_bytes=1, mode="ignore"))
    assert replicas.refusal(ignored, "prod") is None


def test_facts_hold_every_standby_and_slot_and_what_is_over() -> None:
    rep = Replication(
        standbys=(Standby("standby1", "streaming", 0.0, 0),),
        slots=(Slot("cdc", "logical", False, 5 * MB),),
        wal_position=42,
    )
    found = replicas.facts(rep, Bounds(max_retained_bytes=MB))
    assert [s["name"] for s in found["standbys"]] == ["standby1"]
    assert found["slots"][0]["retained_bytes"] == 5 * MB
    assert found["lines"] == [
        "standby standby1: streaming, lag 0.0 s, 0 B behind",
        "slot cdc (logical, inactive): retains 5.0 MB",
    ]
    assert found["over_bounds"] == ["slot cdc retains 5.0 MB of WAL (max_retained_wal 1.0 MB)"]
    assert found["mode"] == "check"


class Clock:
    """A clock that moves only when the wait sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_wait_ends_when_the_standby_has_caught_up() -> None:
    clock = Clock()
    seen = [lagging(100 * MB)] * 3 + [lagging(0)]
    told: list[str] = []
    waited = replicas.wait_for_standbys(
        lambda: seen.pop(0),
        Bounds(max_lag_bytes=64 * MB),
        wait_s=300,
        check_s=0.25,
        on_wait=told.append,
        clock=clock,
        sleep=clock.sleep,
    )
    assert waited.outcome == replicas.CAUGHT_UP
    assert clock.sleeps == [0.25, 0.25, 0.25]
    assert waited.standbys == ["standby1"] and waited.waited_s == 0.75
    assert waited.line() == "waited 0.8 s for standby1 to replay"
    assert told == ["replica lag 100.0 MB on standby1 (max_replica_lag_bytes 64.0 MB)"]


def test_the_wait_gives_up_at_replica_wait_and_says_so() -> None:
    clock = Clock()
    waited = replicas.wait_for_standbys(
        lambda: lagging(100 * MB),
        Bounds(max_lag_bytes=64 * MB),
        wait_s=1.0,
        check_s=0.4,
        clock=clock,
        sleep=clock.sleep,
    )
    assert waited.outcome == replicas.GAVE_UP
    assert clock.sleeps == pytest.approx([0.4, 0.4, 0.2])  # the last check on the deadline
    assert waited.waited_s == 1.0
    assert waited.line() == (
        "warning: gave up after 1.0 s waiting for standby1 to replay (replica lag 100.0 MB on "
        "standby1 (max_replica_lag_bytes 64.0 MB)); the run went on (replica_wait)"
    )
    assert waited.as_dict()["line"] == waited.line()


def test_no_wait_within_bounds_ignoring_replicas_or_for_a_slot() -> None:
    clock = Clock()
    never = Bounds(max_lag_bytes=64 * MB, max_retained_bytes=1)

    def look() -> Replication:
        return Replication(standbys=lagging(0).standbys, slots=(Slot("cdc", "logical", False, 9),))

    within = replicas.wait_for_standbys(
        look, never, wait_s=300, check_s=0.25, clock=clock, sleep=clock.sleep
    )
    assert within.outcome == replicas.WITHIN and clock.sleeps == []
    alone = replicas.wait_for_standbys(
        Replication, never, wait_s=300, check_s=0.25, clock=clock, sleep=clock.sleep
    )
    assert alone.outcome == replicas.NO_STANDBYS
    assert alone.line() == "rewrote a table; no standbys to wait for"
    ignored = replicas.wait_for_standbys(
        lambda: lagging(100 * MB),
        Bounds(max_lag_bytes=1, mode="ignore"),
        wait_s=300,
        check_s=0.25,
        clock=clock,
        sleep=clock.sleep,
    )
    assert ignored.outcome == replicas.IGNORED and clock.sleeps == []
    assert ignored.line() == 'rewrote a table; did not wait for standbys (replicas = "ignore")'
