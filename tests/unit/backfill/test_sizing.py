"""The next batch's size: towards the target duration, within its bounds."""

from __future__ import annotations

import pytest

from jobs.backfill import sizing


def test_next_batch_size_stays_within_its_bounds() -> None:
    size = sizing.next_batch_size
    assert size(1000, 10, target_ms=50, min_batch=100, max_batch=50000) == 1200
    assert size(1000, 49, target_ms=50, min_batch=100, max_batch=50000) == 1020
    assert size(1000, 500, target_ms=50, min_batch=100, max_batch=50000) == 100
    assert size(1000, 100, target_ms=50, min_batch=100, max_batch=50000) == 500
    assert size(49000, 1, target_ms=50, min_batch=100, max_batch=50000) == 50000
    assert size(3, 0, target_ms=50, min_batch=1, max_batch=10) == 4  # grows even when tiny


@pytest.mark.parametrize("duration_ms", [50, 51, 80, 1000, 49_999])
def test_a_batch_at_or_over_the_target_never_grows_the_next(duration_ms: float) -> None:
    new = sizing.next_batch_size(1000, duration_ms, target_ms=50, min_batch=1, max_batch=10**6)
    assert new <= 1000
    assert new == (1000 * 50) // duration_ms  # straight to the target, in one step


def test_growth_is_capped_however_fast_the_batch() -> None:
    sizes = [100]
    for _ in range(5):
        sizes.append(
            sizing.next_batch_size(sizes[-1], 0.01, target_ms=500, min_batch=1, max_batch=10**9)
        )
    assert sizes == [100, 120, 144, 172, 206, 247]  # x GROWTH each time, rounded down
    assert sizing.GROWTH == 1.2


def test_the_bounds_win_over_the_target() -> None:
    # A slow batch at the floor stays at the floor; a fast one at the ceiling stays there.
    assert sizing.next_batch_size(10, 10_000, target_ms=50, min_batch=10, max_batch=100) == 10
    assert sizing.next_batch_size(100, 1, target_ms=50, min_batch=10, max_batch=100) == 100
    # A size outside the bounds (settings changed on resume) comes back inside them.
    assert sizing.next_batch_size(500, 50, target_ms=50, min_batch=10, max_batch=100) == 100
    assert sizing.next_batch_size(1, 50, target_ms=50, min_batch=10, max_batch=100) == 10


def test_a_batch_whose_wal_would_overshoot_max_wal_rate_does_not_grow() -> None:
    size = sizing.next_batch_size
    # A fast batch would grow to 1200, but only 1000 rows' WAL fits the rate's share.
    assert size(1000, 10, target_ms=50, min_batch=100, max_batch=50000, wal_cap=1000) == 1000
    # Already over the cap: back down to it, however fast the batch.
    assert size(5000, 10, target_ms=50, min_batch=100, max_batch=50000, wal_cap=800) == 800
    # A cap above what the duration allows changes nothing.
    assert size(1000, 10, target_ms=50, min_batch=100, max_batch=50000, wal_cap=10**6) == 1200
    # The cap never goes under min_batch.
    assert size(1000, 10, target_ms=50, min_batch=100, max_batch=50000, wal_cap=3) == 100
