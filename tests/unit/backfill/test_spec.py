"""A backfill's settings, refused before anything is created when they cannot work."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from jobs.backfill.spec import MAX_SLICES, BadSpec, Spec, embed


def spec(**overrides: Any) -> Spec:
    return Spec(**{"table": "items", "key": "id", "set_sql": "v = 1", **overrides})


def test_the_defaults_work_and_are_what_the_ledger_stores() -> None:
    spec().check()
    assert spec().settings() == {
        "batch_size": 1000,
        "min_batch": 100,
        "max_batch": 50000,
        "target_batch_ms": 50,
        "sleep_ms": 0,
        "lock_timeout_ms": 2000,
        "statement_timeout_ms": 30000,
        "max_xact_age_s": 600,
        "max_replica_lag_ms": 2000,
        "max_replica_lag_bytes": 64 << 20,
        "max_retained_wal_bytes": 1 << 30,
        "max_wal_rate_bytes": None,
        "max_throttle_ms": 30 * 60_000,
    }
    spec(min_batch=1, batch_size=1, max_batch=1, slices=MAX_SLICES, on_error="isolate").check()
    spec(sleep_ms=0, max_xact_age_s=0).check()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"set_sql": "  "}, "the backfill has nothing to SET; give --set 'column = expression'"),
        (
            {"batch_size": 10, "min_batch": 100},
            "batch sizes must satisfy 1 <= min (100) <= batch size (10) <= max (50000)",
        ),
        ({"max_batch": 500}, "batch size (1000) <= max (500)"),
        ({"min_batch": 0, "batch_size": 0}, "1 <= min (0)"),
        ({"target_batch_ms": 0}, "target_batch_ms must be at least 1, got 0"),
        ({"lock_timeout_ms": 0}, "lock_timeout_ms must be at least 1, got 0"),
        ({"statement_timeout_ms": -5}, "statement_timeout_ms must be at least 1, got -5"),
        ({"sleep_ms": -1}, "sleep_ms must be 0 or more, got -1"),
        ({"slices": 0}, f"--slices must be between 1 and {MAX_SLICES}, got 0"),
        ({"slices": MAX_SLICES + 1}, f"--slices must be between 1 and {MAX_SLICES}"),
        ({"on_error": "skip"}, "--on-error must be one of stop, isolate, got 'skip'"),
        ({"max_xact_age_s": -1}, "max_xact_age_s must be 0 (off) or more, got -1"),
        ({"max_replica_lag_bytes": 0}, "max_replica_lag_bytes must be at least 1, got 0"),
        ({"max_wal_rate_bytes": 0}, "max_wal_rate_bytes must be at least 1, got 0"),
        ({"max_throttle_ms": -1}, "max_throttle_ms must be at least 1, got -1"),
    ],
)
def test_settings_that_cannot_work_are_refused_in_one_line(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadSpec) as refused:
        spec(**overrides).check()
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_an_embedded_fragment_has_no_bind_parameters() -> None:
    fragment = "note = 'at :noon', w = x::text"
    assert text(f"UPDATE t SET {fragment}").compile().params == {"noon": None}
    clause = text(f"UPDATE t SET {embed(fragment)} WHERE id <= :hi")
    assert list(clause.compile().params) == ["hi"]
    assert str(clause) == f"UPDATE t SET {fragment} WHERE id <= :hi"
