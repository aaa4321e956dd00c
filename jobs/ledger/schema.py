"""The ledger's schema ``runbook`` in each target: versioned migrations, applied by runbook
itself, excluded from every backup and restore.
"""

from __future__ import annotations

import functools
from pathlib import Path

from sqlalchemy import Connection, text

from jobs.ledger.sql import query, tx
from jobs.pg.db import ADMISSION_LOCK_KEY

SCHEMA = "runbook"

# Each file upgrades the ledger by one version, in the order of their numbers; never edit
# one that has shipped (tests/unit/ledger/test_queries.py pins their contents). They spell the
# schema ``runbook`` (SCHEMA) literally, as the named queries of jobs/ledger/queries/ do.
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


@functools.cache
def migrations() -> list[str]:
    """The DDL of each ledger version, version 1 first."""
    files = sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    numbers = [int(path.name[:4]) for path in files]
    assert numbers == list(range(1, len(files) + 1)), numbers
    return [path.read_text() for path in files]


def _current(conn: Connection) -> bool:
    """Whether the ledger is there at this runbook's version."""
    there = conn.execute(query("ledger_exists"), {"t": f"{SCHEMA}.ledger_version"}).scalar_one()
    version = conn.execute(query("ledger_version")).scalar() if there else None
    conn.rollback()
    return version == len(migrations())


def exists(conn: Connection) -> bool:
    """Whether this database has a ledger (without creating one)."""
    return bool(conn.execute(query("ledger_exists"), {"t": f"{SCHEMA}.runs"}).scalar_one())


def ensure(conn: Connection) -> None:
    """Create or upgrade the ledger schema; safe to call concurrently. Commits."""
    if _current(conn):  # every admission asks: two reads, no lock, when nothing is to do
        return
    with tx(conn):
        conn.execute(query("take_admission_lock"), {"k": ADMISSION_LOCK_KEY})
        conn.execute(query("create_ledger_schema"))
        conn.execute(query("create_ledger_version"))
        version = conn.execute(query("ledger_version")).scalar()
        for number, ddl in enumerate(migrations(), start=1):
            if version is None or number > version:
                conn.execute(text(ddl))
                conn.execute(query("record_ledger_version"), {"v": number})
