"""How big the next batch is: grown or shrunk towards the target batch duration, within bounds."""

from __future__ import annotations

import math

GROWTH = 1.2  # a fast batch grows the next one by at most this factor


def next_batch_size(
    size: int,
    duration_ms: float,
    *,
    target_ms: int,
    min_batch: int,
    max_batch: int,
    wal_cap: int | None = None,
) -> int:
    """The next batch's size: aimed at ``target_ms``, shrunk at once after a slow batch,
    grown by at most GROWTH after a fast one, never above ``wal_cap`` (the rows whose WAL
    max_wal_rate allows in ``target_ms``, jobs/backfill/replicas.py WalPacer.max_rows), within
    [min_batch, max_batch]."""
    ideal = size * target_ms / max(duration_ms, 0.1)
    if duration_ms > target_ms:
        new = math.floor(ideal)
    else:
        new = min(math.floor(size * GROWTH), math.floor(ideal))
        new = max(new, size + 1) if ideal >= size + 1 else max(new, size)
    if wal_cap is not None:
        new = min(new, wal_cap)
    return max(min_batch, min(max_batch, new))
