"""Everything Flower shows of runbook: the task names, a slice task's label (its argsrepr)
and the progress a running task reports (its PROGRESS state and ``task-progress`` events).

jobs/ reports progress through a plain callback (jobs/dispatch.py ``Progress``); the one made
here is what the worker passes in (worker/tasks.py), so that what Flower, the result backend
and the worker's log see comes from one place (tests/integration/test_flower.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from celery.utils.saferepr import saferepr

from jobs.config import redact
from jobs.dispatch import Progress, SliceMessage
from worker import flower_lines as lines

log = logging.getLogger("runbook.worker")

# Task names: the queue's messages and Flower's task list say these.
EXECUTE_RUN = "runbook.execute_run"
BACKFILL_SLICE = "runbook.backfill_slice"


def run_args(run_id: str, target: str) -> list[str]:
    """The run task's arguments (Flower shows them as they are: names only)."""
    return [run_id, target]


def slice_args(message: SliceMessage) -> list[Any]:
    return [message.backfill_id, message.target, message.slice_no, message.generation]


def slice_label(message: SliceMessage) -> str:
    """What Flower shows as a slice task's arguments: which backfill, slice and key range
    first (the Tasks page's search box finds a backfill's tasks by its id), then what it
    sets."""
    lo = "start" if message.lower_key is None else message.lower_key
    where = f" WHERE {message.where_sql}" if message.where_sql else ""
    return (
        f"backfill {message.backfill_id} on {message.target}, slice {message.slice_no} keys "
        f"({lo}, {message.upper_key}]: UPDATE {message.table} SET {message.set_sql}{where}"
    )


def slice_options(message: SliceMessage) -> dict[str, Any]:
    """A slice message's Celery options: its label in place of the raw arguments."""
    return {"argsrepr": slice_label(message), "kwargsrepr": "{}"}


@contextmanager
def best_effort(what: str) -> Iterator[None]:
    """Progress goes to Redis, the record to the ledger: a broker that is away must not fail
    the step (or the batch) that reports it."""
    try:
        yield
    except Exception as exc:
        log.warning("%s not published (the broker is away?): %s", what, redact(str(exc)))


def run_progress(task: Task) -> Progress:
    """A run's progress, as PROGRESS in the result backend (AsyncResult.info) and a
    task-progress event, its readable line first (worker/flower_lines.py)."""

    def report(info: dict[str, Any]) -> None:
        if not task.request.id:
            return
        shown = lines.run_progress(info)
        with best_effort("progress"):
            task.update_state(state="PROGRESS", meta=shown)
            task.send_event("task-progress", result=saferepr(shown, task.resultrepr_maxsize))

    return report


def slice_progress(task: Task) -> Progress:
    """A slice's progress: PROGRESS in the result backend, and a task-progress event."""

    def report(info: dict[str, Any]) -> None:
        # Flower reads events only, makes the task PROGRESS and shows the event's `result`
        # field (its other fields are kept but not shown). `state` is left out: applied after
        # the task's success event, it would overwrite the task's state in Flower.
        if not task.request.id:
            return
        shown = lines.slice_progress(info)
        with best_effort("progress"):
            task.update_state(state="PROGRESS", meta=shown)
            fields = {k: v for k, v in shown.items() if k != "state"}
            task.send_event(
                "task-progress", result=saferepr(shown, task.resultrepr_maxsize), **fields
            )

    return report
