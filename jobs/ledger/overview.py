"""Reads across one target's ledger, for `runbook exporter` (jobs/metrics/facts.py): runs by
state, the current and the last finished run, the recent backfills with their progress.

Plain psycopg2 and named SQL with ``%(name)s`` parameters, on the column lists of
jobs/ledger/read.py, for the same reason as there: no SQLAlchemy, so a scrape stays light.
"""

from __future__ import annotations

from typing import Any

from jobs.ledger import read
from jobs.ledger.read import BACKFILL_COLUMNS, RUN_COLUMNS, SCHEMA
from jobs.ledger.records import Backfill, Run, backfill_progress

RUNS_BY_STATE = (
    f"SELECT state, count(*) AS n FROM {SCHEMA}.runs WHERE target = %(target)s GROUP BY state"
)
# The target's unfinished run (one at most: admission refuses a second), newest first.
CURRENT_RUN = (
    f"SELECT {RUN_COLUMNS} FROM {SCHEMA}.runs WHERE target = %(target)s "
    "AND finished_at IS NULL ORDER BY created_at DESC LIMIT 1"
)
LAST_FINISHED_RUN = (
    f"SELECT {RUN_COLUMNS} FROM {SCHEMA}.runs WHERE target = %(target)s "
    "AND finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1"
)
# Backfills not finished, and those finished within the last %(hours)s hours; newest first.
RECENT_BACKFILLS = (
    f"SELECT {BACKFILL_COLUMNS} FROM {SCHEMA}.backfills b WHERE b.target = %(target)s "
    "AND (b.finished_at IS NULL OR b.finished_at > now() - make_interval(hours => %(hours)s)) "
    "ORDER BY b.finished_at IS NOT NULL, b.created_at DESC LIMIT %(n)s"
)
# Each slice's throttled time and the latest reason it waited for (the ledger keeps no time
# per reason).
SLICE_THROTTLES = (
    f"SELECT slice, throttled_ms, throttle_reason FROM {SCHEMA}.backfill_slices "
    "WHERE backfill_id = %(id)s ORDER BY slice"
)


def runs_by_state(conn: Any, target: str) -> dict[str, int]:
    """How many of the target's runs are in each state (states with none are absent)."""
    return {r["state"]: int(r["n"]) for r in read._rows(conn, RUNS_BY_STATE, {"target": target})}


def _run_with_steps(conn: Any, sql: str, target: str) -> Run | None:
    found = read._rows(conn, sql, {"target": target})
    return None if not found else read.get_run(conn, found[0]["id"])


def current_run(conn: Any, target: str) -> Run | None:
    """The target's unfinished run with its steps, or None."""
    return _run_with_steps(conn, CURRENT_RUN, target)


def last_finished_run(conn: Any, target: str) -> Run | None:
    """The target's most recently finished run with its steps, or None."""
    return _run_with_steps(conn, LAST_FINISHED_RUN, target)


def recent_backfills(conn: Any, target: str, hours: int = 24, limit: int = 50) -> list[Backfill]:
    """The target's unfinished backfills and those finished in the last ``hours`` (at most
    ``limit``, unfinished first), their counters summed over their slices."""
    found = read._rows(conn, RECENT_BACKFILLS, {"target": target, "hours": hours, "n": limit})
    return [Backfill(**r) for r in found]


def slice_throttles(conn: Any, backfill_id: str) -> list[tuple[int, int, str | None]]:
    """(slice, throttled milliseconds, latest reason or None) of each slice, in key order."""
    found = read._rows(conn, SLICE_THROTTLES, {"id": backfill_id})
    return [(int(r["slice"]), int(r["throttled_ms"]), r["throttle_reason"]) for r in found]


def progress(conn: Any, bf: Backfill) -> dict[str, Any]:
    """The backfill's progress as `runbook status` shows it (records.backfill_progress)."""
    return backfill_progress(
        bf,
        read.recent_rate(conn, bf.id),
        read.last_throttle(conn, bf.id),
        read.list_slices(conn, bf.id),
    )
