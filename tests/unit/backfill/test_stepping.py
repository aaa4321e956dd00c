"""Integer keys stepped by arithmetic (jobs/backfill/walk.py STEPPED_KEY_TYPES): never past
the slice's last key, only after the index showed the keys dense, given up after a stepped
batch that updated nothing and every RECHECK_EVERY batches; never for other key types."""

from __future__ import annotations

from datetime import UTC, datetime

from jobs.backfill import walk
from jobs.ledger.records import Slice


def piece(cursor: str | None, upper: str = "1000", lower: str | None = None) -> Slice:
    return Slice("b", 0, lower, upper, cursor, 1, "active", 100, 0, 0, datetime.now(UTC))


def fresh() -> walk._Walk:
    return walk._Walk(lambda: None, "b", 0, 1, 5)  # type: ignore[arg-type,return-value]


def test_a_step_is_size_key_values_and_stops_at_the_slices_last_key() -> None:
    w = fresh()
    assert w.step(piece("100"), 250) == "350"
    assert w.step(piece("900"), 250) == "1000"
    assert w.step(piece("1000"), 250) is None
    assert w.step(piece("-50", upper="10"), 20) == "-30"


def test_dense_keys_are_stepped_until_a_recheck_or_an_empty_batch() -> None:
    w = fresh()
    w.judge_density("bigint", "0", "105", 100, stepped=False)  # 100 keys over 105 values
    assert w.steps_left == walk.RECHECK_EVERY
    w.last_rows = 100
    for _ in range(walk.RECHECK_EVERY):
        w.judge_density("bigint", "0", "100", 100, stepped=True)
    assert w.steps_left == 0  # the index is asked again
    w.judge_density("integer", "0", "100", 100, stepped=False)
    w.last_rows = 0
    w.judge_density("integer", "100", "200", 100, stepped=True)
    assert w.steps_left == 0  # a gap, maybe: the index finds its end


def test_sparse_first_and_other_key_types_are_never_stepped() -> None:
    w = fresh()
    w.judge_density("bigint", "0", "300", 100, stepped=False)  # one key in three values
    assert w.steps_left == 0
    w.judge_density("bigint", None, "100", 100, stepped=False)  # no lower end to measure
    assert w.steps_left == 0
    w.judge_density("uuid", "a", "b", 100, stepped=False)
    assert w.steps_left == 0
