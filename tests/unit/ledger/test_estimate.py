"""The progress estimate's arithmetic (jobs/ledger/estimate.py) and how a backfill's total is
chosen from it (jobs/ledger/records.py rows_total)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from jobs.ledger.estimate import (
    SliceWalk,
    estimate_total,
    key_value,
    walked_fraction,
)
from jobs.ledger.records import Backfill, Slice, backfill_progress, rows_total

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_integer_keys_interpolate_by_value_over_the_key_span() -> None:
    assert walked_fraction(["0", "1000"], "250", "bigint") == 0.25
    assert walked_fraction(["0", "1000"], None, "bigint") == 0.0
    assert walked_fraction(["0", "1000"], "0", "bigint") == 0.0
    assert walked_fraction(["0", "1000"], "1000", "bigint") == 1.0
    # Numbers, not text: "9" < "10".
    assert walked_fraction(["0", "10", "100"], "9", "integer") == pytest.approx(0.45)


def test_marks_place_a_cursor_past_a_gap() -> None:
    # Half the keys in 1..100, half in 1,000,000..1,000,100: the span alone says 0.01%.
    marks = ["1", "50", "100", "1000050", "1000100"]  # at 0, 1/4, 1/2, 3/4, 1
    assert walked_fraction(marks, "100", "bigint") == 0.5
    assert walked_fraction(["1", "1000100"], "100", "bigint") < 0.001
    assert walked_fraction(marks, "1000075", "bigint") == 0.875
    assert walked_fraction(marks, "500000", "bigint") == pytest.approx(0.5, abs=0.2)


def test_uuids_order_as_their_128_bits() -> None:
    low, mid, high = (
        "00000000-0000-0000-0000-000000000000",
        "80000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
    )
    assert key_value(mid, "uuid") == 2**127
    assert walked_fraction([low, high], mid, "uuid") == pytest.approx(0.5)


def test_text_keys_step_to_the_middle_between_marks() -> None:
    marks = ["a", "f", "m", "t"]
    assert walked_fraction(marks, "g", "text") == pytest.approx(0.5)  # between 1/3 and 2/3
    assert walked_fraction(marks, "f", "text") == pytest.approx(0.5)
    assert walked_fraction(marks, "zz", "text") == 1.0


def test_rows_left_follow_rows_done_per_key_walked() -> None:
    # A WHERE that keeps one row in ten: 1,000 rows over a quarter of 40,000 keys.
    walks = [SliceWalk(keys=40_000, walked=0.25, rows_done=1_000)]
    assert estimate_total(walks, fallback=999_999) == 4_000
    # Two slices: one done, one a quarter through; the rate of rows per key is shared.
    walks = [
        SliceWalk(keys=10_000, walked=1.0, rows_done=10_000),
        SliceWalk(keys=10_000, walked=0.25, rows_done=2_500),
    ]
    assert estimate_total(walks, fallback=0) == 20_000


def test_the_fallback_holds_until_a_walked_key_updated_a_row() -> None:
    assert estimate_total([SliceWalk(keys=100, walked=0.0, rows_done=0)], fallback=70) == 70
    assert estimate_total([SliceWalk(keys=100, walked=0.3, rows_done=0)], fallback=70) == 70


def _backfill(**changes: Any) -> Backfill:
    bf = Backfill(
        id="bf1", target="t", run_id=None, revision=None, table_name="public.t",
        key_column="id", key_type="bigint", set_sql="x = 1", where_sql=None, state="running",
        upper_key="1000", batch_size=100, min_batch=1, max_batch=1000, target_batch_ms=100,
        sleep_ms=0, lock_timeout_ms=1, statement_timeout_ms=1, slices=1, on_error="stop",
        max_xact_age_s=1, max_replica_lag_ms=1, max_replica_lag_bytes=1,
        max_retained_wal_bytes=1, max_wal_rate_bytes=None, max_throttle_ms=1,
        pause_reason=None, standbys_seen=[], replica_note=None,
        rows_total_estimate=5_000, estimate_kind="key-range", error=None, error_range=None,
        created_at=NOW, started_at=NOW, finished_at=None, updated_at=NOW, rows_done=250,
    )  # fmt: skip
    return replace(bf, **changes)


def _slice(**changes: Any) -> Slice:
    piece = Slice(
        backfill_id="bf1", slice=0, lower_key=None, upper_key="1000", cursor="250",
        generation=1, state="active", batch_size=100, rows_done=250, throttled_ms=0,
        updated_at=NOW, key_marks=["1", "1000"], keys_estimate=1_000,
    )  # fmt: skip
    return replace(piece, **changes)


def test_a_planner_total_five_times_too_high_gives_way_to_the_cursor() -> None:
    # The planner read 5,000 rows on a bloated table of 1,000; a quarter of the keys walked.
    total, kind = rows_total(_backfill(), [_slice()])
    assert (kind, total) == ("key-range", pytest.approx(1_000, rel=0.01))
    now = backfill_progress(_backfill(), (250, 1.0), None, [_slice()])
    assert now["percent"] == pytest.approx(25.0, abs=0.2)
    assert now["eta_s"] == 3 and now["estimate_label"] == "key-range estimate"


def test_a_finished_backfill_is_its_exact_count() -> None:
    bf = _backfill(state="succeeded", rows_done=998)
    now = backfill_progress(bf, (0, 0.0), None, [_slice(state="done", rows_done=998)])
    assert (now["rows_total"], now["percent"], now["estimate"]) == (998, 100.0, "counted")
    assert now["estimate_label"] == "exact count"


def test_a_counted_total_and_slices_without_marks_keep_the_creation_estimate() -> None:
    assert rows_total(_backfill(estimate_kind="counted"), [_slice()]) == (5_000, "counted")
    unmarked = _slice(key_marks=None, keys_estimate=None)
    assert rows_total(_backfill(estimate_kind="planner"), [unmarked]) == (5_000, "planner")
