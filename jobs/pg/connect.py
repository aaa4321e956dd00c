"""Plain psycopg2 connections to a target, and the one line that says why one failed.

No SQLAlchemy here: `runbook status` reads the ledger through these (jobs/ledger/read.py)
and must start quickly. jobs/pg/db.py builds its engines with the same session settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jobs.config import Target, redact
from jobs.errors import TargetUnreachable


def connect_args(target: Target, lock_timeout_ms: int) -> dict[str, Any]:
    """The session settings of every connection of ours: ``lock_timeout``, so that no
    statement queues production traffic behind it for long, and the target's
    ``statement_timeout``."""
    options = f"-c lock_timeout={lock_timeout_ms}"
    if target.statement_timeout_ms:
        options += f" -c statement_timeout={target.statement_timeout_ms}"
    return {
        "options": options,
        "connect_timeout": 5,
        "application_name": f"runbook:{target.name}",
    }


def describe_connect_error(target: Target, exc: BaseException) -> str:
    """One line saying why ``target`` could not be reached, never echoing its password."""
    raw = str(getattr(exc, "orig", None) or exc)
    where = target.where
    user = target.url.username or "(default user)"
    low = raw.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        return (
            f"target {target.name!r}: login refused for user {user} at {where} "
            "(password authentication failed); check the credentials in the target's URL"
        )
    if "does not exist" in low and "database" in low:
        return (
            f"target {target.name!r}: database {target.url.database!r} does not exist at "
            f"{where}; create it or fix the URL"
        )
    if "role" in low and "does not exist" in low:
        return f"target {target.name!r}: role {user!r} does not exist at {where}; fix the URL"
    if any(
        s in low
        for s in ("connection refused", "could not connect", "timeout expired", "translate host")
    ):
        return (
            f"target {target.name!r}: database at {where} is unreachable; check that "
            "PostgreSQL is running and the URL's host and port are right"
        )
    first = redact(raw.strip().splitlines()[0] if raw.strip() else type(exc).__name__)
    return f"target {target.name!r}: cannot connect to {where}: {first}"


@contextmanager
def reading(target: Target) -> Iterator[Any]:
    """An autocommit, read-only psycopg2 connection to ``target`` (the session refuses
    writes); TargetUnreachable with a clear line when it cannot be had."""
    import psycopg2

    settings = connect_args(target, target.lock_timeout_ms)
    settings["options"] += " -c default_transaction_read_only=on"
    try:
        conn = psycopg2.connect(**target.url.connect_kwargs(), **settings)
    except psycopg2.Error as exc:
        raise TargetUnreachable(describe_connect_error(target, exc)) from None
    try:
        conn.autocommit = True
        yield conn
    finally:
        conn.close()
