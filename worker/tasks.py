"""Thin task wrappers: resolve the target by name on the worker side and delegate to jobs."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import worker_ready

from jobs.backfill import slices
from jobs.config import load_settings, redact
from jobs.dispatch import SendRun, SendSlice, SliceMessage
from jobs.errors import RunbookError
from jobs.run import refusals
from jobs.run.deliver import execute
from worker import flower
from worker import flower_lines as lines
from worker.app import app

log = logging.getLogger("runbook.worker")


@app.task(name=flower.EXECUTE_RUN, bind=True)
def execute_run(self: Task, run_id: str, target: str) -> dict[str, Any]:
    """Carry a run as far as it goes. Arguments are names only, never URLs."""
    try:
        settings = load_settings()
        outcome = execute(
            settings,
            run_id,
            target,
            progress=flower.run_progress(self),
            send_slice=slice_sender(settings.queue),
        )
        return lines.run_result(outcome.as_dict())
    except RunbookError as exc:
        # Refused (unknown or broken target, unknown run): nothing to retry, say why in the
        # result, and where the CLI finds it to record it in the ledger.
        message = redact(str(exc))
        log.error("run %s on target %s refused: %s", run_id, target, message)
        _keep_refusal(run_id, message, target=target)
        return lines.refusal("run", run_id, target, message)


# Flower shows a result as its repr, cut at resultrepr_maxsize: room for many slices' progress.
@app.task(name=flower.BACKFILL_SLICE, bind=True, resultrepr_maxsize=8192)
def backfill_slice(
    self: Task, backfill_id: str, target: str, slice_no: int, generation: int
) -> dict[str, Any]:
    """A few seconds of one slice's batches, then its continuation. Names only, no URLs."""
    try:
        settings = load_settings()
        result = slices.run_slice_and_continue(
            settings,
            target,
            backfill_id,
            slice_no,
            generation,
            send_next=slice_sender(settings.queue),
            on_progress=flower.slice_progress(self),
            resume_run=run_sender(settings.queue),
        )
        return lines.slice_result(result)
    except RunbookError as exc:
        message = redact(str(exc))
        log.error("backfill %s on target %s refused: %s", backfill_id, target, message)
        _keep_refusal(backfill_id, message, target=target, slice=slice_no, generation=generation)
        return lines.refusal("backfill", backfill_id, target, message)


def _keep_refusal(work_id: str, message: str, **where: Any) -> None:
    try:
        refusals.record(app.conf.result_backend, work_id, message, **where)
    except Exception:  # logged above either way; the backend may be down too
        log.exception("could not record the refusal of %s", work_id)


@worker_ready.connect
def _report_broken_targets(**_: Any) -> None:
    """One line per broken target at start-up; the worker serves the others."""
    try:
        settings = load_settings()
    except RunbookError as exc:  # the whole file is unreadable: every task will say so
        log.error("configuration: %s", redact(str(exc)))
        return
    for name in sorted(settings.broken):
        log.error("target %s is not served: %s", name, redact(settings.broken[name]))
    if settings.targets:
        log.info("serving targets: %s", ", ".join(sorted(settings.targets)))


# The worker's own senders: a failure to send propagates as Celery raises it (the task fails
# and its message comes back), unlike the CLI's, which names the broker (worker/dispatcher.py).
def slice_sender(queue: str) -> SendSlice:
    """Queue a backfill slice's task on ``queue``; Flower shows its label as its arguments."""

    def send(message: SliceMessage) -> None:
        backfill_slice.apply_async(
            args=flower.slice_args(message), queue=queue, **flower.slice_options(message)
        )

    return send


def run_sender(queue: str) -> SendRun:
    """Queue a run again (a backfill it waits for has stopped)."""

    def send(run_id: str, target: str) -> None:
        execute_run.apply_async(args=flower.run_args(run_id, target), queue=queue)

    return send
