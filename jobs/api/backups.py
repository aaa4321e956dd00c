"""Backups and restores: take a backup now, list them, restore one (whole or some tables)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.config import Settings
from jobs.errors import (
    RunbookError,
)
from jobs.lazy import lazy, lazy_callable
from jobs.pg import names
from jobs.states import RunKind

# Loaded on first use, so that `runbook status` pays only for reading the ledger, with plain
# psycopg2 (jobs/ledger/read.py): SQLAlchemy (db, ledger), Alembic (migrate), pglast
# (backfill, sqlguard, plan), boto3 (vault) and rich (plan) come with the commands that need
# them (tests/unit/test_cli_imports.py, tests/integration/test_status_imports.py).
if TYPE_CHECKING:
    from jobs.backups import dump, vault
    from jobs.ledger import backups as ledger_backups
    from jobs.ledger import schema
    from jobs.pg import db
    from jobs.project.runtime import Project
else:
    dump = lazy("jobs.backups.dump")
    vault = lazy("jobs.backups.vault")
    ledger_backups = lazy("jobs.ledger.backups")
    schema = lazy("jobs.ledger.schema")
    db = lazy("jobs.pg.db")
    Project = lazy_callable("jobs.project.runtime", "Project")
from jobs.api.common import admit, resolve_settings


def enqueue_backup(target: str | None = None, *, settings: Settings | None = None) -> str:
    """Queue a run that takes, verifies and records one backup of the target."""
    settings = resolve_settings(settings)
    t = settings.target(target)
    project = Project(t)
    with db.connect(t) as conn:
        current = project.current(conn)
        return admit(
            settings,
            t,
            conn,
            kind=RunKind.BACKUP,
            from_revision=current,
            to_revision=current,
            options={"backup": True},
            backup=True,
        )


def enqueue_restore(
    backup_id: str,
    target: str | None = None,
    *,
    tables: list[str] | None = None,
    settings: Settings | None = None,
) -> str:
    """Queue a restore of a recorded backup: the whole database, or only ``tables``."""
    settings = resolve_settings(settings)
    t = settings.target(target)
    project = Project(t)
    with db.connect(t) as conn:
        found = vault.usable_backup(conn, t, backup_id)
        held = dump.archive_tables(t, Path(found.path))
        for name in tables or []:
            if names.qualified(name) not in held:
                raise RunbookError(f"backup {backup_id} holds no table {name}")
        current = project.current(conn)
        return admit(
            settings,
            t,
            conn,
            kind=RunKind.RESTORE,
            from_revision=current,
            to_revision=found.revision if not tables else current,
            options={"backup": True, "backup_id": backup_id, "tables": tables or []},
            backup=True,
        )


def list_backups(
    target: str | None = None, *, settings: Settings | None = None
) -> list[dict[str, Any]]:
    """The target's backups, newest first."""
    t = resolve_settings(settings).target(target)
    with db.connect(t) as conn:
        if not schema.exists(conn):
            return []
        return [b.as_dict() for b in ledger_backups.list_backups(conn, t.name)]
