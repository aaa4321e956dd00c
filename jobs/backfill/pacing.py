"""How a backfill slice paces itself between batches: the pause after each batch
(``sleep_ms``), the wait while the database or its replicas ask for one (jobs/backfill/
batch_sql.py SIGNALS_SQL; jobs/backfill/replicas.py), the sleep that keeps its WAL within
``max_wal_rate``, and the time so waited, which goes on the next batch row or, when no batch
follows, on the slice's own counter (which its next batch row carries for the rate).

A throttle that holds longer than the backfill's ``max_throttle`` (across the slice's tasks:
the slice row says since when it holds) ends the wait with ``held_too_long`` set: the walk
pauses the backfill with that reason.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs.backfill.batch_sql import SIGNALS_SQL
from jobs.backfill.replicas import Replicas, ReplicaWatch, WalPacer
from jobs.ledger import backfills, slices
from jobs.pg import replication

log = logging.getLogger("runbook.backfill")

SIGNAL_EVERY_S = 1.0  # how often a slice looks at the database's signals
THROTTLE_STEP_S = 0.5  # how long it waits before looking again
BLOCKED_PAUSE_S = 0.05  # after a batch that made sessions wait: let them run first
WAL_REASON_EVERY_S = 1.0  # how often the WAL pacer's reason is recorded while it paces

Connect = Callable[[], Connection]
LoadSettings = Callable[[Connection], backfills.Backfill]
OnWait = Callable[[], None]


def database_signal(conn: Connection, settings: backfills.Backfill) -> str | None:
    """Why the database wants the slice to wait now, or None."""
    row = conn.execute(text(SIGNALS_SQL), {"table": settings.table_name}).one()
    conn.rollback()
    limit = settings.max_xact_age_s
    if limit and row.oldest_xact_s >= limit:
        return (
            f"a transaction open for {round(row.oldest_xact_s)} s holds back vacuum "
            f"(limit {limit} s)"
        )
    if row.autovacuum:
        return f"autovacuum is working on {settings.table_name}"
    return None


def held_for(seconds: float) -> str:
    """How long a throttle held, for its pause reason: 45 s, 30 min."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class Pacing:
    """One slice's waits, and the milliseconds waited since its last batch row."""

    def __init__(
        self,
        backfill_id: str,
        slice_no: int,
        watch: ReplicaWatch | None = None,
        on_wait: OnWait | None = None,
    ) -> None:
        self.id = backfill_id
        self.slice = slice_no
        self.pending_ms = 0.0  # waited since the last batch row; goes into the next
        self.signals_checked = 0.0
        self.replicas = Replicas(watch or ReplicaWatch(), backfill_id)
        self.on_wait = on_wait
        self.wal: WalPacer | None = None  # with a max_wal_rate, from the first batch on
        self.wal_reason_at = 0.0
        self.held_too_long: str | None = None  # set when a throttle outlived max_throttle

    def sleep(self, sleep_ms: int) -> None:
        """The pause after each batch (``sleep_ms``), counted as throttled."""
        if sleep_ms > 0:
            time.sleep(sleep_ms / 1000)
            self.pending_ms += sleep_ms

    def after_blocking(self, blocked: int) -> None:
        """After a batch whose locks made ``blocked`` sessions wait: let them go first."""
        log.info("backfill %s: a batch made %d sessions wait; slowing down", self.id, blocked)
        time.sleep(BLOCKED_PAUSE_S)
        self.pending_ms += BLOCKED_PAUSE_S * 1000

    def reason(
        self, conn: Connection, bf: backfills.Backfill, signals: bool, replicas: bool
    ) -> tuple[str | None, float]:
        """Why to wait now (the database's signals and the replicas, those asked for), and
        how long before looking again."""
        if signals:
            self.signals_checked = time.monotonic()
            found = database_signal(conn, bf)
            if found is not None:
                return found, THROTTLE_STEP_S
        if replicas:
            found = self.replicas.check(conn, bf)
            if found is not None:
                return found, self.replicas.watch.check_ms / 1000
        return None, 0.0

    def throttle(self, deadline: float, connect: Connect, settings: LoadSettings) -> bool:
        """Wait while the database or the replicas ask us to; False when the slice's time ran
        out still waiting (its continuation looks again) or the throttle held past
        max_throttle (``held_too_long`` says so). Never during a batch: it runs between."""
        now = time.monotonic()
        signals = now - self.signals_checked >= SIGNAL_EVERY_S
        replicas = self.replicas.due(now)
        if not (signals or replicas):
            return True
        conn = connect()
        bf = settings(conn)
        if self.wal is None and bf.max_wal_rate_bytes:
            self.wal = WalPacer(bf.max_wal_rate_bytes)
            self.wal.start(replication.wal_position(conn), time.monotonic())
            conn.rollback()
        reason, step = self.reason(conn, bf, signals, replicas)
        if reason is None:
            return True
        # Recorded at once, so that status and Flower show what holds the slice now.
        held_s = self.note(connect, 0.0, reason, hold=True) or 0.0
        log.info("backfill %s slice %d: throttled, %s", self.id, self.slice, reason)
        waited_ms = 0.0
        while reason is not None:
            if self.on_wait is not None:
                self.on_wait()
            if held_s + waited_ms / 1000 > bf.max_throttle_ms / 1000:
                self.held_too_long = (
                    f"{reason} for {held_for(held_s + waited_ms / 1000)} (max_throttle)"
                )
                self.note(connect, waited_ms, reason, hold=True)
                return False
            if time.monotonic() + step > deadline:
                self.note(connect, waited_ms, reason, hold=True)
                return False
            time.sleep(step)
            waited_ms += step * 1000
            last = reason
            reason, step = self.reason(conn, bf, True, True)
            if reason is not None and reason != last:
                self.note(connect, 0.0, reason, hold=True)
        # The wait goes on the batch that follows (which ends the throttle on the ledger).
        self.pending_ms += waited_ms
        if self.wal is not None:
            self.wal.restart(replication.wal_position(conn), time.monotonic())
            conn.rollback()
        return True

    def pace_wal(self, connect: Connect, rows: int) -> None:
        """After a batch, with a max_wal_rate: sleep what keeps the WAL within it."""
        if self.wal is None:
            return
        conn = connect()
        position = replication.wal_position(conn)
        conn.rollback()
        wait_s = self.wal.after_batch(position, time.monotonic(), rows)
        if wait_s <= 0:
            return
        now = time.monotonic()
        if now - self.wal_reason_at >= WAL_REASON_EVERY_S:
            self.wal_reason_at = now
            self.note(connect, 0.0, self.wal.reason())
        time.sleep(wait_s)
        self.pending_ms += wait_s * 1000

    def wal_cap(self, target_batch_ms: int) -> int | None:
        """The most rows a batch may hold under max_wal_rate (None: no such bound yet)."""
        return None if self.wal is None else self.wal.max_rows(target_batch_ms)

    def note(
        self, connect: Connect, waited_ms: float, reason: str, *, hold: bool | None = None
    ) -> float | None:
        """Put the waits on the ledger now, in case no batch follows in this slice; how long
        the throttle has held."""
        self.pending_ms += waited_ms
        held = slices.add_throttled(
            connect(), self.id, self.slice, round(self.pending_ms), reason, hold=hold
        )
        self.pending_ms = 0.0
        return held

    def flush(self, connect: Connect) -> None:
        """Waits no batch row recorded go on the slice's counter."""
        if self.pending_ms >= 1:
            with contextlib.suppress(DBAPIError):
                slices.add_throttled(connect(), self.id, self.slice, round(self.pending_ms))
        self.pending_ms = 0.0
