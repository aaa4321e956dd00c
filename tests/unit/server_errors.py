"""PostgreSQL errors as psycopg2 raises them, without a server.

They are psycopg2's own classes, wrapped the way SQLAlchemy wraps them. Their ``pgcode`` is
read-only and set from a server's reply; ``__setstate__`` (what unpickling an error from
another process uses) sets it without one.
"""

from __future__ import annotations

import psycopg2
import psycopg2.errors
from sqlalchemy.exc import DBAPIError


def server_error(code: str, message: str = "from the server") -> psycopg2.Error:
    """The psycopg2 error class for SQLSTATE ``code``, carrying it as a server's reply would."""
    exc = psycopg2.errors.lookup(code)(message)
    exc.__setstate__({"pgerror": f"ERROR:  {message}\n", "pgcode": code, "cursor": None})
    return exc


def wrapped(code: str, message: str = "from the server") -> DBAPIError:
    """``server_error`` as SQLAlchemy raises it from a statement."""
    exc = DBAPIError.instance("UPDATE t SET c = 1", {}, server_error(code, message), psycopg2.Error)
    assert isinstance(exc, DBAPIError)
    return exc
