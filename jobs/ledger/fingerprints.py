"""What the ledger recorded of applied revisions: their files' hashes and schema fingerprints."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

from jobs.ledger.read import SCHEMA
from jobs.ledger.schema import exists
from jobs.states import RunState, StepKind


def applied_file_hashes(conn: Connection) -> list[tuple[str, str, str]]:
    """(revision, file_sha256, run_id) of each revision runbook applied and did not undo:
    per revision, the latest succeeded upgrade or downgrade step decides."""
    rows = conn.execute(
        text(
            "SELECT DISTINCT ON (s.revision) s.revision, s.kind, s.run_id, r.state AS run_state, "
            "s.detail->>'file_sha256' AS file_sha256 "
            f"FROM {SCHEMA}.steps s JOIN {SCHEMA}.runs r ON r.id = s.run_id "
            "WHERE s.kind IN ('upgrade', 'downgrade') AND s.state = 'succeeded' "
            "AND s.revision <> '' ORDER BY s.revision, s.id DESC"
        )
    ).all()
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
    rows = conn.execute(
        text(
            f"SELECT kind, revision, run_id FROM {SCHEMA}.steps "
            "WHERE kind IN ('upgrade', 'downgrade') AND state = 'succeeded' AND revision <> '' "
            "ORDER BY id DESC"
        )
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return list(rows)


def recorded_fingerprints(conn: Connection) -> dict[str, str]:
    """The latest schema fingerprint each revision's verify step recorded."""
    if not exists(conn):
        return {}
    rows = conn.execute(
        text(
            "SELECT DISTINCT ON (revision) revision, detail->>'fingerprint' AS fp "
            f"FROM {SCHEMA}.steps WHERE kind = 'verify' AND state = 'succeeded' "
            "AND detail->>'fingerprint' IS NOT NULL ORDER BY revision, id DESC"
        )
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return {r.revision: r.fp for r in rows}


def recorded_fingerprint(conn: Connection, revision: str | None) -> str | None:
    """The schema fingerprint a past run's verify step recorded at ``revision``."""
    if revision is None:
        return None
    value = conn.execute(
        text(
            f"SELECT detail->>'fingerprint' FROM {SCHEMA}.steps WHERE kind = 'verify' "
            "AND revision = :rev AND state = 'succeeded' ORDER BY id DESC LIMIT 1"
        ),
        {"rev": revision},
    ).scalar()
    if conn.in_transaction():
        conn.rollback()
    return str(value) if value else None
