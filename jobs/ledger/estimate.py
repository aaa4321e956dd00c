"""A backfill's total drawn from where its slices' cursors stand in their key ranges.

Creation (jobs/backfill/marks.py) stores with each slice its key marks: keys at equal rank
fractions of the slice (the first at 0, the slice's last key at 1) and how many keys the slice
holds. Here, at status time and from those rows alone, each slice's walked fraction is the
cursor's place among its marks; the rows done per key walked (which carries a WHERE that skips
rows) turn the keys left into rows left. No statement is run: plain arithmetic, cheap enough
for every status call and every progress event.

Keys are compared as numbers for integers and uuids (a uuid's 128 bits, the order PostgreSQL
sorts them in) and interpolated between marks; text keys compare as Python strings (code
point order, which is PostgreSQL's under the C collation) and step from mark to mark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# What a backfill's total is (jobs/ledger/migrations/0007_progress_estimate.sql).
COUNTED = "counted"  # the rows to update, counted exactly (or rows done, once finished)
KEY_RANGE = "key-range"  # cursors within integer or uuid key ranges, calibrated by rows done
SAMPLED = "sampled"  # cursors among sampled key quantiles, calibrated by rows done
PLANNER = "planner"  # the planner's guess, before any row is done (or with no marks)

# How each kind reads in `runbook status` and Flower.
KIND_LABELS = {
    COUNTED: "exact count",
    KEY_RANGE: "key-range estimate",
    SAMPLED: "sampled estimate",
    PLANNER: "planner",
}
NUMERIC_KEY_TYPES = frozenset({"smallint", "integer", "bigint", "uuid"})


def key_value(key: str, key_type: str) -> int | str:
    """A key as it orders: a number for integers and uuids, else the text itself."""
    if key_type == "uuid":
        return int(key.replace("-", ""), 16)
    if key_type in NUMERIC_KEY_TYPES:
        return int(key)
    return key


def walked_fraction(marks: Sequence[str], cursor: str | None, key_type: str) -> float:
    """The share of a slice's keys at or below ``cursor``: ``marks[i]`` stands at rank
    fraction i / (len - 1); between two marks, numeric keys interpolate by value and text
    keys take the middle."""
    if cursor is None or len(marks) < 2:
        return 0.0
    at = key_value(cursor, key_type)
    values = [key_value(m, key_type) for m in marks]
    if at <= values[0]:  # type: ignore[operator]
        return 0.0
    if at >= values[-1]:  # type: ignore[operator]
        return 1.0
    step = 1.0 / (len(values) - 1)
    for i in range(1, len(values)):
        lo, hi = values[i - 1], values[i]
        if at < hi:  # type: ignore[operator]
            if isinstance(at, int) and isinstance(lo, int) and isinstance(hi, int) and hi > lo:
                return (i - 1 + (at - lo) / (hi - lo)) * step
            return (i - 0.5) * step
    return 1.0  # not reached: the last mark is above the cursor


@dataclass(frozen=True)
class SliceWalk:
    """One slice as the estimate sees it."""

    keys: int  # the keys it held at creation (counted or sampled)
    walked: float  # the share of them walked, 0..1
    rows_done: int


def estimate_total(walks: Sequence[SliceWalk], fallback: int) -> int:
    """Rows done plus rows left, where rows left = rows done per key walked x keys left;
    ``fallback`` (creation's estimate) until a walked key has updated a row."""
    done = sum(w.rows_done for w in walks)
    walked = sum(w.keys * w.walked for w in walks)
    left = sum(w.keys * (1.0 - w.walked) for w in walks)
    if walked <= 0 or done <= 0:
        return max(fallback, done)
    return done + round(done / walked * left)
