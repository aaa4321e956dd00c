"""Leases: a delivery of a run's task renews the run's lease while it works, and a run whose
deliveries keep dying (a poison run: it kills its worker every time) is stopped.

The reconciler (jobs/run/reconcile.py) sends again any run without a live lease; Celery's own
redelivery (acks_late, reject_on_worker_lost) covers a killed pool process, the lease covers
a whole worker that died and messages Redis lost.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError

from jobs.config import Target
from jobs.errors import RunbookError
from jobs.ledger import leases, runs
from jobs.pg import db
from jobs.states import FAILED, TERMINAL

log = logging.getLogger("runbook.lease")

# A lease not renewed for this long is dead: the reconciler sends the work again.
LEASE_S = float(os.environ.get("RUNBOOK_LEASE_S", "60"))
# Deliveries in a row that started and never returned before a run or slice is given up.
MAX_UNFINISHED = int(os.environ.get("RUNBOOK_MAX_DELIVERIES", "5"))


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def poison_reason(count: int) -> str:
    return (
        f"its task started {count} times in a row without returning (a worker killed each "
        "time, or the database lost mid-way); runbook stopped trying. Find the cause in the "
        "worker's log, check the target, then start a new run"
    )


def give_up(target: Target, run_id: str, count: int) -> None:
    """Mark a poison run failed, with the reason (if it has not ended meanwhile)."""
    with db.connect(target) as conn:
        run = runs.get_run(conn, run_id, with_steps=False)
        if run.state not in TERMINAL:
            log.error("run %s on %s: %s", run_id, target.name, poison_reason(count))
            runs.transition(conn, run, FAILED, error=poison_reason(count))


class _Heartbeat(threading.Thread):
    """Renews the run's lease every quarter lease, on its own connection each time."""

    def __init__(self, target: Target, run_id: str, every_s: float) -> None:
        super().__init__(name=f"runbook-heartbeat-{run_id}", daemon=True)
        self.target, self.run_id, self.every_s = target, run_id, every_s
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                with db.connect(self.target) as conn:
                    leases.heartbeat(conn, self.run_id)
            except (DBAPIError, RunbookError) as exc:  # the database is away: try again later
                log.warning("run %s: heartbeat failed: %s", self.run_id, exc)


@contextmanager
def held(target: Target, run_id: str, lease_s: float = LEASE_S) -> Iterator[bool]:
    """Hold the run's lease while the block runs; yields False when the run is poison (it
    is failed here and must not be carried on). Enter it only holding the run lock: a
    duplicate delivery that finds the lock taken must not touch the working one's lease.
    The count is cleared only when the block returns normally: an exception or a killed
    process leaves it for the next delivery."""
    with db.connect(target) as conn:
        count = leases.begin_delivery(conn, run_id, worker_name())
    if count is not None and count > MAX_UNFINISHED:
        give_up(target, run_id, count - 1)
        yield False
        return
    beat = _Heartbeat(target, run_id, lease_s / 4)
    beat.start()
    try:
        yield True
    finally:
        beat.done.set()
    with db.connect(target) as conn:
        leases.end_delivery(conn, run_id)
