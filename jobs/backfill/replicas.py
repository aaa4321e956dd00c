"""What a backfill slice asks of the target's replication between batches: whether a standby
lags or a slot retains WAL past the backfill's bounds (jobs/pg/replication.py), checked every
``throttle_check``; which standbys it has seen, so that one gone from ``pg_stat_replication``
is noted (logged once, shown by status) rather than waited for; and how fast the backfill
writes WAL, paced to ``max_wal_rate``.

The bounds are the backfill's own (its ledger row, the target's when not given); the mode
(``replicas``), the check interval and the ``replica_urls`` are the target's as the worker
reads them (the URLs are secrets: never in the ledger or a message).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jobs.ledger import backfills, records
from jobs.pg import replication

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from jobs.config import Target
    from jobs.pg.url import PgURL

log = logging.getLogger("runbook.backfill")

# How far the WAL pacer lets the backfill run ahead of its rate (GCRA's burst): the WAL of any
# window of T seconds stays under max_wal_rate x (T + WAL_BURST_S), plus one batch.
WAL_BURST_S = 0.1
# How much a batch's bytes per row weighs against those of the batches before it.
BYTES_PER_ROW_WEIGHT = 0.5


@dataclass(frozen=True)
class ReplicaWatch:
    """The target's side of the checks, as the worker's configuration says."""

    mode: str = "check"  # check | ignore | require (jobs/pg/replication.py)
    urls: tuple[PgURL, ...] = field(default=(), repr=False)
    check_ms: int = 250

    @classmethod
    def of_target(cls, target: Target) -> ReplicaWatch:
        return cls(target.replicas, target.replica_urls, target.throttle_check_ms)


def bounds(bf: records.Backfill, mode: str) -> replication.Bounds:
    """The backfill's bounds under the target's ``mode``."""
    return replication.Bounds(
        max_lag_s=bf.max_replica_lag_ms / 1000,
        max_lag_bytes=bf.max_replica_lag_bytes,
        max_retained_bytes=bf.max_retained_wal_bytes,
        mode=mode,
    )


def gone_note(seen: list[str], streaming: list[str]) -> tuple[list[str], str | None]:
    """The standbys seen so far (``seen`` and those ``streaming`` now), and the note for those
    seen before and gone now (None when none is)."""
    gone = sorted(set(seen) - set(streaming))
    note = None
    if gone:
        names = ", ".join(gone)
        note = f"standby {names} gone from pg_stat_replication: not waited for"
    return sorted({*seen, *streaming}), note


@contextlib.contextmanager
def _driver_autocommit(conn: Connection) -> Iterator[None]:
    """The driver in autocommit meanwhile: a read sends no BEGIN and ROLLBACK of its own (two
    round trips, every throttle_check), as jobs/backfill/walk.py's batches do."""
    if conn.in_transaction():
        conn.rollback()  # a read left open (SQLAlchemy's autobegin): nothing to lose
    driver = conn.connection.dbapi_connection
    assert driver is not None
    driver.autocommit = True
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            driver.autocommit = False


