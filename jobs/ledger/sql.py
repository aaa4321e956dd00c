"""How the ledger modules talk SQL: named queries, a transaction helper, and the redaction of
messages before they are stored.

The ledger's statements live in jobs/ledger/queries/*.sql, one file per table family, in
procrastinate's ``queries.sql`` style: each query starts with a line ``-- name --`` and a
comment saying what it does (``-- `` lines, one or a few); its text runs to the next name
line, and the comment is not sent. The schema is
spelled ``runbook`` in the files (jobs/ledger/schema.py SCHEMA). A ``{fragment}`` in a query
is filled by its one caller (a column list or a transaction's settings known only at run
time); nothing else in the files is Python. ``query(name)`` is the statement, parsed once.
"""

from __future__ import annotations

import functools
import itertools
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, TextClause, text

from jobs.config import redact

QUERIES_DIR = Path(__file__).with_name("queries")

# A query's first line: its name between two "--".
_NAME_LINE = re.compile(r"^-- ([a-z_][a-z0-9_]*) --$", re.MULTILINE)


def parse_queries(source: str, origin: str = "<sql>") -> dict[str, str]:
    """{name: text} of a queries file; ValueError for a query without its comment line, an
    empty one, or a name given twice."""
    found: dict[str, str] = {}
    names = list(_NAME_LINE.finditer(source))
    for match, following in zip(names, [*names[1:], None], strict=True):
        name = match.group(1)
        end = following.start() if following else len(source)
        lines = source[match.end() : end].strip().splitlines()
        described = len(list(itertools.takewhile(lambda line: line.startswith("-- "), lines)))
        body = "\n".join(lines[described:]).strip()
        if not described or not body:
            raise ValueError(f"{origin}: query {name!r} needs a '-- what it does' line and a body")
        if name in found:
            raise ValueError(f"{origin}: query {name!r} is named twice")
        found[name] = body
    return found


@functools.cache
def all_queries() -> dict[str, str]:
    """Every named query of the ledger, read once."""
    found: dict[str, str] = {}
    for path in sorted(QUERIES_DIR.glob("*.sql")):
        for name, body in parse_queries(path.read_text(), path.name).items():
            if name in found:
                raise ValueError(f"{path.name}: query {name!r} is named in another file too")
            found[name] = body
    return found


def query_text(name: str) -> str:
    """The text of the named query, for a caller that fills its ``{fragments}``."""
    return all_queries()[name]


@functools.cache
def query(name: str) -> TextClause:
    """The named query as a statement, parsed once."""
    return text(all_queries()[name])


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def tx(conn: Connection) -> Any:
    """A fresh transaction. Ledger writes commit inside their own block, so whatever is
    still open here is a read left by SQLAlchemy's autobegin (or one a lock timeout
    aborted): rolling it back loses nothing."""
    if conn.in_transaction():
        conn.rollback()
    return conn.begin()


def clean(message: str | None) -> str | None:
    return None if message is None else redact(message)
