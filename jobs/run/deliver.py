"""One delivery of a run: the task's entry (``execute``), which takes the run lock and the
lease, then drives the coordinator forward and, should that fail, back.

It is idempotent by run id. Celery may deliver the same run twice, or again after a worker
died: the run lock lets only one delivery work at a time, and each step is looked up in the
ledger before it is done (jobs/run/steps.py), so finished steps are never repeated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from jobs import states as st
from jobs.config import Settings, Target
from jobs.dispatch import Progress, SendSlice
from jobs.errors import AwaitingBackfill, HookFailed, RunbookError
from jobs.ledger import backfills as ledger_backfills
from jobs.ledger import runs
from jobs.ledger.records import Run
from jobs.pg import db
from jobs.pg.sqlstate import describe
from jobs.run import lease
from jobs.run.coordinator import Coordinator

# Named as before the delivery moved out of jobs/run/coordinator.py: the worker's log lines
# stay as they were.
log = logging.getLogger("runbook.coordinator")


@dataclass
class Outcome:
    """What a delivery of a run did; the task's result (names only, no URLs)."""

    run_id: str
    target: str
    state: str
    error: str | None = None
    note: str | None = None
    waiting_for: str | None = None  # the backfill this run waits for
    waiting_state: str | None = None  # its state when this delivery stopped waiting

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "target": self.target,
            "state": self.state,
            "error": self.error,
            "note": self.note,
            "waiting_for": self.waiting_for,
        }


def execute(
    settings: Settings,
    run_id: str,
    target_name: str,
    *,
    progress: Progress | None = None,
    send_slice: SendSlice | None = None,
    lock_wait_s: float = 5.0,
) -> Outcome:
    """Carry run ``run_id`` of ``target_name`` as far as it goes: one delivery of the task.

    ``send_slice`` queues one task of a declared backfill's slice (worker/tasks.py's
    ``slice_sender``): the run then returns ``running`` and waits for the backfill's last
    slice to send it again. Without it the slices run here, in this delivery.
    """
    target = settings.target(target_name)  # a target the worker does not know is refused
    while True:
        outcome = _deliver(target, run_id, progress, send_slice, lock_wait_s)
        if not _backfill_moved_on(target, outcome):
            return outcome
        # The backfill stopped while this delivery still held the run lock: the delivery its
        # last slice sent may have found the lock held and given up, so carry on here.


def _backfill_moved_on(target: Target, outcome: Outcome) -> bool:
    """Whether the backfill ``outcome`` waits for has changed state since."""
    if outcome.waiting_for is None:
        return False
    with db.connect(target) as conn:
        bf = ledger_backfills.get_backfill(conn, outcome.waiting_for)
    return bf is not None and bf.state != outcome.waiting_state


def _deliver(
    target: Target,
    run_id: str,
    progress: Progress | None,
    send_slice: SendSlice | None,
    lock_wait_s: float,
) -> Outcome:
    """One pass over the run under its run lock."""
    report = progress or (lambda _info: None)
    with db.run_lock(target, wait_s=lock_wait_s) as locked, db.connect(target) as conn:
        run = runs.get_run(conn, run_id)
        if run.target != target.name:
            raise RunbookError(
                f"run {run_id} belongs to target {run.target!r}, not {target.name!r}"
            )
        if run.terminal:
            return Outcome(run.id, target.name, run.state, run.error, "already finished")
        if not locked:
            return Outcome(run.id, target.name, run.state, None, "another delivery holds the run")
        with lease.held(target, run.id) as carry_on:
            if not carry_on:  # a poison run, failed just now
                run = runs.get_run(conn, run_id)
                return Outcome(run.id, target.name, run.state, run.error)
            return _carry(conn, target, run, report, send_slice)


def _carry(
    conn: Connection,
    target: Target,
    run: Run,
    report: Progress,
    send_slice: SendSlice | None,
) -> Outcome:
    """The delivery that holds the run lock and the lease: count it, and carry the run."""
    runs.count_delivery(conn, run)
    if run.state == st.ENQUEUED:
        runs.transition(conn, run, st.RUNNING)
    log.info(
        "run %s on target %s: %s (delivery %d)", run.id, target.name, run.state, run.deliveries
    )
    try:
        coordinator = Coordinator(conn, target, run, report, send_slice)
    except RunbookError as exc:
        # A worker that meets bad configuration ends the run with the CLI's own line.
        runs.transition(conn, run, st.FAILED, error=str(exc))
        return Outcome(run.id, target.name, run.state, run.error)
    try:
        return _drive(conn, coordinator, run, target, report)
    finally:
        coordinator.project.close()


def _drive(
    conn: Connection, coordinator: Coordinator, run: Run, target: Target, report: Progress
) -> Outcome:
    """Forward, then rollback if forward failed, then the after_run hook; the outcome."""
    final: str | None = None
    if run.state == st.RUNNING:
        try:
            coordinator.forward()
            final = st.SUCCEEDED
        except AwaitingBackfill as waiting:
            if conn.in_transaction():
                conn.rollback()
            log.info("run %s on target %s: %s", run.id, target.name, waiting)
            return Outcome(
                run.id,
                target.name,
                run.state,
                note=str(waiting),
                waiting_for=waiting.backfill_id,
                waiting_state=waiting.state,
            )
        except Exception as exc:
            error = str(exc) if isinstance(exc, RunbookError) else describe(exc)
            if conn.in_transaction():
                conn.rollback()
            if any(s.kind in st.CHANGING_STEPS for s in run.steps):
                runs.transition(conn, run, st.ROLLING_BACK, error=error)
            else:  # nothing was changed yet (a hook or the backup failed): nothing to undo
                runs.update_run(conn, run, error=error)
                final = st.FAILED
    if run.state == st.ROLLING_BACK:
        final = coordinator.rollback()
    assert final is not None
    try:
        coordinator.hook("after_run", final)  # whatever the outcome
    except HookFailed as exc:
        runs.update_run(conn, run, error=f"{run.error + '; ' if run.error else ''}{exc}")
    runs.transition(conn, run, final)
    report({"run_id": run.id, "target": target.name, "state": run.state})
    return Outcome(run.id, target.name, run.state, run.error)
