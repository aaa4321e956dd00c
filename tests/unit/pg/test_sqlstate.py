"""Database errors by SQLSTATE, and the one line an operator reads."""

from __future__ import annotations

from jobs.pg.sqlstate import describe, sqlstate


def test_describe_and_sqlstate_look_through_wrappers() -> None:
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
