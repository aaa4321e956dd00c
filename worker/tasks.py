"""Thin task wrappers: resolve the target by name on the worker side and delegate to jobs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.signals import worker_ready

from jobs import ids
from jobs.backfill import slices
from jobs.config import Settings, load_settings, redact
from jobs.dispatch import SendRun, SendSlice, SliceMessage
from jobs.errors import RunbookError
from jobs.fleet import advance, groups, index
from jobs.run import refusals
from jobs.run.deliver import execute
from jobs.states import TERMINAL
from worker import flower
from worker import flower_lines as lines
from worker import settings as worker_settings
from worker.app import app

log = logging.getLogger("runbook.worker")


@app.task(name=flower.EXECUTE_RUN, bind=True)
def execute_run(self: Task, run_id: str, target: str, rollout: str | None = None) -> dict[str, Any]:
    """Carry a run as far as it goes. Arguments are names only, never URLs. A rollout's
    member run that ends sends its rollout's next pass at once."""
    progress = flower.run_progress(self)
    try:
        settings = groups.serving(worker_settings.current(), target)  # a catalog member too
        try:
            outcome = execute(
                settings,
                run_id,
                target,
                progress=progress,
                send_slice=slice_sender(settings.queue),
            )
        finally:
            progress.close()
        if outcome.waiting_for is not None:  # `status ID` of a declared backfill opens one target
            index.note(settings, outcome.waiting_for, ids.BACKFILL, target)
        result = lines.run_result(outcome.as_dict())
        if rollout is not None and outcome.state in TERMINAL:
            # Flower shows, beside this member's run, where its rollout stands now.
            result["rollout"] = _advance_now(settings, rollout, run_id, target)
        return result
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
        settings = groups.serving(worker_settings.current(), target)
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


@app.task(name=flower.ADVANCE_ROLLOUT, bind=True)
def advance_rollout(self: Task, rollout_id: str, token: str | None = None) -> dict[str, Any]:
    """One advancing pass of a rollout (jobs/fleet/advance.py): a short task that starts the
    next members and sends itself again; its result is the rollout's counts."""
    try:
        settings = worker_settings.current()
        found = advance.advance(settings, rollout_id, fleet_senders(settings.queue), token)
        return lines.rollout_result(found)
    except RunbookError as exc:
        # The control database is away, or the configuration broke: the reconciler sends
        # the pass again (jobs/fleet/reconcile.py).
        message = redact(str(exc))
        log.error("rollout %s not advanced: %s", rollout_id, message)
        return {"rollout": rollout_id, "error": message}


def _advance_now(settings: Settings, rollout_id: str, run_id: str, target: str) -> str:
    """A member's run ended: record it, and advance its rollout here and now (start the next
    member into the freed slot), not through a message that would wait in the queue behind
    the member runs that fill every worker; the message is the fallback. The rollout's line."""
    try:
        advance.member_ended(settings, rollout_id, run_id, target)
        found = advance.advance(settings, rollout_id, fleet_senders(settings.queue))
        return str(lines.rollout_result(found)["line"])
    except Exception as exc:  # the control database away: the next pass or the reconciler
        log.warning(
            "rollout %s not advanced after a member's run: %s", rollout_id, redact(str(exc))
        )
        with flower.best_effort("the rollout's next pass"):
            rollout_sender(settings.queue)(rollout_id, 0.0, None)
        return f"rollout {rollout_id}: not advanced here ({redact(str(exc))}); a pass is sent"


def fleet_senders(queue: str) -> advance.Senders:
    """What a rollout's pass sends: its next pass, runs sent again, and member runs admitted
    as `runbook apply` and `rollback --to` admit them."""
    from jobs.api import runs as api_runs

    def apply(settings: Settings, target: str, to: str, strict: bool, rollout: str) -> str | None:
        return api_runs.enqueue(target, to, strict=strict, settings=settings, rollout=rollout)

    def rollback(
        settings: Settings, target: str, to: str, accept: bool, rollout: str
    ) -> str | None:
        return api_runs.enqueue_rollback(
            target, to, accept_data_loss=accept, settings=settings, rollout=rollout
        )

    return advance.Senders(
        advance=rollout_sender(queue), send_run=run_sender(queue), apply=apply, rollback=rollback
    )


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


def rollout_sender(queue: str) -> Callable[[str, float, str | None], None]:
    """Queue a rollout's next pass, ``countdown_s`` from now; ``token`` None: a kick."""

    def send(rollout_id: str, countdown_s: float, token: str | None) -> None:
        advance_rollout.apply_async(
            args=[rollout_id],
            kwargs={"token": token} if token else {},
            queue=queue,
            **flower.rollout_options(countdown_s, rollout_id),
        )

    return send


def run_sender(queue: str) -> SendRun:
    """Queue a run again (a backfill it waits for has stopped)."""

    def send(run_id: str, target: str) -> None:
        execute_run.apply_async(args=flower.run_args(run_id, target), queue=queue)

    return send
