"""Database errors by SQLSTATE: which are worth retrying, and the one line an operator reads
(the errors are psycopg2's own, built without a server: tests/unit/server_errors.py)."""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

from jobs.config import normalize_url
from jobs.errors import RunbookError
from jobs.pg.sqlstate import TRANSIENT_SQLSTATES, describe, is_transient, sqlstate
from tests.unit.server_errors import server_error, wrapped


def test_a_server_error_carries_its_sqlstate_without_a_server() -> None:
    exc = server_error("55P03")
    assert isinstance(exc, psycopg2.errors.LockNotAvailable) and exc.pgcode == "55P03"
    assert isinstance(wrapped("55P03"), OperationalError)  # SQLAlchemy's class for it


@pytest.mark.parametrize("code", sorted(TRANSIENT_SQLSTATES) + ["08006", "08001"])
def test_timeouts_deadlocks_and_lost_connections_are_worth_retrying(code: str) -> None:
    assert sqlstate(wrapped(code)) == code
    assert is_transient(wrapped(code))
    assert is_transient(server_error(code))  # unwrapped, as a psycopg2-only path raises it


@pytest.mark.parametrize(
    "code",
    [
        "23505",  # unique_violation
        "23514",  # check_violation
        "22P02",  # invalid_text_representation: bad data
        "42601",  # syntax_error
        "42703",  # undefined_column
        "42501",  # insufficient_privilege
    ],
)
def test_constraints_bad_data_and_bad_sql_fail_the_same_way_again(code: str) -> None:
    assert not is_transient(wrapped(code))


def test_without_a_sqlstate_only_connection_trouble_is_transient() -> None:
    no_code = psycopg2.OperationalError("server closed the connection unexpectedly")
    assert sqlstate(no_code) is None
    assert is_transient(OperationalError("SELECT 1", {}, no_code))
    lost = DBAPIError("SELECT 1", {}, psycopg2.InterfaceError("connection already closed"))
    assert not is_transient(lost)
    lost.connection_invalidated = True  # set by SQLAlchemy when it saw the connection die
    assert is_transient(lost)
    assert not is_transient(IntegrityError("INSERT", {}, psycopg2.IntegrityError("dup")))
    assert not is_transient(ProgrammingError("SELEC", {}, psycopg2.ProgrammingError("syntax")))
    assert not is_transient(ValueError("not from a database"))


def test_describe_and_sqlstate_look_through_wrappers() -> None:
    # Stand-ins with just the attributes sqlstate() and describe() read (pgcode, orig).
    class PgError(Exception):
        pgcode = "55P03"

    class Wrapped(Exception):
        orig = PgError("canceling statement due to lock timeout")

    try:
        try:
            raise Wrapped("outer")
        except Wrapped as inner:
            raise RuntimeError("alembic") from inner
    except RuntimeError as exc:
        assert sqlstate(exc) == "55P03"
    assert describe(Wrapped()) == "PgError: canceling statement due to lock timeout"
    assert describe(NotImplementedError("no way back")) == "NotImplementedError: no way back"


def test_sqlstate_follows_implicit_chaining_and_stops_on_a_cycle() -> None:
    try:
        try:
            raise wrapped("40P01")
        except DBAPIError:
            raise RuntimeError("while handling it") from None  # __context__ still set
    except RuntimeError as exc:
        assert sqlstate(exc) == "40P01"
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert sqlstate(first) is None


def test_describe_is_one_redacted_line() -> None:
    normalize_url("postgresql://app:s3cr3t-pw@db.internal/app")  # now a known secret
    exc = wrapped("28P01", 'password authentication failed for user "app"\nDETAIL: s3cr3t-pw')
    assert describe(exc) == 'InvalidPassword: password authentication failed for user "app"'
    leaked = RuntimeError("could not connect with s3cr3t-pw\nsecond line")
    assert describe(leaked) == "RuntimeError: could not connect with ***"
    assert describe(RunbookError("table t is locked by s3cr3t-pw")) == "table t is locked by ***"
    assert describe(NotImplementedError()) == (
        "NotImplementedError: downgrade raises NotImplementedError"
    )
    assert describe(RuntimeError()) == "RuntimeError"
