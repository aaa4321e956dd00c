"""How the ledger modules talk SQL: cached statements, a transaction helper, and the
redaction of messages before they are stored.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Connection, text

from jobs.config import redact

# The statements a backfill batch runs each time, parsed once (text() costs ~50 us each).
cached_text = functools.lru_cache(maxsize=256)(text)


def tx(conn: Connection) -> Any:
    """A fresh transaction. Ledger writes commit inside their own block, so whatever is
    still open here is a read left by SQLAlchemy's autobegin (or one a lock timeout
    aborted): rolling it back loses nothing."""
    if conn.in_transaction():
        conn.rollback()
    return conn.begin()


def clean(message: str | None) -> str | None:
    return None if message is None else redact(message)
