"""Preflight: what must hold before an apply takes its backup (a recorded step).

No session may sit on the tables the run touches (idle in a transaction, or running for
longer than ``long_running``): runbook waits up to ``preflight_wait`` for them to go, then
fails before anything changed, naming them. No invalid index may already exist. The backup
directory must have room for the database. The database must be at an ancestor of the
target revision. Every standby and replication slot is recorded, and none may be over the
target's bounds unless ``replicas = "ignore"`` (jobs/run/replicas.py).
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from sqlalchemy import Connection, text

from jobs.config import Target
from jobs.errors import PreflightFailed
from jobs.pg import replication
from jobs.project.runtime import Project
from jobs.run import replicas

# Catalog only: no lock on the tables, so an application's lock cannot stall preflight.
_INVALID_INDEXES = text(
    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_index i "
    "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE NOT i.indisvalid AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "ORDER BY 1"
)

_BLOCKERS = text(
    """
    SELECT DISTINCT a.pid, coalesce(nullif(a.application_name, ''), a.usename::text) AS who,
           a.state, extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))::int AS age,
           format('%I.%I', n.nspname, c.relname) AS relation
    FROM pg_locks l
    JOIN pg_stat_activity a ON a.pid = l.pid
    JOIN pg_class c ON c.oid = l.relation
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE l.granted AND a.pid <> pg_backend_pid() AND a.datname = current_database()
      AND a.application_name NOT LIKE 'runbook:%'
      AND (c.relname = ANY(:tables) OR format('%I.%I', n.nspname, c.relname) = ANY(:tables))
      AND (a.state LIKE 'idle in transaction%'
           OR now() - coalesce(a.xact_start, a.query_start) > make_interval(secs => :long))
    ORDER BY age DESC
    """
)


def blockers(conn: Connection, tables: list[str], long_running_s: float) -> list[dict[str, Any]]:
    """Sessions holding locks on ``tables`` that are idle in a transaction or long-running."""
    rows = conn.execute(_BLOCKERS, {"tables": tables, "long": long_running_s}).all()
    if conn.in_transaction():
        conn.rollback()
    return [dict(r._mapping) for r in rows]


def _describe(found: list[dict[str, Any]]) -> str:
    first = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return (
        f"session {first['pid']} ({first['who']}, {first['state']}, {first['age']}s) holds a "
        f"lock on {first['relation']}{more}"
    )


def _replication(conn: Connection, target: Target, checked: dict[str, Any]) -> dict[str, Any]:
    """Every standby and slot, recorded; PreflightFailed (with them) when one is over the
    target's bounds."""
    bounds = replication.Bounds.of_target(target)
    rep = replicas.read(conn, target)
    found = replicas.facts(rep, bounds)
    refused = replicas.refusal(replication.over_bounds(rep, bounds), target.name)
    if refused:
        raise PreflightFailed(refused, **checked, replication=found)
    return found


def preflight(
    conn: Connection,
    target: Target,
    project: Project,
    from_revision: str | None,
    to_revision: str | None,
    tables: list[str],
    *,
    backup: bool,
) -> dict[str, Any]:
    """Every precondition, in order; PreflightFailed with one line at the first that fails."""
    current = project.current(conn)
    if current != from_revision:
        raise PreflightFailed(
            f"the database is at {current or 'base'}, not {from_revision or 'base'} as when "
            "the run was enqueued; enqueue it again"
        )
    project.upgrade_path(current, to_revision)  # an ancestor of the target revision
    bad = [str(r[0]) for r in conn.execute(_INVALID_INDEXES)]
    if conn.in_transaction():
        conn.rollback()
    if bad:
        raise PreflightFailed(
            f"invalid index {', '.join(bad)} already present; drop it or rebuild it "
            "(REINDEX INDEX CONCURRENTLY) before migrating"
        )
    checked: dict[str, Any] = {"revision": current, "invalid_indexes": 0}
    checked["replication"] = _replication(conn, target, checked)
    if backup:
        size = int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
        if conn.in_transaction():
            conn.rollback()
        target.backup_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        free = shutil.disk_usage(target.backup_dir).free
        if free < size:
            raise PreflightFailed(
                f"backup_dir {target.backup_dir} has {free >> 20} MiB free, less than the "
                f"database's {size >> 20} MiB; free space or set backup_dir"
            )
        checked.update(database_bytes=size, backup_dir_free_bytes=free)
    deadline = time.monotonic() + target.preflight_wait_s
    waited = 0.0
    while tables:
        found = blockers(conn, tables, target.long_running_s)
        if not found:
            break
        if time.monotonic() >= deadline:
            raise PreflightFailed(
                f"{_describe(found)}; it would block the migration's locks — end it, or wait "
                f"(waited {waited:.0f}s, preflight_wait)"
            )
        time.sleep(1.0)
        waited += 1.0
    checked.update(tables=tables, waited_s=waited)
    return checked
