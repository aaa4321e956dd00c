"""The data a rollback would destroy: the tables and columns a downgrade drops, read off its
offline SQL (jobs/project/offline.py), that hold rows in the database at hand.

``rollback --to`` (jobs/api/runs.py) asks it of one target; a rollout's rollback
(jobs/api/rollouts.py) of every member it advanced, rendering each revision once for them all.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from jobs.project.runtime import Project
    from jobs.project.scripts import Revision

Drop = tuple[str, "str | None"]  # (table, column); column None when the table goes

_DROP_TABLE = re.compile(r"DROP TABLE (?:IF EXISTS )?([\w.\"]+)", re.IGNORECASE)
_DROP_COLUMN = re.compile(
    r"ALTER TABLE (?:ONLY )?([\w.\"]+) DROP COLUMN (?:IF EXISTS )?([\w\"]+)", re.IGNORECASE
)


def downgrade_drops(project: Project, rev: Revision) -> list[Drop]:
    """The tables and columns ``rev``'s downgrade drops."""
    sql = project.downgrade_sql(rev)
    drops: list[Drop] = [(m.group(1), None) for m in _DROP_TABLE.finditer(sql)]
    return drops + [(m.group(1), m.group(2)) for m in _DROP_COLUMN.finditer(sql)]


class DropsOnce:
    """``downgrade_drops`` rendered once per project and revision, from any thread: Alembic's
    offline context is one per process, so renders take turns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], list[Drop]] = {}

    def __call__(self, project: Project, rev: Revision) -> list[Drop]:
        key = (str(project.target.alembic_ini), rev.id)
        with self._lock:
            if key not in self._seen:
                self._seen[key] = downgrade_drops(project, rev)
            return self._seen[key]


def data_loss(
    conn: Connection,
    project: Project,
    revisions: list[Revision],
    drops_of: DropsOnce | None = None,
) -> list[str]:
    """What the downgrades of ``revisions`` would destroy: tables and columns holding rows."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    found = []
    for rev in revisions:
        drops = drops_of(project, rev) if drops_of else downgrade_drops(project, rev)
        for table, column in drops:
            where = f" WHERE {column} IS NOT NULL" if column else ""
            try:
                rows = conn.execute(text(f"SELECT count(*) FROM {table}{where}")).scalar_one()
            except DBAPIError:
                rows = 0  # not there (yet): nothing to lose
            finally:
                if conn.in_transaction():
                    conn.rollback()
            if rows:
                what = f"column {table}.{column}" if column else f"table {table}"
                found.append(f"the downgrade of {rev.id} drops {what} holding {rows} rows")
    return found
