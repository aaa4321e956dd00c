"""Everything Flower shows of runbook: the task names, a slice task's label (its argsrepr)
and the progress a running task reports (its PROGRESS state and ``task-progress`` events).

jobs/ reports progress through a plain callback (jobs/dispatch.py ``Progress``); the one made
here is what the worker passes in (worker/tasks.py), so that what Flower, the result backend
and the worker's log see comes from one place (tests/integration/test_flower.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
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
ADVANCE_ROLLOUT = "runbook.advance_rollout"


def run_args(run_id: str, target: str) -> list[str]:
    """The run task's arguments (Flower shows them as they are: names only)."""
    return [run_id, target]


def run_options(
    rollout: str | None, target: str | None = None, run_id: str | None = None
) -> dict[str, Any]:
    """A member run's Celery options: its rollout as a keyword, and a label naming the
    rollout and the member (Flower's search box finds a rollout's runs by its id)."""
    if rollout is None:
        return {}
    options: dict[str, Any] = {"kwargs": {"rollout": rollout}}
    if target is not None:
        options["argsrepr"] = f"rollout {rollout}: member {target}, run {run_id}"
        options["kwargsrepr"] = "{}"
    return options


def rollout_options(countdown_s: float, rollout_id: str | None = None) -> dict[str, Any]:
    """An advancing pass's options: sent again a little later while members are in flight;
    its label names the rollout as the member runs' labels do."""
    options: dict[str, Any] = {"countdown": countdown_s} if countdown_s > 0 else {}
    if rollout_id is not None:
        options.update(argsrepr=f"rollout {rollout_id}: advancing pass", kwargsrepr="{}")
    return options


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


# A run reports each step as it starts and ends; sent as they come, a short run (a fleet's
# member: a dozen steps in a quarter of a second) spent a quarter of its worker's time on
# these round trips to Redis. At most one report this often, the latest, is sent.
RUN_PROGRESS_EVERY_S = 0.5


class RunProgress:
    """A run's progress, passed to ``publish`` (``run_progress`` below: the result backend and
    a task-progress event): the first report at once, then the latest at most every
    RUN_PROGRESS_EVERY_S (a timer sends the one held back, so a long step is shown while it
    runs). ``close()`` before the task returns: no report may land after its own result."""

    def __init__(
        self, publish: Callable[[dict[str, Any]], None], every_s: float = RUN_PROGRESS_EVERY_S
    ) -> None:
        self.publish, self.every_s = publish, every_s
        self.sent_at = float("-inf")
        self.held: dict[str, Any] | None = None
        self.timer: threading.Timer | None = None
        self.closed = False
        self.lock = threading.Lock()  # held while sending: close() waits for a send at work

    def __call__(self, info: dict[str, Any]) -> None:
        with self.lock:
            if self.closed:
                return
            wait_s = self.sent_at + self.every_s - time.monotonic()
            if wait_s <= 0 and self.timer is None:
                self._send(info)
                return
            self.held = info
            if self.timer is None:
                self.timer = threading.Timer(max(wait_s, 0.0), self._flush)
                self.timer.daemon = True
                self.timer.start()

    def _flush(self) -> None:
        with self.lock:
            self.timer = None
            if self.held is not None and not self.closed:
                self._send(self.held)
            self.held = None

    def _send(self, info: dict[str, Any]) -> None:
        self.sent_at = time.monotonic()
        with best_effort("progress"):
            self.publish(info)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None


def _progress_publisher(task: Task) -> Callable[..., None]:
    """PROGRESS in the result backend and a task-progress event for ``task``, from any
    thread. Celery's ``task.request`` is the calling thread's, and progress is sent from a
    thread of its own (a timer, a reporter): the task's id and worker are taken here, in the
    task's thread, and the state and event are sent with them explicitly."""
    request = task.request
    task_id, hostname = request.id, request.hostname

    def publish(shown: dict[str, Any], **fields: Any) -> None:
        if not task_id:  # called outside a worker (eagerly, in a test)
            return
        task.backend.store_result(task_id, shown, "PROGRESS", request=request)
        with task.app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(
                "task-progress",
                uuid=task_id,
                retry=True,
                retry_policy=task.app.conf.task_publish_retry_policy,
                result=saferepr(shown, task.resultrepr_maxsize),
                **fields,
            )

    return publish


def run_progress(task: Task) -> RunProgress:
    """The run task's progress reporter (its timer sends from a thread of its own)."""
    publish = _progress_publisher(task)
    return RunProgress(lambda info: publish(lines.run_progress(info)))


def slice_progress(task: Task) -> Progress:
    """A slice's progress, sent from its reporter thread (jobs/backfill/reporter.py)."""
    publish = _progress_publisher(task)

    def report(info: dict[str, Any]) -> None:
        # Flower reads events only, makes the task PROGRESS and shows the event's `result`
        # field (its other fields are kept but not shown). `state` is left out: applied after
        # the task's success event, it would overwrite the task's state in Flower.
        shown = lines.slice_progress(info)
        with best_effort("progress"):
            publish(shown, **{k: v for k, v in shown.items() if k != "state"})

    return report
