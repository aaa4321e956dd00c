"""The next batch's size: towards the target duration, within its bounds."""

from __future__ import annotations

from jobs.backfill import sizing


def test_next_batch_size_stays_within_its_bounds() -> None:
    size = sizing.next_batch_size
    assert size(1000, 10, target_ms=50, min_batch=100, max_batch=50000) == 1200
    assert size(1000, 49, target_ms=50, min_batch=100, max_batch=50000) == 1020
    assert size(1000, 500, target_ms=50, min_batch=100, max_batch=50000) == 100
    assert size(1000, 100, target_ms=50, min_batch=100, max_batch=50000) == 500
    assert size(49000, 1, target_ms=50, min_batch=100, max_batch=50000) == 50000
    assert size(3, 0, target_ms=50, min_batch=1, max_batch=10) == 4  # grows even when tiny
