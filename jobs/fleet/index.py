"""Where a piece of work lives, asked of the control database on a plain psycopg2 connection:
`runbook status ID` (and resume, cancel, pause) open the one target the index names instead of
every target, and know a rollout's id, without loading SQLAlchemy (jobs/ledger/read.py says
why). ``note`` writes it (jobs/fleet/store.py ``note_work``).
"""

from __future__ import annotations

import logging

from jobs.config import Settings, redact
from jobs.errors import RunbookError
from jobs.fleet import groups

log = logging.getLogger("runbook.index")

# (kind, target or group, rollout id) of an id: a run's entry, else a rollout's own row.
FIND_WORK = (
    "SELECT kind, target, rollout_id FROM runbook_control.work_ids WHERE id = %(id)s "
    "UNION ALL SELECT 'rollout', group_name, id FROM runbook_control.rollouts WHERE id = %(id)s "
    "LIMIT 1"
)
CONTROL_EXISTS = "SELECT to_regclass('runbook_control.work_ids') IS NOT NULL"


def find(settings: Settings, work_id: str) -> tuple[str, str, str | None] | None:
    """(kind, target or group, rollout id) of ``work_id``; None without a control database,
    without an entry, or when the control database cannot be read (the caller then searches
    as it would without one)."""
    if not groups.has_control(settings):
        return None
    from jobs.pg import connect

    try:
        with connect.reading(groups.control_target(settings)) as conn, conn.cursor() as cur:
            cur.execute(CONTROL_EXISTS)
            row = cur.fetchone()
            if not row or not row[0]:
                return None
            cur.execute(FIND_WORK, {"id": work_id})
            found = cur.fetchone()
    except RunbookError:
        return None
    return None if found is None else (str(found[0]), str(found[1]), found[2])


def note(settings: Settings, work_id: str, kind: str, target: str) -> None:
    """Index a run's or a backfill's id under its target in the control database, when there
    is one, so that `status ID` opens that target only (a catalog member's is found at all).
    Best effort: without the entry every ledger of runbook.toml is searched."""
    if not groups.has_control(settings):
        return
    from jobs.fleet import store

    try:
        with store.connect(settings, create=True) as conn:
            store.note_work(conn, work_id, kind, target)
    except Exception as exc:  # the work goes on either way
        log.warning("%s not indexed in the control database: %s", work_id, redact(str(exc)))
