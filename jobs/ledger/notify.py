"""Every change to a run or its steps is announced on a channel (payload: the run id), so that
`wait` and `status --watch` follow a run without polling it.
"""

from __future__ import annotations

import select
import time
from typing import Any

from sqlalchemy import Connection

from jobs.ledger.sql import query

# Every change to a run or its steps is announced here (payload: the run id), so that
# `wait` and `status --watch` follow a run without polling it. Spelled out again in
# jobs/ledger/queries/notify.sql `listen` (LISTEN takes no parameter).
CHANNEL = "runbook_runs"


def notify(conn: Connection, run_id: str, *, flush: bool = True) -> None:
    """Announce a change of ``run_id``. ``flush=False`` (step records) also lets this
    transaction commit without waiting for its WAL to reach the disk: the next synchronous
    commit on the server (the next revision's migration, the run's next state change)
    flushes it too, so a Postgres crash can lose only the step records written after the
    last of those, which a redelivered run redoes after checking the database, as it does
    after a worker died before recording them (jobs/run/coordinator.py). One fsync less per
    step record."""
    conn.execute(query("notify" if flush else "notify_unflushed"), {"ch": CHANNEL, "id": run_id})


def listen(conn: Connection) -> None:
    """Subscribe an autocommit connection to run and backfill changes (see wait_for_change)."""
    conn.execute(query("listen"))


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
