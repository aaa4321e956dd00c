"""Thin task wrappers: resolve the target by name on the worker side and delegate to jobs."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from jobs import backfill_runner
from jobs.config import load_settings, redact
from jobs.coordinator import execute
from jobs.errors import RunbookError
from worker.app import app

log = logging.getLogger("runbook.worker")


@app.task(name="runbook.execute_run", bind=True)
def execute_run(self: Task, run_id: str, target: str) -> dict[str, Any]:
    """Carry a run as far as it goes. Arguments are names only, never URLs."""

    def progress(info: dict[str, Any]) -> None:
        if self.request.id:
            self.update_state(state="PROGRESS", meta=info)

    try:
        settings = load_settings()
        return execute(settings, run_id, target, progress=progress).as_dict()
    except RunbookError as exc:
        # Refused (unknown target, unknown run): nothing to retry, say why in the result.
        message = redact(str(exc))
        log.error("run %s on target %s refused: %s", run_id, target, message)
        return {"run_id": run_id, "target": target, "state": "refused", "error": message}


@app.task(name="runbook.backfill_slice", bind=True)
def backfill_slice(self: Task, backfill_id: str, target: str, generation: int) -> dict[str, Any]:
    """A few seconds of a backfill's batches, then the continuation. Names only, no URLs."""
    try:
        settings = load_settings()
        return backfill_runner.run_slice_and_continue(
            settings, target, backfill_id, generation, send_next=_send_slice
        )
    except RunbookError as exc:
        message = redact(str(exc))
        log.error("backfill %s on target %s refused: %s", backfill_id, target, message)
        return {"backfill_id": backfill_id, "target": target, "state": "refused", "error": message}


def _send_slice(backfill_id: str, target: str, generation: int, queue: str) -> None:
    backfill_slice.apply_async(args=[backfill_id, target, generation], queue=queue)
