"""At a backfill's creation, what its progress is later drawn from (jobs/ledger/estimate.py):
each slice's key marks (keys at equal rank fractions of the slice) and its number of keys,
from one sample of the table's keys.

Counting the rows exactly is tried first, under a small time budget (keys.estimate_rows);
these marks are for the tables where it did not finish. The planner's page ratio, which a
bloated table inflates several times (every UPDATE leaves a dead row version behind), sizes
only the sample: the sampled keys, not the planner, say how many keys each slice holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from jobs.backfill.keys import Table, quote
from jobs.ledger.estimate import KEY_RANGE, NUMERIC_KEY_TYPES, SAMPLED, key_value

SAMPLE_ROWS = 30_000  # the rows (by the planner's count) the sample aims at
SAMPLE_BLOCKS = 5_000  # and the heap blocks with live rows it holds at least
INNER_MARKS = 100  # marks inside each slice, besides its first and last key
# Numeric marks all this close to a straight line between the slice's ends: the keys are
# dense (or evenly spread), and the key span alone places a cursor, free of sampling noise.
LINEAR_WITHIN = 0.01


@dataclass(frozen=True)
class SliceMarks:
    marks: list[str]  # ascending; marks[i] at rank fraction i / (len - 1)
    keys: int  # keys in the slice, estimated from the sample


@dataclass(frozen=True)
class Marks:
    slices: list[SliceMarks]
    kind: str  # KEY_RANGE or SAMPLED

    @property
    def keys(self) -> int:
        return sum(s.keys for s in self.slices)


def _first_key(conn: Connection, table: Table, key: str) -> str:
    """The smallest key (slice 0 starts there; the others after the previous one's last)."""
    sql = f"SELECT CAST(t.{quote(key)} AS text) FROM {table.name} t ORDER BY t.{quote(key)} LIMIT 1"
    return str(conn.execute(text(sql)).scalar_one())


def _linear(marks: list[str], key_type: str, within: float) -> bool:
    """Whether every inner mark lies within ``within`` (a rank fraction) of the straight line
    between the slice's first and last key."""
    values = [key_value(m, key_type) for m in marks]
    first, last = values[0], values[-1]
    if not isinstance(first, int) or not isinstance(last, int) or last <= first:
        return False
    step = 1.0 / (len(values) - 1)
    return all(
        abs((int(v) - first) / (last - first) - i * step) <= within for i, v in enumerate(values)
    )


def _sample(
    conn: Connection, table: Table, column: str, key_type: str, bounds: list[str], percent: float
) -> tuple[dict[int, Any], int]:
    """Per slice (by number) the sampled keys' count and marks; the heap blocks sampled."""
    sample = f" TABLESAMPLE SYSTEM ({percent})" if percent < 100.0 else ""
    fractions = [i / (INNER_MARKS + 1) for i in range(1, INNER_MARKS + 1)]
    rows = conn.execute(
        text(
            "SELECT q.n, count(*) AS keys, count(DISTINCT q.block) AS blocks, "
            "CAST(percentile_disc(CAST(:f AS float8[])) WITHIN GROUP (ORDER BY q.k) AS text[]) "
            f"AS marks FROM (SELECT {column} AS k, (CAST(CAST(t.ctid AS text) AS point))[0] "
            f"AS block, (SELECT count(*) FROM unnest(CAST(:b AS {key_type}[])) b "
            f"WHERE b < {column}) AS n FROM {table.name} t{sample}) q GROUP BY q.n"
        ),
        {"f": fractions, "b": bounds},
    ).all()
    return {int(r.n): r for r in rows}, sum(int(r.blocks) for r in rows)


def sample_marks(
    conn: Connection, table: Table, key: str, key_type: str, bounds: list[str], table_rows: int
) -> Marks:
    """Each slice's marks and keys (``bounds``: the slices' last keys, ascending), from a
    TABLESAMPLE SYSTEM of about SAMPLE_ROWS rows and at least SAMPLE_BLOCKS heap blocks that
    hold live rows (the whole table when it is smaller). Keys in a block are often neighbours
    (serial keys), so the blocks, not the rows, bound the sample's noise; a bloated table's
    blocks are mostly dead rows, hence a second, larger sample when too few held live ones."""
    pages = conn.execute(
        text("SELECT pg_relation_size(:oid) / current_setting('block_size')::int"),
        {"oid": table.oid},
    ).scalar_one()
    percent = min(
        100.0, 100.0 * max(SAMPLE_ROWS / max(table_rows, 1), SAMPLE_BLOCKS / max(pages, 1))
    )
    column = f"t.{quote(key)}"
    found, blocks = _sample(conn, table, column, key_type, bounds, percent)
    if percent < 100.0 and blocks < SAMPLE_BLOCKS:
        percent = min(100.0, percent * SAMPLE_BLOCKS / max(blocks, 1))
        found, blocks = _sample(conn, table, column, key_type, bounds, percent)
    scale = 100.0 / percent
    first = _first_key(conn, table, key)
    slices: list[SliceMarks] = []
    for number, upper in enumerate(bounds):
        start = bounds[number - 1] if number else first
        row = found.get(number)
        inner = [] if row is None else list(row.marks)
        marks = [start, *_inside(inner, start, upper, key_type), upper]
        slices.append(SliceMarks(marks, round(max(row.keys if row else 0, 1) * scale)))
    # Marks from a partial sample wander off the line by its noise even where keys are dense.
    within = LINEAR_WITHIN if percent >= 100.0 else max(LINEAR_WITHIN, 2 / max(blocks, 1) ** 0.5)
    numeric = key_type in NUMERIC_KEY_TYPES
    if numeric and all(_linear(s.marks, key_type, within) for s in slices):
        return Marks([SliceMarks([s.marks[0], s.marks[-1]], s.keys) for s in slices], KEY_RANGE)
    return Marks(slices, SAMPLED)


def _inside(inner: list[str], start: str, upper: str, key_type: str) -> list[str]:
    """The sampled marks strictly between the slice's ends (numeric keys compared as such)."""
    if key_type not in NUMERIC_KEY_TYPES:
        return [m for m in inner if m != start and m != upper]
    lo, hi = key_value(start, key_type), key_value(upper, key_type)
    return [m for m in inner if lo < key_value(m, key_type) < hi]  # type: ignore[operator]
