"""Backfills as short tasks: each runs one slice's batches for a few seconds, then hands the
slice to its continuation (a new generation, so a redelivered copy of the finished task is
fenced) and queues it. No task outlives Redis's visibility timeout; pause and cancel take
effect within one batch. The worker passes the senders and the progress hook
(jobs/dispatch.py; worker/tasks.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Connection

from jobs.backfill import control, walk
from jobs.backfill.replicas import ReplicaWatch
from jobs.backfill.reporter import ProgressReporter
from jobs.config import Settings, Target
from jobs.dispatch import Progress, SendRun, SendSlice, SliceMessage
from jobs.ledger import backfills, leases, notify, records
from jobs.ledger import slices as ledger_slices
from jobs.ledger.records import backfill_progress
from jobs.pg import db
from jobs.run import lease
from jobs.states import BACKFILL_SETTLED

log = logging.getLogger("runbook.backfill")

SLICE_SECONDS = 3.0
PROGRESS_EVERY_S = 0.5  # at most this often a running slice reports progress to Flower

Updates = Iterator[dict[str, Any]]


def progress(conn: Connection, bf: records.Backfill) -> dict[str, Any]:
    """Rows done, total, percent, rate, ETA, throttling and each slice's position
    (jobs/ledger/records.py ``backfill_progress``, which `runbook status` builds the same way)."""
    return backfill_progress(
        bf,
        backfills.recent_rate(conn, bf.id),
        backfills.last_throttle(conn, bf.id),
        backfills.list_slices(conn, bf.id),
    )


def follow(
    target: Target,
    backfill_id: str,
    interval_s: float = 0.5,
    before_each: Callable[[], None] | None = None,
) -> Updates:
    """The backfill's progress now, then again at once when its state changes (the ledger's
    notification: `runbook backfill --wait` exits as soon as it stopped, not at the next
    poll) and at least every ``interval_s``, until it stops: the last one yielded.
    ``before_each`` runs before each look (jobs/api/ settles a worker's refusal there)."""
    with db.connect(target, autocommit=True) as conn:
        notify.listen(conn)
        while True:
            if before_each is not None:
                before_each()
            info = progress(conn, control.get(conn, backfill_id))
            yield info
            if info["state"] in BACKFILL_SETTLED:
                return
            notify.wait_for_change(conn, backfill_id, interval_s)


def message(
    target: str, bf: records.Backfill, piece: records.Slice, generation: int
) -> SliceMessage:
    """One slice's task on ``target`` (the configured name the worker resolves), with what
    the backfill does (Flower's label, worker/flower.py)."""
    return SliceMessage(
        backfill_id=bf.id,
        target=target,
        slice_no=piece.slice,
        generation=generation,
        table=bf.table_name,
        set_sql=bf.set_sql,
        where_sql=bf.where_sql,
        lower_key=piece.lower_key,
        upper_key=piece.upper_key,
    )


def send_slices(
    conn: Connection, target: str, bf_id: str, slices: list[tuple[int, int]], send: SendSlice
) -> None:
    """Queue one task for each (slice, generation) that start() handed out."""
    pieces = {p.slice: p for p in backfills.list_slices(conn, bf_id)}
    bf = backfills.get_backfill(conn, bf_id)
    assert bf is not None, bf_id  # start() just handed its slices out
    for number, generation in slices:
        send(message(target, bf, pieces[number], generation))


def run_slice_and_continue(
    settings: Settings,
    target_name: str,
    backfill_id: str,
    slice_no: int,
    generation: int,
    send_next: SendSlice,
    *,
    on_progress: Progress | None = None,
    resume_run: SendRun | None = None,
) -> dict[str, Any]:
    """One slice's few seconds; queue its continuation when work is left, and the waiting
    run when this slice stopped the backfill. The slice's outcome and the progress."""
    target = settings.target(target_name)
    with db.connect(target) as watch:
        started = leases.begin_slice_delivery(watch, backfill_id, slice_no, generation)
        if started == 0:
            # A redelivered copy of a task that handed its slice on: if it died between the
            # hand-off and queueing the continuation, queue it now. Were it queued after all,
            # two deliveries of one generation walk on from the one cursor, each batch under
            # the slice's row lock: nothing is done twice.
            nxt = leases.unsent_continuation(watch, backfill_id, slice_no, generation)
            if nxt is not None:
                log.info(
                    "backfill %s slice %d: continuation %d queued again", backfill_id, slice_no, nxt
                )
                send_slices(watch, target.name, backfill_id, [(slice_no, nxt)], send_next)
        if started > lease.MAX_UNFINISHED:
            outcome = control.abandon(
                watch, backfill_id, slice_no, generation, lease.poison_reason(started - 1)
            )
            return _finish(watch, target.name, backfill_id, slice_no, outcome, resume_run)

        def report() -> None:
            # In the reporter's thread, on ``watch``, which this thread leaves alone meanwhile.
            if on_progress is not None:
                info = progress(watch, control.get(watch, backfill_id))
                on_progress({**info, "slice": slice_no})

        # The first progress report comes after the first batch (on_batch) or while a
        # throttle holds; none delays a batch (jobs/backfill/reporter.py).
        name = f"progress of backfill {backfill_id} slice {slice_no}"
        with ProgressReporter(report, PROGRESS_EVERY_S, name) as reporter:
            outcome = walk.run_slice(
                db.engine(target),
                backfill_id,
                generation,
                slice_no=slice_no,
                budget_s=SLICE_SECONDS,
                on_batch=reporter.nudge,
                watch=ReplicaWatch.of_target(target),
            )
        leases.end_slice_delivery(watch, backfill_id, slice_no)
        if outcome == walk.CONTINUE:
            nxt = ledger_slices.handoff(watch, backfill_id, slice_no, generation)
            if nxt is None:
                outcome = control.FENCED
            else:
                send_slices(watch, target.name, backfill_id, [(slice_no, nxt)], send_next)
        return _finish(watch, target.name, backfill_id, slice_no, outcome, resume_run)


def _finish(
    conn: Connection,
    target_name: str,
    backfill_id: str,
    slice_no: int,
    outcome: str,
    resume_run: SendRun | None,
) -> dict[str, Any]:
    """Send the waiting run on if this slice stopped the backfill; the task's result."""
    bf = control.get(conn, backfill_id)
    if outcome in BACKFILL_SETTLED and bf.run_id and resume_run is not None:
        resume_run(bf.run_id, target_name)
    log.info(
        "backfill %s slice %d on %s: %s, %d rows done",
        backfill_id,
        slice_no,
        target_name,
        outcome,
        bf.rows_done,
    )
    return {**progress(conn, bf), "slice": slice_no, "outcome": outcome}
