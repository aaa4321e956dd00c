"""The ledger's backups table, and the latest rehearsal of a target."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from jobs.ledger.sql import iso, query, tx


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
            "taken_at": iso(self.taken_at),
            "verified": self.verified,
            "verification": self.verification,
            "copies": self.copies,
            "revision": self.revision,
            "deleted_at": iso(self.deleted_at),
        }
        if with_tables:
            out["tables"] = self.tables
        return out


def record_backup(conn: Connection, backup: Backup) -> None:
    with tx(conn):
        conn.execute(
            query("record_backup"),
            {
                **backup.__dict__,
                "verification": json.dumps(backup.verification),
                "tables": json.dumps(backup.tables),
                "copies": json.dumps(backup.copies),
            },
        )


def get_backup(conn: Connection, backup_id: str) -> Backup | None:
    row = conn.execute(query("get_backup"), {"id": backup_id}).first()
    if conn.in_transaction():
        conn.rollback()
    return Backup(**row._mapping) if row else None


def list_backups(conn: Connection, target: str, *, include_deleted: bool = False) -> list[Backup]:
    rows = conn.execute(
        query("list_backups"), {"t": target, "include_deleted": include_deleted}
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return [Backup(**r._mapping) for r in rows]


def mark_backup_deleted(conn: Connection, backup_id: str) -> None:
    with tx(conn):
        conn.execute(query("mark_backup_deleted"), {"id": backup_id})


def latest_rehearsal(
    conn: Connection, from_revision: str | None, to_revision: str | None
) -> dict[str, Any] | None:
    """The newest rehearsal of exactly these revisions: its run id, state and findings."""
    row = conn.execute(query("latest_rehearsal"), {"f": from_revision, "t": to_revision}).first()
    if conn.in_transaction():
        conn.rollback()
    if row is None:
        return None
    return {"run": row.id, "state": row.state, "finished_at": iso(row.finished_at), **row.detail}
