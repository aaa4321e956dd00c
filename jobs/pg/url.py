"""A database URL without SQLAlchemy: parsed, rendered and changed as SQLAlchemy's URL is.

`runbook status` reads every target's URL at start-up, and importing SQLAlchemy for
``make_url`` alone cost more than status's whole start-up budget. ``PgURL`` parses with
SQLAlchemy's own pattern (sqlalchemy/engine/url.py ``_parse_url``), renders like its
``render_as_string`` and hands SQLAlchemy a real URL (``sqlalchemy_url``) where an engine is
built; tests/unit/test_pgurl.py holds the two side by side.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

_PATTERN = re.compile(
    r"""
        (?P<name>[\w\+]+)://
        (?:
            (?P<username>[^:/]*)
            (?::(?P<password>[^@]*))?
        @)?
        (?:
            (?:
                \[(?P<ipv6host>[^/\?]+)\] |
                (?P<ipv4host>[^/:\?]+)
            )?
            (?::(?P<port>[^/\?]*))?
        )?
        (?:/(?P<database>[^\?]*))?
        (?:\?(?P<query>.*))?
    """,
    re.X,
)

QueryValue = str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PgURL:
    drivername: str
    username: str | None = None
    password: str | None = None
    host: str | None = None
    port: int | None = None
    database: str | None = None
    query: Mapping[str, QueryValue] = dataclasses.field(default_factory=dict)

    def get_backend_name(self) -> str:
        return self.drivername.split("+")[0]

    def set(self, **changes: Any) -> PgURL:
        """A copy with the given parts changed; None leaves a part as it is (as SQLAlchemy)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def render_as_string(self, hide_password: bool = True) -> str:
        s = self.drivername + "://"
        if self.username is not None:
            s += quote(self.username, safe=" +")
            if self.password is not None:
                s += ":" + ("***" if hide_password else quote(str(self.password), safe=" +"))
            s += "@"
        if self.host is not None:
            s += f"[{self.host}]" if ":" in self.host else self.host
        if self.port is not None:
            s += ":" + str(self.port)
        if self.database is not None:
            s += "/" + quote(self.database, safe=" +/")
        if self.query:
            s += "?" + "&".join(
                f"{quote_plus(k)}={quote_plus(element)}"
                for k in sorted(self.query)
                for element in _as_list(self.query[k])
            )
        return s

    def __str__(self) -> str:
        return self.render_as_string()

    def __repr__(self) -> str:
        return self.render_as_string()

    def __hash__(self) -> int:
        return hash(self.render_as_string(hide_password=False))

    def sqlalchemy_url(self) -> URL:
        """The same URL as SQLAlchemy's own, for create_engine."""
        from sqlalchemy.engine import URL

        return URL.create(
            self.drivername,
            self.username,
            self.password,
            self.host,
            self.port,
            self.database,
            self.query,
        )

    def connect_kwargs(self) -> dict[str, Any]:
        """psycopg2.connect()'s keywords for this URL, as SQLAlchemy's psycopg2 dialect
        passes them (sqlalchemy/dialects/postgresql/_psycopg_common.py): the URL's parts,
        then its query."""
        if "host" in self.query:  # hosts in the query: SQLAlchemy's own rules, rare enough
            from sqlalchemy.dialects.postgresql.psycopg2 import dialect

            args, kwargs = dialect().create_connect_args(self.sqlalchemy_url())
            return {"dsn": args[0], **kwargs} if args else dict(kwargs)
        parts = {
            "host": self.host,
            "dbname": self.database,
            "user": self.username,
            "password": None if self.password is None else str(self.password),
            "port": self.port,
        }
        kwargs = {k: v for k, v in parts.items() if v}
        kwargs.update(self.query)
        return kwargs


def _as_list(value: QueryValue) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def parse(raw: str) -> PgURL:
    """Parse ``raw`` as SQLAlchemy's make_url does; ValueError when it cannot be."""
    match = _PATTERN.match(raw)
    if match is None:
        raise ValueError("Could not parse the URL")
    parts = match.groupdict()
    query: dict[str, QueryValue] = {}
    if parts["query"] is not None:
        for key, value in parse_qsl(parts["query"]):
            if key in query:
                query[key] = (*_as_list(query[key]), value)
            else:
                query[key] = value
    username, password, database = (
        None if parts[k] is None else unquote(parts[k])
        for k in ("username", "password", "database")
    )
    port = parts["port"]
    return PgURL(
        drivername=parts["name"],
        username=username,
        password=password,
        host=parts["ipv4host"] or parts["ipv6host"],
        port=None if port is None else int(port),  # "" fails, as in SQLAlchemy
        database=database,
        query=query,
    )
