"""PostgreSQL errors by SQLSTATE: the classes runbook acts on, the ones worth retrying, and a
one-line description of any database error for an operator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError, OperationalError

from jobs.config import redact
from jobs.errors import RunbookError

if TYPE_CHECKING:
    pass


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE behind an exception, looking through SQLAlchemy and Alembic wrappers."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code = getattr(getattr(cur, "orig", None), "pgcode", None) or getattr(cur, "pgcode", None)
        if code:
            return str(code)
        cur = cur.__cause__ or cur.__context__
    return None


def describe(exc: BaseException) -> str:
    """One redacted line for an exception raised by a migration."""
    if isinstance(exc, RunbookError):  # already one line for an operator
        return redact(str(exc))
    if isinstance(exc, NotImplementedError):
        msg = str(exc) or "downgrade raises NotImplementedError"
        return redact(f"NotImplementedError: {msg}")
    orig = getattr(exc, "orig", None)
    text_ = str(orig if orig is not None else exc).strip()
    line = text_.splitlines()[0] if text_ else ""
    return redact(f"{type(orig or exc).__name__}: {line}".rstrip(": "))


QUERY_CANCELED = "57014"
# Worth retrying: lock_not_available, query_canceled (statement timeout), deadlock,
# serialization failure, server shutting down or starting, too many connections; and the
# whole class 08 (connection exceptions).
TRANSIENT_SQLSTATES = frozenset(
    {"55P03", QUERY_CANCELED, "40P01", "40001", "57P01", "57P02", "57P03", "53300"}
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the batch may succeed (a lock or statement timeout, a deadlock, a
    lost connection) rather than fail the same way (a constraint, bad data, bad SQL)."""
    code = sqlstate(exc)
    if code is None:
        return isinstance(exc, OperationalError) or bool(
            isinstance(exc, DBAPIError) and exc.connection_invalidated
        )
    return code in TRANSIENT_SQLSTATES or code.startswith("08")


LOCK_NOT_AVAILABLE = "55P03"
UNDEFINED_TABLE = "42P01"
INSUFFICIENT_PRIVILEGE = "42501"
