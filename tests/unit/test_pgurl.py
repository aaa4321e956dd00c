"""jobs/pg/url.py parses, renders and connects as SQLAlchemy's URL does (no services)."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects.postgresql.psycopg2 import dialect
from sqlalchemy.engine import make_url

from jobs.pg.url import parse

URLS = [
    "postgresql://u:pw@h:5433/db",
    "postgres://h/db",
    "postgresql+psycopg2://u@h/db?sslmode=require&application_name=x",
    "postgresql://u:p%40ss%2Fw0rd@h/db",
    "postgresql://us%20er:a+b@[::1]:5432/my%2Fdb",
    "postgresql:///db?host=/var/run/postgresql",
    "postgresql://u@h/db?host=a&host=b:5433",
    "postgresql://u@h/db?a=1&a=2&b=",
    "postgresql://",
    "postgresql://h:/db",
    "postgresql://u@h:notaport/db",
    "postgresql://u@h:99999/db",
    "mysql://u@h/db",
    "not a url",
]


def sqlalchemy_parts(raw: str) -> object:
    try:
        url = make_url(raw)
    except Exception:  # ArgumentError, or ValueError for a port that is not a number
        return "refused"
    return (
        url.drivername,
        url.username,
        url.password,
        url.host,
        url.port,
        url.database,
        dict(url.query),
        url.render_as_string(),
        url.render_as_string(hide_password=False),
    )


def our_parts(raw: str) -> object:
    try:
        url = parse(raw)
    except ValueError:
        return "refused"
    return (
        url.drivername,
        url.username,
        url.password,
        url.host,
        url.port,
        url.database,
        dict(url.query),
        url.render_as_string(),
        url.render_as_string(hide_password=False),
    )


@pytest.mark.parametrize("raw", URLS)
def test_parsed_and_rendered_as_sqlalchemy_does(raw: str) -> None:
    assert our_parts(raw) == sqlalchemy_parts(raw)


@pytest.mark.parametrize(
    "raw",
    [u for u in URLS if u.startswith("postgres") and "notaport" not in u and "h:/db" not in u],
)
def test_psycopg2_gets_what_sqlalchemy_would_pass(raw: str) -> None:
    url = parse(raw).set(drivername="postgresql+psycopg2")
    args, kwargs = dialect().create_connect_args(url.sqlalchemy_url())
    expected = {"dsn": args[0], **kwargs} if args and args[0] else dict(kwargs)
    assert url.connect_kwargs() == expected
    assert url.sqlalchemy_url() == make_url(raw).set(drivername="postgresql+psycopg2")


def test_the_password_shows_only_when_asked_for() -> None:
    url = parse("postgresql://u:hunter2@h/db")
    assert "hunter2" not in repr(url) and "hunter2" not in str(url)
    assert url.set(database="other").render_as_string(hide_password=False) == (
        "postgresql://u:hunter2@h/other"
    )
