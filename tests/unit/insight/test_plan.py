"""The plan's backfills: what a revision declares, with the rows they would touch (no
database)."""

from __future__ import annotations

from jobs.insight import plan
from tests.unit.revisions import revision_with


def test_declared_backfills_get_estimated_rows() -> None:
    def tables(name: str) -> plan.TableInfo:
        return plan.TableInfo(name=name, exists=True, size_bytes=8192, estimated_rows=42)

    assert plan.backfills(revision_with(), tables) == []
    declared = revision_with(
        backfills=[
            {"table": "big", "set": "v = 1", "where": "v IS NULL", "key": "id", "batch_size": 500},
            {"table": "other", "set": "w = lower(w)"},
        ]
    )
    assert plan.backfills(declared, tables) == [
        {
            "table": "big",
            "set": "v = 1",
            "where": "v IS NULL",
            "key": "id",
            "batch_size": 500,
            "slices": 1,
            "estimated_rows": 42,
        },
        {
            "table": "other",
            "set": "w = lower(w)",
            "where": None,
            "key": None,
            "batch_size": 1000,
            "slices": 1,
            "estimated_rows": 42,
        },
    ]
