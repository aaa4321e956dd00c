"""What a worker refused, kept where the CLI can read it.

A worker whose configuration lacks a target (or holds a broken entry for it) cannot reach
that target's ledger, so it cannot record there why it refused the work. It leaves the
reason in the result backend's Redis instead; the CLI, which reaches the ledger, writes it
down as the run's or backfill's failure (jobs/api/, ``settle_refusal``). Plain redis-py,
not Celery: ``runbook status`` reads it and must start quickly.
"""

from __future__ import annotations

import json
from typing import Any

KEEP_S = 7 * 24 * 3600  # as long as Celery keeps results (worker/app.py result_expires)


def _client(backend_url: str) -> Any:
    import redis

    if not backend_url.startswith(("redis://", "rediss://", "unix://")):
        return None  # another result backend: the refusal is in the task's result only
    return redis.Redis.from_url(backend_url, socket_connect_timeout=2, socket_timeout=2)


def _key(work_id: str) -> str:
    return f"runbook-refused-{work_id}"


def record(backend_url: str, work_id: str, error: str, **where: Any) -> None:
    """Keep why ``work_id`` (a run or backfill id) was refused: its error and which slice."""
    client = _client(backend_url)
    if client is not None:
        client.set(_key(work_id), json.dumps({"error": error, **where}), ex=KEEP_S)


def read(backend_url: str, work_id: str) -> dict[str, Any] | None:
    """The refusal recorded for ``work_id``, or None."""
    client = _client(backend_url)
    raw = None if client is None else client.get(_key(work_id))
    return None if raw is None else json.loads(raw)


def forget(backend_url: str, work_id: str) -> None:
    """Drop the record once the ledger holds it."""
    client = _client(backend_url)
    if client is not None:
        client.delete(_key(work_id))
