"""What the ledger recorded of applied revisions: their files' hashes and schema fingerprints."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from jobs.ledger.schema import exists
from jobs.ledger.sql import query
from jobs.states import RunState, StepKind


def applied_file_hashes(conn: Connection) -> list[tuple[str, str, str]]:
    """(revision, file_sha256, run_id) of each revision runbook applied and did not undo:
    per revision, the latest succeeded upgrade or downgrade step decides."""
    rows = conn.execute(query("applied_file_hashes")).all()
    if conn.in_transaction():
        conn.rollback()
    return [
        (r.revision, r.file_sha256, r.run_id)
        for r in rows
        if r.kind == StepKind.UPGRADE and r.run_state != RunState.RESTORED and r.file_sha256
    ]


def ledger_changes(conn: Connection) -> list[Any]:
    """Succeeded upgrade and downgrade steps, newest first: (kind, revision, run_id)."""
    if not exists(conn):
        return []
    rows = conn.execute(query("ledger_changes")).all()
    if conn.in_transaction():
        conn.rollback()
    return list(rows)


def recorded_fingerprints(conn: Connection) -> dict[str, str]:
    """The latest schema fingerprint each revision's verify step recorded."""
    if not exists(conn):
        return {}
    rows = conn.execute(query("recorded_fingerprints")).all()
    if conn.in_transaction():
        conn.rollback()
    return {r.revision: r.fp for r in rows}


def recorded_fingerprint(conn: Connection, revision: str | None) -> str | None:
    """The schema fingerprint a past run's verify step recorded at ``revision``."""
    if revision is None:
        return None
    value = conn.execute(query("recorded_fingerprint"), {"rev": revision}).scalar()
    if conn.in_transaction():
        conn.rollback()
    return str(value) if value else None
