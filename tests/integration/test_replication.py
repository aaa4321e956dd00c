"""jobs/pg/replication.py against a real primary and streaming standby
(tests/integration/replication_support.py): what it reads, and when it says over the bounds."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine

from jobs.config import normalize_url
from jobs.pg import replication
from tests.integration.replication_support import STANDBY_NAME, ReplicatedPostgres

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair(services: None) -> Iterator[ReplicatedPostgres]:
    pg = ReplicatedPostgres()
    yield pg
    pg.stop()


def _read(pair: ReplicatedPostgres, replica_urls: tuple[str, ...] = ()) -> replication.Replication:
    engine = create_engine(normalize_url(pair.primary.url()).sqlalchemy_url())
    try:
        with engine.connect() as conn:
            return replication.read(conn, tuple(normalize_url(u) for u in replica_urls))
    finally:
        engine.dispose()


def test_a_streaming_standby_within_bounds(pair: ReplicatedPostgres) -> None:
    rep = _read(pair, (pair.standby.url(),))
    (seen, asked) = rep.standbys
    assert (seen.name, seen.state, seen.source) == (STANDBY_NAME, "streaming", "primary")
    assert asked.source == "replica_url" and asked.state == "streaming"
    assert rep.wal_position and rep.wal_position > 0
    assert not replication.over_bounds(rep, replication.Bounds())
    assert any(
        line.startswith(f"standby {STANDBY_NAME}: streaming") for line in replication.describe(rep)
    )


def test_paused_replay_is_over_the_byte_bound_and_names_the_standby(
    pair: ReplicatedPostgres,
) -> None:
    pair.pause_replay()
    try:
        pair.primary.sql(
            "CREATE TABLE IF NOT EXISTS filler AS SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 20000) g"
        )
        pair.primary.sql(
            "INSERT INTO filler SELECT g, repeat('y', 500) FROM generate_series(1, 20000) g"
        )
        deadline = time.monotonic() + 20
        verdict = replication.Verdict()
        while time.monotonic() < deadline and not verdict:
            verdict = replication.over_bounds(
                _read(pair), replication.Bounds(max_lag_bytes=1 << 20)
            )
            time.sleep(0.2)
        assert verdict.reason is not None and STANDBY_NAME in verdict.reason, verdict
        assert "replica lag" in verdict.reason
        assert not replication.over_bounds(_read(pair), replication.Bounds(mode="ignore"))
    finally:
        pair.resume_replay()
    deadline = time.monotonic() + 20
    while replication.over_bounds(_read(pair), replication.Bounds(max_lag_bytes=1 << 20)):
        assert time.monotonic() < deadline, "the standby did not catch up"
        time.sleep(0.2)


def test_an_inactive_logical_slot_retaining_wal_is_over_the_bound(pair: ReplicatedPostgres) -> None:
    pair.primary.sql("SELECT pg_create_logical_replication_slot('cdc_test', 'test_decoding')")
    try:
        pair.primary.sql(
            "CREATE TABLE IF NOT EXISTS filler2 AS SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 20000) g"
        )
        rep = _read(pair)
        (slot,) = [s for s in rep.slots if s.name == "cdc_test"]
        assert slot.kind == "logical" and not slot.active and (slot.retained_bytes or 0) > 1 << 20
        verdict = replication.over_bounds(rep, replication.Bounds(max_retained_bytes=1 << 20))
        assert verdict.reason is not None and verdict.reason.startswith("slot cdc_test retains")
    finally:
        pair.primary.sql("SELECT pg_drop_replication_slot('cdc_test')")
    assert not [s for s in _read(pair).slots if s.name == "cdc_test"]


def test_an_unreachable_replica_url_is_reported_and_waited_on_only_when_required() -> None:
    rep = replication.Replication(
        standbys=(replication.Standby("127.0.0.1:1", "unreachable", None, None, "replica_url"),)
    )
    assert not replication.over_bounds(rep, replication.Bounds())
    verdict = replication.over_bounds(rep, replication.Bounds(mode="require"))
    assert verdict.reason == 'standby 127.0.0.1:1 is unreachable (replicas = "require")'
