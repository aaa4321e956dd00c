"""A target's backups: taken, proven restorable, copied, recorded, kept, and found again.

``jobs.backups.dump`` runs the PostgreSQL tools; this module decides what makes a backup one we
trust: a dump and per-table statistics from one snapshot, a trial restore into a scratch
database that reproduces those statistics (below a size threshold), a second copy checked by
sha256, and a record in the ledger. A restore is only ever done from a backup whose file
still matches its sha256.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from jobs.backups import copies, dump, leftovers, snapshot
from jobs.config import Target
from jobs.errors import BackupError, RestoreCheckFailed, UnknownBackup
from jobs.ledger import backups, schema
from jobs.pg import names


@dataclass
class BackupInfo:
    id: str
    path: str
    size: int
    sha256: str
    verified: bool
    verification: dict[str, Any]
    taken_at: str
    copies: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """What the run records (the per-table statistics live in the backups table)."""
        out = asdict(self)
        out.pop("tables")
        return out

    def ledger_row(self, target: str, run_id: str | None, revision: str | None) -> backups.Backup:
        return backups.Backup(
            id=self.id,
            target=target,
            run_id=run_id,
            path=self.path,
            size=self.size,
            sha256=self.sha256,
            taken_at=datetime.fromisoformat(self.taken_at),
            verified=self.verified,
            verification=self.verification,
            tables=self.tables,
            copies=self.copies,
            revision=revision,
            deleted_at=None,
        )


def take_backup(target: Target, run_id: str, *, delivery: int | None = None) -> BackupInfo:
    """Dump ``target``, prove the dump, copy it; BackupError with one line otherwise.

    ``delivery``: the run's delivery taking it, which holds the run lock
    (jobs/backups/leftovers.py):
    what earlier deliveries left behind is removed first, and the scratch database and the
    partial file carry it.
    """
    owner = leftovers.Owner(run_id, delivery) if delivery is not None else None
    leftovers.before_making(target, owner)
    path, final, taken_at = dump.new_backup_file(target, run_id, delivery)
    try:
        dumped = snapshot.dump_with_stats(
            target, path, max_checksum_bytes=target.verify_restore_max_bytes
        )
        size = path.stat().st_size
        if size == 0:
            raise BackupError("pg_dump wrote an empty file; the backup cannot be trusted")
        entries = dump.list_entries(target, path)
        verification: dict[str, Any] = {"list": f"pg_restore --list read {entries} entries"}
        if target.verify_restore and size <= target.verify_restore_max_bytes:
            verification["restore"] = snapshot.verify_by_restore(
                target, path, dumped["tables"], owner=owner
            )
        else:
            why = (
                "verify_restore = false"
                if not target.verify_restore
                else (f"{size} bytes is above verify_restore_max_bytes")
            )
            verification["restore"] = f"skipped ({why}); list check only"
        digest = dump.sha256_file(path)
        made = []
        if target.backup_copy_to:
            made.append(copies.copy_backup(path, target.backup_copy_to, digest, name=final.name))
        dump.finish_backup_file(path, final)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return BackupInfo(
        id=uuid.uuid4().hex[:12],
        path=str(final),
        size=size,
        sha256=digest,
        verified=True,
        verification=verification,
        taken_at=taken_at,
        copies=made,
        tables=dumped["tables"],
    )


def apply_retention(conn: Connection, target: Target, keep: set[str] | None = None) -> list[str]:
    """Remove all but the newest ``keep_backups`` backups of the target (files and copies);
    never one in ``keep`` (the backup a restore run is about to use)."""
    removed = []
    for old in backups.list_backups(conn, target.name)[target.keep_backups :]:
        if old.id in (keep or set()):
            continue
        Path(old.path).unlink(missing_ok=True)
        for copy in old.copies:
            try:
                copies.delete_copy(copy["location"])
            except BackupError:
                continue  # a copy already gone must not keep the rest from being removed
        backups.mark_backup_deleted(conn, old.id)
        removed.append(old.id)
    return removed


def find(conn: Connection, target: Target, backup_id: str) -> backups.Backup:
    """The recorded backup ``backup_id`` of ``target``; UnknownBackup otherwise."""
    found = backups.get_backup(conn, backup_id) if schema.exists(conn) else None
    if found is None or found.target != target.name:
        raise UnknownBackup(
            f"unknown backup {backup_id!r} for target {target.name!r}; "
            f"`runbook backups --target {target.name}` lists them"
        )
    if found.deleted_at is not None:
        raise UnknownBackup(f"backup {backup_id} was removed by retention (keep_backups)")
    return found


def usable_backup(conn: Connection, target: Target, backup_id: str) -> backups.Backup:
    """A backup whose file is here and matches its sha256, fetched back from a copy if
    the local file is gone. Never restore a corrupt dump."""
    found = find(conn, target, backup_id)
    path = Path(found.path)
    if not path.exists():
        for copy in found.copies:
            try:
                copies.fetch_copy(copy["location"], path)
                break
            except BackupError:
                continue
    if not path.exists():
        raise BackupError(
            f"backup {backup_id}: file {path} is missing and no copy could be fetched"
        )
    actual = dump.sha256_file(path)
    if actual != found.sha256:
        raise BackupError(
            f"backup {backup_id}: {path} does not match its recorded sha256 (corrupt or "
            "replaced); refusing to restore it"
        )
    return found


def check_restored(
    conn: Connection, backup: backups.Backup, tables: list[str], current: str | None
) -> dict[str, Any]:
    """Prove the target now holds what the backup holds: every table's rows and content
    checksum (or just the restored ``tables``), and, for a whole restore, the revision."""
    wanted = {names.qualified(t) for t in tables} if tables else set(backup.tables)
    hashed = {t for t in wanted if (backup.tables.get(t) or {}).get("checksum")}
    now = snapshot.table_stats(conn, hash_only=hashed)  # hash only what can be compared
    if not tables and set(now) != wanted:
        extra = sorted(set(now) - wanted) or sorted(wanted - set(now))
        raise RestoreCheckFailed(f"after the restore the tables differ from the backup: {extra[0]}")
    for name in sorted(wanted):
        expected, got = backup.tables.get(name), now.get(name)
        if expected is None or got is None:
            raise RestoreCheckFailed(f"after the restore table {name} is missing")
        if expected["rows"] != got["rows"]:
            raise RestoreCheckFailed(
                f"after the restore table {name} holds {got['rows']} rows, the backup "
                f"{expected['rows']}"
            )
        if snapshot.comparable(expected.get("checksum"), got.get("checksum")) and (
            expected["checksum"] != got["checksum"]
        ):
            raise RestoreCheckFailed(f"after the restore table {name}'s content differs")
    if not tables and current != backup.revision:
        raise RestoreCheckFailed(
            f"after the restore the database is at {current}, the backup at {backup.revision}"
        )
    return {"tables": len(wanted), "rows": sum(now[t]["rows"] for t in wanted), "revision": current}
