"""Exponential backoff between retries of a database attempt that failed transiently.

Two callers, each with its own numbers: a backfill batch (jobs/backfill/walk.py) and a
migration step that hit a lock timeout (``with_lock_retries`` below).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from jobs.config import Target
from jobs.pg.sqlstate import LOCK_NOT_AVAILABLE, describe, sqlstate

log = logging.getLogger("runbook.migrate")

LOCK_RETRY_MAX_BACKOFF_S = 10.0  # the longest wait between two lock-timeout retries


def delay(attempt: int, first_s: float, max_s: float) -> float:
    """The wait after failed attempt ``attempt`` (1 for the first): ``first_s``, doubled for
    each attempt before it, at most ``max_s``."""
    return min(first_s * 2 ** (attempt - 1), max_s)


def with_lock_retries(
    target: Target,
    action: Callable[[], None],
    on_retry: Callable[[int, str, float], None],
) -> None:
    """Run ``action``; on a lock timeout (SQLSTATE 55P03) retry with exponential backoff.

    Like GitLab's and pgroll's lock retries: each attempt waits at most ``lock_timeout`` for
    its locks, so production queries are never queued behind our DDL for longer than that.
    """
    attempt = 0
    while True:
        try:
            action()
            return
        except Exception as exc:
            if sqlstate(exc) != LOCK_NOT_AVAILABLE or attempt >= target.lock_retries:
                raise
            attempt += 1
            wait = delay(attempt, target.lock_retry_backoff_s, LOCK_RETRY_MAX_BACKOFF_S)
            on_retry(attempt, describe(exc), wait)
            log.warning(
                "target %s: lock timeout (attempt %d of %d); retrying in %.1fs",
                target.name,
                attempt,
                target.lock_retries,
                wait,
            )
            time.sleep(wait)
