"""Rehearsal: the staging test of pending revisions, on a real copy of production.

The target's backup is restored into a scratch database; there every pending revision goes
up, down and up again, each step timed, each downgrade checked against the schema
fingerprint from before its upgrade. The scratch database is dropped afterwards; the target
is never touched.

Backfills a revision declares really run on the copy, in this process, right after its
upgrade (as an apply runs them after the upgrade): their rows and time are the rehearsal's
measure of the real one, and a contract revision after them (``requires_backfills``) is
rehearsed on filled rows, after the same check an apply makes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from jobs.backfill import control, declared
from jobs.backups import leftovers, snapshot
from jobs.config import Target
from jobs.errors import RehearsalRefused
from jobs.pg import db
from jobs.pg.sqlstate import describe
from jobs.project.runtime import Project
from jobs.project.scripts import DeclaredBackfill, Revision
from jobs.run.verify import fingerprint
from jobs.states import SUCCEEDED


def _timed(action: Any) -> tuple[float, str | None]:
    started = time.monotonic()
    try:
        action()
        return round(time.monotonic() - started, 3), None
    except RehearsalRefused as refused:
        return round(time.monotonic() - started, 3), str(refused)
    except Exception as exc:
        return round(time.monotonic() - started, 3), describe(exc)


def _run_backfill(conn: Connection, scratch: Target, item: DeclaredBackfill) -> dict[str, Any]:
    """Run one declared backfill on the scratch copy to its end; what it did."""
    started = time.monotonic()
    backfill_id = declared.create(conn, scratch, item, run_id=None)
    if control.get(conn, backfill_id).state != SUCCEEDED:  # an empty table is done at once
        declared.run_here(scratch, backfill_id, control.start(conn, backfill_id))
    bf = control.get(conn, backfill_id)
    return {
        "table": item.declared["table"],
        "state": bf.state,
        "rows": bf.rows_done,
        "seconds": round(time.monotonic() - started, 3),
        "error": bf.error,
    }


def _backfills(
    conn: Connection, scratch: Target, rev: Revision, *, only_if_rows_match: bool = False
) -> tuple[list[dict[str, Any]], str | None]:
    """Run ``rev``'s declared backfills on the copy; what each did, and an error or None.
    ``only_if_rows_match``: skip those whose WHERE matches no row (after the second upgrade,
    whose downgrade left the data in place)."""
    done: list[dict[str, Any]] = []
    for item in rev.backfills:
        if only_if_rows_match and not declared.rows_still_matching(conn, item):
            continue
        try:
            result = _run_backfill(conn, scratch, item)
        except Exception as exc:
            return done, f"backfill {item.describe()}: {describe(exc)}"
        done.append(result)
        if result["state"] != SUCCEEDED:
            return done, f"backfill {item.describe()} {result['state']}: {result['error']}"
    return done, None


def _up(conn: Connection, scratch: Target, project: Project, rev: Revision) -> None:
    """Upgrade ``rev`` on the copy as an apply would: its backfill requirements first."""
    unmet = declared.unmet_requirement(conn, scratch.name, project, rev)
    if unmet:
        raise RehearsalRefused(unmet)
    project.upgrade_one(rev)


def _rehearse_revision(
    conn: Connection, scratch: Target, project: Project, rev: Revision, entry: dict[str, Any]
) -> bool:
    """Up, down, up for ``rev`` on the copy, each recorded in ``entry``; whether the
    rehearsal goes on with the next revision (not after an upgrade that failed)."""
    before = fingerprint(conn, scratch.version_table)
    entry["up_s"], entry["up_error"] = _timed(lambda: _up(conn, scratch, project, rev))
    if entry["up_error"]:
        return False
    if rev.backfills:
        entry["backfills"], entry["up_error"] = _backfills(conn, scratch, rev)
        if entry["up_error"]:
            return False
    after = fingerprint(conn, scratch.version_table)
    entry["down_s"], entry["down_error"] = _timed(lambda: project.downgrade_one(rev))
    if entry["down_error"]:
        entry["reversible"] = False
        return True  # still at rev: go on with the next revision
    entry["reversible"] = fingerprint(conn, scratch.version_table) == before
    if not entry["reversible"]:
        entry["down_error"] = "the downgrade did not bring the schema back"
    entry["again_s"], entry["again_error"] = _timed(lambda: project.upgrade_one(rev))
    if entry["again_error"]:
        return False
    if rev.backfills:
        again, entry["again_error"] = _backfills(conn, scratch, rev, only_if_rows_match=True)
        entry["backfills"] += again
        if entry["again_error"]:
            return False
    entry["same_after_again"] = fingerprint(conn, scratch.version_table) == after
    return True


def rehearse(
    target: Target, backup: Path, to: str | None, *, owner: leftovers.Owner | None = None
) -> dict[str, Any]:
    """Up, down, up for each pending revision on a scratch copy; what happened to each.

    ``owner``: the run's delivery, which holds the run lock; what earlier deliveries left
    behind is removed first, and the scratch database's name carries it
    (jobs/backups/leftovers.py).
    """
    results: list[dict[str, Any]] = []
    start: str | None = None
    path: list[Any] = []
    leftovers.before_making(target, owner)
    with snapshot.scratch_copy(target, backup, owner=owner) as scratch:
        scratch_db = str(scratch.url.database)
        project = Project(scratch)
        try:
            with db.connect(scratch) as conn:
                start = project.current(conn)
                path = project.upgrade_path(start, to)
                for rev in path:
                    entry: dict[str, Any] = {"revision": rev.id, "sha256": rev.sha256}
                    results.append(entry)
                    if not _rehearse_revision(conn, scratch, project, rev, entry):
                        break
        finally:
            project.close()
    failed = [r["revision"] for r in results if r.get("up_error") or r.get("again_error")]
    return {
        "from": start,
        "to": to,
        "revisions": results,
        "irreversible": {r["revision"]: r["down_error"] for r in results if r.get("down_error")},
        "upgrades_failed": failed,
        "complete": not failed and len(results) == len(path),
        "scratch_database": scratch_db,  # dropped by now
    }
