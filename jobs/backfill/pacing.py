"""How a backfill slice paces itself between batches: the pause after each batch
(``sleep_ms``), the wait while the database asks for one (jobs/backfill/batch_sql.py
SIGNALS_SQL), and the time so waited, which goes on the next batch row or, when no batch
follows, on the slice's own counter.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs.backfill.batch_sql import SIGNALS_SQL
from jobs.ledger import backfills, slices

log = logging.getLogger("runbook.backfill")

SIGNAL_EVERY_S = 1.0  # how often a slice looks at the database's signals
THROTTLE_STEP_S = 0.5  # how long it waits before looking again
BLOCKED_PAUSE_S = 0.05  # after a batch that made sessions wait: let them run first

Connect = Callable[[], Connection]
LoadSettings = Callable[[Connection], backfills.Backfill]


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


class Pacing:
    """One slice's waits, and the milliseconds waited since its last batch row."""

    def __init__(self, backfill_id: str, slice_no: int) -> None:
        self.id = backfill_id
        self.slice = slice_no
        self.pending_ms = 0.0  # waited since the last batch row; goes into the next
        self.signals_checked = 0.0

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

    def throttle(self, deadline: float, connect: Connect, settings: LoadSettings) -> bool:
        """Wait while the database asks us to (see database_signal); False when the slice's
        time ran out still waiting (its continuation looks again)."""
        now = time.monotonic()
        if now - self.signals_checked < SIGNAL_EVERY_S:
            return True
        self.signals_checked = now

        def signal() -> str | None:
            conn = connect()
            return database_signal(conn, settings(conn))

        waited, reason = 0.0, signal()
        cause = reason
        while reason is not None:
            if waited == 0.0:
                log.info("backfill %s slice %d: throttled, %s", self.id, self.slice, reason)
            if time.monotonic() + THROTTLE_STEP_S > deadline:
                self.note(connect, waited, reason)
                return False
            time.sleep(THROTTLE_STEP_S)
            waited += THROTTLE_STEP_S * 1000
            reason = signal()
        if cause is not None:
            self.note(connect, waited, cause)
        return True

    def note(self, connect: Connect, waited_ms: float, reason: str) -> None:
        """Put the wait on the ledger now, in case no batch follows in this slice."""
        self.pending_ms += waited_ms
        slices.add_throttled(connect(), self.id, self.slice, round(self.pending_ms), reason)
        self.pending_ms = 0.0

    def flush(self, connect: Connect) -> None:
        """Waits no batch row recorded go on the slice's counter."""
        if self.pending_ms >= 1:
            with contextlib.suppress(DBAPIError):
                slices.add_throttled(connect(), self.id, self.slice, round(self.pending_ms))
        self.pending_ms = 0.0
