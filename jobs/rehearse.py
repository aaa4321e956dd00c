"""Rehearsal: the runbook's staging test (§2.3, §6.2) on a real copy of production.

The target's backup is restored into a scratch database; there every pending revision goes
up, down and up again, each step timed, each downgrade checked against the schema
fingerprint from before its upgrade. The scratch database is dropped afterwards; the target
is never touched.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jobs import db, snapshot
from jobs.config import Target
from jobs.migrate import Project, describe
from jobs.verify import fingerprint


def _timed(action: Any) -> tuple[float, str | None]:
    started = time.monotonic()
    try:
        action()
        return round(time.monotonic() - started, 3), None
    except Exception as exc:
        return round(time.monotonic() - started, 3), describe(exc)


def rehearse(target: Target, backup: Path, to: str | None) -> dict[str, Any]:
    """Up, down, up for each pending revision on a scratch copy; what happened to each."""
    results: list[dict[str, Any]] = []
    start: str | None = None
    path: list[Any] = []
    with snapshot.scratch_copy(target, backup) as scratch:
        project = Project(scratch)
        try:
            with db.connect(scratch) as conn:
                start = project.current(conn)
                path = project.upgrade_path(start, to)
                for rev in path:
                    entry: dict[str, Any] = {"revision": rev.id, "sha256": rev.sha256}
                    results.append(entry)
                    before = fingerprint(conn, scratch.version_table)
                    entry["up_s"], entry["up_error"] = _timed(lambda r=rev: project.upgrade_one(r))
                    if entry["up_error"]:
                        break
                    after = fingerprint(conn, scratch.version_table)
                    entry["down_s"], entry["down_error"] = _timed(
                        lambda r=rev: project.downgrade_one(r)
                    )
                    if entry["down_error"]:
                        entry["reversible"] = False
                        continue  # still at rev: go on with the next revision
                    entry["reversible"] = fingerprint(conn, scratch.version_table) == before
                    if not entry["reversible"]:
                        entry["down_error"] = "the downgrade did not bring the schema back"
                    entry["again_s"], entry["again_error"] = _timed(
                        lambda r=rev: project.upgrade_one(r)
                    )
                    if entry["again_error"]:
                        break
                    entry["same_after_again"] = fingerprint(conn, scratch.version_table) == after
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
    }
