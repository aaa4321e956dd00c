"""Targets and their health: configuration, reachability, revisions and last run."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from jobs.config import Settings
from jobs.errors import (
    RunbookError,
    TargetUnreachable,
)
from jobs.lazy import lazy, lazy_callable

# Loaded on first use, so that `runbook status` pays only for reading the ledger, with plain
# psycopg2 (jobs/ledger/read.py): SQLAlchemy (db, ledger), Alembic (migrate), pglast
# (backfill, sqlguard, plan), boto3 (vault) and rich (plan) come with the commands that need
# them (tests/unit/test_cli_imports.py, tests/integration/test_status_imports.py).
if TYPE_CHECKING:
    from jobs.ledger import runs, schema
    from jobs.pg import db
    from jobs.project.runtime import Project
else:
    runs = lazy("jobs.ledger.runs")
    schema = lazy("jobs.ledger.schema")
    db = lazy("jobs.pg.db")
    Project = lazy_callable("jobs.project.runtime", "Project")
from jobs.api.common import resolve_settings


def _health(settings: Settings, name: str, project: Project | None) -> dict[str, Any]:
    """One target's row of ``targets``: config, reachability, revisions, last run."""
    row: dict[str, Any] = {
        "name": name,
        "ok": False,
        "config": "broken" if name in settings.broken else "ok",
        "database": None,
        "reachable": None,
        "current_revision": None,
        "head": None,
        "pending": None,
        "last_run": None,
        "error": settings.broken.get(name),
    }
    if project is None:
        return row
    t = settings.targets[name]
    row["database"] = t.where
    try:
        head = project.resolve("head")
        with db.connect(t) as conn:
            row["reachable"] = True
            current = project.current(conn)
            pending = project.upgrade_path(current, head)
            last = runs.list_runs(conn, limit=1) if schema.exists(conn) else []
    except TargetUnreachable as exc:
        row.update(reachable=False, error=str(exc))
        return row
    except RunbookError as exc:  # a project or history problem: `runbook doctor` says more
        row["error"] = str(exc)
        return row
    row.update(
        ok=True,
        current_revision=current,
        head=head,
        pending=[r.id for r in pending],
        last_run=(
            None
            if not last
            else {
                "id": last[0].id,
                "kind": last[0].kind,
                "state": last[0].state,
                "finished_at": last[0].finished_at.isoformat() if last[0].finished_at else None,
            }
        ),
    )
    return row


def targets(*, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Every configured target with its health: config valid, database reachable, current
    and head revision, pending revisions, last run. Broken targets are listed, not raised."""
    settings = resolve_settings(settings)
    settings.require_any()
    return _rows(settings, settings.names)


def _rows(settings: Settings, names: list[str]) -> list[dict[str, Any]]:
    """The health rows of ``names``, in that order."""
    from concurrent.futures import ThreadPoolExecutor

    projects: dict[str, Project | None] = {}
    for name in names:
        projects[name] = None
        if name in settings.targets:
            try:
                projects[name] = Project(settings.targets[name])
            except RunbookError as exc:
                settings = dataclasses.replace(settings, broken={**settings.broken, name: str(exc)})
    # Each target is asked on its own connection at once: one slow host does not hold the
    # others up beyond its connect timeout (jobs/pg/db.py).
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda n: _health(settings, n, projects[n]), names))


def group_targets(group: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """A group's members in their rollout order, each with its health and current revision,
    and the fleet's revision mix: how many members are at each revision."""
    from collections import Counter

    from jobs.fleet import groups

    settings = resolve_settings(settings)
    g = groups.group(settings, group)
    found = groups.members(settings, g)
    scoped = dataclasses.replace(
        settings,
        targets={m.name: m.target for m in found if m.target is not None},
        broken={m.name: m.broken or "broken" for m in found if m.target is None},
    )
    rows = _rows(scoped, [m.name for m in found])
    for row, m in zip(rows, found, strict=True):
        row["canary"] = m.canary
    mix = Counter((row["current_revision"] or "base") if row["ok"] else "unknown" for row in rows)
    return {"group": g.name, "members": rows, "revisions": dict(mix.most_common())}
