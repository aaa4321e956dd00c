"""Rules written once and used by several callers: the retry backoff, a backfill's batch-size
bounds, a table's default schema."""

from __future__ import annotations

from jobs.backfill.spec import MAX_BATCH, MIN_BATCH, Spec, batch_bounds
from jobs.pg import backoff, names


def test_backoff_doubles_from_the_first_wait_up_to_the_cap() -> None:
    # The walk's numbers (jobs/backfill/walk.py) and the lock retries' (jobs/pg/backoff.py).
    assert [backoff.delay(n, 0.1, 5.0) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.8]
    assert backoff.delay(10, 0.1, 5.0) == 5.0
    assert backoff.delay(3, 2.0, backoff.LOCK_RETRY_MAX_BACKOFF_S) == 8.0
    assert backoff.delay(4, 2.0, backoff.LOCK_RETRY_MAX_BACKOFF_S) == 10.0


def test_batch_bounds_widen_to_include_the_chosen_size() -> None:
    assert batch_bounds(1000) == (MIN_BATCH, MAX_BATCH) == (100, 50000)
    assert batch_bounds(10) == (10, 50000)
    assert batch_bounds(80000) == (100, 80000)
    spec = Spec(table="t", key="id", set_sql="x = 1")
    assert (spec.min_batch, spec.max_batch) == batch_bounds(spec.batch_size)


def test_a_table_without_a_schema_is_in_public() -> None:
    assert names.qualified("orders") == "public.orders"
    assert names.qualified("sales.orders") == "sales.orders"
    assert names.DEFAULT_SCHEMA == "public"
