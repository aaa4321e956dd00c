"""What jobs/ asks of the queue, and nothing of how: send a run, send a backfill slice, check
that the broker answers. worker/dispatcher.py carries it out with Celery and Redis; jobs/
imports neither (tests/unit/test_dispatch.py).

The callbacks below are how work running on a worker talks back without knowing it runs in
a task: a coordinator or a slice sends the next piece of work through ``SendRun`` and
``SendSlice``, and reports what it has done through ``Progress``. The worker passes in the
ones that reach the queue and Flower (worker/tasks.py, worker/flower.py); the CLI and the
tests may pass their own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from jobs.config import Settings

# The implementation, imported by name on the first send: `runbook status` and `--help`
# never load Celery (tests/unit/test_cli_imports.py).
IMPLEMENTATION = "worker.dispatcher:CeleryDispatcher"


@dataclass(frozen=True)
class SliceMessage:
    """One backfill slice's task: which slice and generation, and what the backfill does
    (for the label Flower shows, worker/flower.py)."""

    backfill_id: str
    target: str
    slice_no: int
    generation: int
    table: str
    set_sql: str
    where_sql: str | None
    lower_key: str | None  # None: from the table's first key
    upper_key: str | None


# (run id, target name): queue a run's task.
SendRun = Callable[[str, str], None]
# Queue one slice's task.
SendSlice = Callable[[SliceMessage], None]
# What a run or slice has done so far (a JSON-able dict), while it works.
Progress = Callable[[dict[str, Any]], None]


@runtime_checkable
class Dispatcher(Protocol):
    """The queue as jobs.api sees it. Each method raises BrokerUnavailable, one line naming
    the broker, when the broker cannot be reached or cannot take the message."""

    def safe_url(self) -> str:
        """The broker's URL without its password, for messages."""

    def check_broker(self) -> None:
        """Return when the broker answers a round trip, within a few seconds."""

    def send_run(self, run_id: str, target: str, rollout: str | None = None) -> None:
        """Queue the run's task (arguments are names only, never URLs); a rollout's member
        run names its rollout, which its end advances at once."""

    def send_rollout(self, rollout_id: str, countdown_s: float = 0.0) -> None:
        """Queue one advancing pass of a rollout (jobs/fleet/advance.py)."""

    def send_slice(self, message: SliceMessage) -> None:
        """Queue one backfill slice's task."""

    def ping_worker(self, name: str, timeout_s: float) -> bool:
        """Whether the worker called ``name`` answers within ``timeout_s`` (the demo)."""

    def forget_queue(self) -> None:
        """Best effort: remove this dispatcher's queue from the broker (the demo's own)."""

    def worker_command(self, extra: list[str]) -> list[str]:
        """The command line that starts a worker on this queue, ``extra`` appended."""

    def flower_command(self, address: str, port: int, db: str) -> list[str]:
        """The command line that starts Flower on this broker with runbook's settings
        (worker/flower_config.py), persistent in ``db``; its credentials come from the
        environment (FLOWER_BASIC_AUTH), never the command line."""


def connect(broker_url: str, queue: str) -> Dispatcher:
    """The dispatcher for ``queue`` on the broker at ``broker_url`` (IMPLEMENTATION)."""
    module, name = IMPLEMENTATION.split(":")
    factory = getattr(importlib.import_module(module), name)
    found: Dispatcher = factory(broker_url, queue)
    return found


def for_settings(settings: Settings) -> Dispatcher:
    return connect(settings.broker_url, settings.queue)
