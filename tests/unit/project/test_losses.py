"""The drops a downgrade's offline SQL shows, rendered once per revision however many members
(threads) ask (jobs/project/losses.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from jobs.project.losses import DropsOnce, downgrade_drops

SQL = {
    "r1": 'DROP TABLE IF EXISTS push_subscriptions;\nDROP TABLE "audit"."log";',
    "r2": "ALTER TABLE ONLY items DROP COLUMN IF EXISTS note;\nALTER TABLE items ADD COLUMN x int;",
    "r3": "CREATE INDEX i ON items (sku);",
}


class Rendering:
    """A project whose offline rendering is slow and counts its calls, refusing to be
    entered by two threads at once, as Alembic's one offline context per process would."""

    def __init__(self, ini: str = "/p/alembic.ini") -> None:
        self.target = SimpleNamespace(alembic_ini=Path(ini))
        self.calls: list[str] = []
        self._inside = threading.Lock()

    def downgrade_sql(self, rev: Any) -> str:
        assert self._inside.acquire(blocking=False), "two renders at once"
        try:
            time.sleep(0.01)
            self.calls.append(rev.id)
            return SQL[rev.id]
        finally:
            self._inside.release()


def rev(rid: str) -> Any:
    return SimpleNamespace(id=rid)


def test_drops_of_tables_and_columns() -> None:
    project: Any = Rendering()
    assert downgrade_drops(project, rev("r1")) == [
        ("push_subscriptions", None),
        ('"audit"."log"', None),
    ]
    assert downgrade_drops(project, rev("r2")) == [("items", "note")]
    assert downgrade_drops(project, rev("r3")) == []


def test_each_revision_rendered_once_for_many_threads() -> None:
    project: Any = Rendering()
    drops_of = DropsOnce()
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda i: drops_of(project, rev(f"r{i % 3 + 1}")), range(48)))
    assert sorted(project.calls) == ["r1", "r2", "r3"]
    assert found[1] == [("items", "note")] and found[2] == []


def test_another_project_is_rendered_apart() -> None:
    one: Any = Rendering("/one/alembic.ini")
    other: Any = Rendering("/other/alembic.ini")
    drops_of = DropsOnce()
    drops_of(one, rev("r2"))
    drops_of(other, rev("r2"))
    drops_of(one, rev("r2"))
    assert (one.calls, other.calls) == (["r2"], ["r2"])
