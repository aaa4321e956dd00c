"""The ledger's backups table, and the latest rehearsal of a target."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from jobs.ledger.read import (
    SCHEMA,
)
from jobs.ledger.records import iso as _iso
from jobs.ledger.sql import tx


@dataclass
class Backup:
    id: str
    target: str
    run_id: str | None
    path: str
    size: int
    sha256: str
    taken_at: datetime
    verified: bool
    verification: dict[str, Any]
    tables: dict[str, Any]
    copies: list[dict[str, Any]]
    revision: str | None
    deleted_at: datetime | None

    def as_dict(self, *, with_tables: bool = False) -> dict[str, Any]:
        out = {
            "id": self.id,
            "target": self.target,
            "run": self.run_id,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "taken_at": _iso(self.taken_at),
            "verified": self.verified,
            "verification": self.verification,
            "copies": self.copies,
            "revision": self.revision,
            "deleted_at": _iso(self.deleted_at),
        }
        if with_tables:
            out["tables"] = self.tables
        return out


_BACKUP_COLUMNS = (
    "id, target, run_id, path, size, sha256, taken_at, verified, verification, tables, "
    "copies, revision, deleted_at"
)


def record_backup(conn: Connection, backup: Backup) -> None:
    with tx(conn):
        conn.execute(
            text(
                f"INSERT INTO {SCHEMA}.backups ({_BACKUP_COLUMNS}) VALUES (:id, :target, "
                ":run_id, :path, :size, :sha256, :taken_at, :verified, CAST(:verification AS "
                "jsonb), CAST(:tables AS jsonb), CAST(:copies AS jsonb), :revision, :deleted_at)"
            ),
            {
                **backup.__dict__,
                "verification": json.dumps(backup.verification),
                "tables": json.dumps(backup.tables),
                "copies": json.dumps(backup.copies),
            },
        )


def get_backup(conn: Connection, backup_id: str) -> Backup | None:
    row = conn.execute(
        text(f"SELECT {_BACKUP_COLUMNS} FROM {SCHEMA}.backups WHERE id = :id"), {"id": backup_id}
    ).first()
    if conn.in_transaction():
        conn.rollback()
    return Backup(**row._mapping) if row else None


def list_backups(conn: Connection, target: str, *, include_deleted: bool = False) -> list[Backup]:
    rows = conn.execute(
        text(
            f"SELECT {_BACKUP_COLUMNS} FROM {SCHEMA}.backups WHERE target = :t "
            + ("" if include_deleted else "AND deleted_at IS NULL ")
            + "ORDER BY taken_at DESC"
        ),
        {"t": target},
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return [Backup(**r._mapping) for r in rows]


def mark_backup_deleted(conn: Connection, backup_id: str) -> None:
    with tx(conn):
        conn.execute(
            text(f"UPDATE {SCHEMA}.backups SET deleted_at = now() WHERE id = :id"),
            {"id": backup_id},
        )


def latest_rehearsal(
    conn: Connection, from_revision: str | None, to_revision: str | None
) -> dict[str, Any] | None:
    """The newest rehearsal of exactly these revisions: its run id, state and findings."""
    row = conn.execute(
        text(
            f"SELECT r.id, r.state, r.finished_at, s.detail FROM {SCHEMA}.runs r "
            f"JOIN {SCHEMA}.steps s ON s.run_id = r.id AND s.kind = 'rehearse' "
            "WHERE r.kind = 'rehearse' AND r.state IN ('succeeded', 'failed') "
            "AND r.from_revision IS NOT DISTINCT FROM :f AND r.to_revision IS NOT DISTINCT FROM :t "
            "ORDER BY r.created_at DESC LIMIT 1"
        ),
        {"f": from_revision, "t": to_revision},
    ).first()
    if conn.in_transaction():
        conn.rollback()
    if row is None:
        return None
    return {"run": row.id, "state": row.state, "finished_at": _iso(row.finished_at), **row.detail}
