"""Every change to a run or its steps is announced on a channel (payload: the run id), so that
`wait` and `status --watch` follow a run without polling it.
"""

from __future__ import annotations

import select
import time
from typing import Any

from sqlalchemy import Connection, text

# Every change to a run or its steps is announced here (payload: the run id), so that
# `wait` and `status --watch` follow a run without polling it.
CHANNEL = "runbook_runs"


# What notify(flush=False) does, as a CTE of a step record's own statement (one round trip
# less per record); the statement must read from ``announced`` for it to run.
ANNOUNCED = (
    "WITH announced AS (SELECT pg_notify(:ch, :run), set_config('synchronous_commit', 'off', true))"
)


def notify(conn: Connection, run_id: str, *, flush: bool = True) -> None:
    """Announce a change of ``run_id``. ``flush=False`` (step records) also lets this
    transaction commit without waiting for its WAL to reach the disk: the next synchronous
    commit on the server (the next revision's migration, the run's next state change)
    flushes it too, so a Postgres crash can lose only the step records written after the
    last of those, which a redelivered run redoes after checking the database, as it does
    after a worker died before recording them (jobs/coordinator.py). One fsync less per
    step record."""
    if flush:
        conn.execute(text("SELECT pg_notify(:ch, :id)"), {"ch": CHANNEL, "id": run_id})
    else:
        conn.execute(
            text("SELECT pg_notify(:ch, :id), set_config('synchronous_commit', 'off', true)"),
            {"ch": CHANNEL, "id": run_id},
        )


def listen(conn: Connection) -> None:
    """Subscribe an autocommit connection to run and backfill changes (see wait_for_change)."""
    conn.execute(text(f"LISTEN {CHANNEL}"))


def wait_for_change(conn: Connection, run_id: str, timeout_s: float) -> None:
    """Return when ``run_id`` changed, or after ``timeout_s`` (a safety net for a lost
    notification: the caller re-reads the run either way)."""
    raw: Any = conn.connection.dbapi_connection
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if select.select([raw], [], [], left)[0]:
            raw.poll()
            hit = any(n.payload == run_id for n in raw.notifies)
            raw.notifies.clear()
            if hit:
                return