class Replicas:
    """One slice's replication checks."""

    def __init__(self, watch: ReplicaWatch, backfill_id: str) -> None:
        self.watch = watch
        self.id = backfill_id
        self.checked = -math.inf
        self.known: tuple[list[str], str | None] | None = None  # (seen, note) as recorded
        self.streaming = False  # the last check saw a standby
        # The WAL position at the last check, and the WAL written between the last two
        # checks before batches: about one batch's, which the next batch will add to the lag.
        self.position: int | None = None
        self.batch_wal = 0

    def due(self, now: float) -> bool:
        """Whether to check before the next batch: before every batch while a standby
        streams (a 50 ms batch can write several MB of WAL, so a check every throttle_check
        would let the lag overshoot the bound by a quarter second of writing; one check costs
        about 0.35 ms), else every throttle_check (for a slot, or a standby that appears)."""
        if self.watch.mode == "ignore":
            return False
        return self.streaming or now - self.checked >= self.watch.check_ms / 1000

    def check(self, conn: Connection, bf: records.Backfill) -> str | None:
        """Why the slice must wait for its replicas now, or None. The standbys of
        ``replica_urls`` (a connection each) are asked every throttle_check only; the
        primary's view, one statement, whenever due() says."""
        now = time.monotonic()
        full = now - self.checked >= self.watch.check_ms / 1000
        if full:
            self.checked = now
        with _driver_autocommit(conn):
            rep = replication.read(conn, self.watch.urls if full else ())
        streaming = [s.name for s in rep.standbys if s.source == "primary"]
        self.streaming = bool(streaming)
        self.note_standbys(conn, bf, streaming)
        if rep.wal_position is not None and self.position is not None:
            written = rep.wal_position - self.position
            if written > 0:
                self.batch_wal = written
        self.position = rep.wal_position
        verdict = replication.over_bounds(rep, bounds(bf, self.watch.mode), self.batch_wal)
        return verdict.reason

    def note_standbys(self, conn: Connection, bf: records.Backfill, streaming: list[str]) -> None:
        """Record a standby seen for the first time, or one gone; log the note once."""
        if self.known is None:
            self.known = (list(bf.standbys_seen), bf.replica_note)
        seen, note = gone_note(self.known[0], streaming)
        if (seen, note) == self.known:
            return
        self.known = (seen, note)
        if backfills.note_standbys(conn, self.id, seen, note) and note is not None:
            log.warning("backfill %s: %s", self.id, note)


class WalPacer:
    """Keeps the WAL written while a slice works within ``rate`` bytes a second: after each
    batch, how long to sleep (a GCRA over the server's WAL position, so other slices' and
    other sessions' WAL count too, which errs on the slow side); and how many rows a batch
    may hold so that its own WAL fits in what the rate allows for one batch."""

    def __init__(self, rate: int, burst_s: float = WAL_BURST_S) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self.position: int | None = None
        self.at = 0.0
        self.free_at = 0.0  # when the WAL written so far is paid for at the rate
        self.bytes_per_row: float | None = None
        self.last_rate = 0.0  # bytes a second over the last interval measured

    def start(self, position: int | None, now: float) -> None:
        """The position before the first batch."""
        self.position, self.at, self.free_at = position, now, now

    def restart(self, position: int | None, now: float) -> None:
        """The position before a batch after a wait: the next batch's WAL is then measured
        from here, not spread over the wait."""
        self.position, self.at = position, now

    def after_batch(self, position: int | None, now: float, rows: int) -> float:
        """Seconds to sleep now that the WAL is at ``position`` after a batch of ``rows``."""
        if position is None:
            return 0.0
        if self.position is None:
            self.start(position, now)
            return 0.0
        written, since = max(position - self.position, 0), self.at
        self.last_rate = written / max(now - since, 1e-3)
        self.position, self.at = position, now
        if rows > 0 and written > 0:
            per_row = written / rows
            old = self.bytes_per_row
            self.bytes_per_row = (
                per_row
                if old is None
                else (BYTES_PER_ROW_WEIGHT * per_row + (1 - BYTES_PER_ROW_WEIGHT) * old)
            )
        # Written since the last measurement; credit left from before it is at most burst_s.
        self.free_at = max(self.free_at, since - self.burst_s) + written / self.rate
        return max(self.free_at - now, 0.0)

    def max_rows(self, target_batch_ms: int) -> int | None:
        """The most rows whose WAL (at the recent bytes per row) the rate allows in one
        batch's target duration; None before any batch was measured."""
        if not self.bytes_per_row:
            return None
        return max(1, math.floor(self.rate * target_batch_ms / 1000 / self.bytes_per_row))

    def reason(self) -> str:
        return (
            f"WAL rate {self.last_rate / 1e6:.1f} MB/s over max_wal_rate {self.rate / 1e6:g} MB/s"
        )
