"""Backfills as short tasks: each runs batches for a few seconds, then hands the backfill to
its continuation (a new generation, so a redelivered copy of the finished task is fenced)
and queues it. No task outlives Redis's visibility timeout; pause and cancel take effect
within one batch. The Celery glue in worker/tasks.py passes ``send_next``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from jobs import backfill, db, ledger
from jobs.config import Settings

log = logging.getLogger("runbook.backfill")

SLICE_SECONDS = 3.0

SendNext = Callable[[str, str, int, str], None]


def progress(bf: ledger.Backfill) -> dict[str, Any]:
    """Rows done, total (and how it was estimated), percent: what Flower and status show."""
    total = bf.rows_total_estimate or 0
    percent = round(100.0 * bf.rows_done / total, 1) if total else None
    return {
        "backfill_id": bf.id,
        "target": bf.target,
        "table": bf.table_name,
        "state": bf.state,
        "rows_done": bf.rows_done,
        "rows_total": total,
        "estimate": bf.estimate_kind,
        "percent": min(percent, 100.0) if percent is not None else None,
        "cursor": bf.cursor,
        "error": bf.error,
    }


def run_slice_and_continue(
    settings: Settings, target_name: str, backfill_id: str, generation: int, send_next: SendNext
) -> dict[str, Any]:
    """One slice; queue the next one when work is left. The slice's outcome and progress."""
    target = settings.target(target_name)
    outcome = backfill.run_slice(db.engine(target), backfill_id, generation, budget_s=SLICE_SECONDS)
    with db.connect(target) as conn:
        if outcome == backfill.CONTINUE:
            nxt = ledger.handoff(conn, backfill_id, generation)
            if nxt is not None:
                send_next(backfill_id, target.name, nxt, settings.queue)
            else:
                outcome = backfill.FENCED
        bf = backfill.get(conn, backfill_id)
    log.info("backfill %s on %s: %s, %d rows done", backfill_id, target.name, outcome, bf.rows_done)
    return {**progress(bf), "slice": outcome}
