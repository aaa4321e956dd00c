"""The connections a project's own env.py opens, kept to runbook's rules.

runbook hands env.py its own psycopg2 connection (``config.attributes["connection"]``), but
many env.py files build an engine of their own: from ``sqlalchemy.url`` (Alembic's
``generic`` and ``async`` templates), or from an environment variable. For those:

* ``sqlalchemy.url`` holds the target's host, port, database, user and password with the
  driver the project's alembic.ini names (``postgresql+asyncpg`` for an async env.py), so
  ``async_engine_from_config`` gets the async driver it needs;
* while env.py runs, every SQLAlchemy connection it opens gets runbook's session settings
  (lock_timeout, statement_timeout, application_name) as startup parameters, which no
  rollback can undo, and is refused before it connects when it points at another database
  than the target (an env.py reading ``$DATABASE_URL`` on a worker where that names a
  different database would otherwise migrate the wrong one).

runbook's own engines (jobs/pg/db.py) set their settings themselves and are left alone.
"""

from __future__ import annotations

import contextvars
import logging.config
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

from jobs.config import Target
from jobs.errors import ProjectError
from jobs.pg.url import PgURL

# Drivers whose connect() takes startup parameters runbook can set; libpq's own (psycopg2,
# psycopg 3) take ``options``/``application_name``, asyncpg takes ``server_settings``.
LIBPQ_DRIVERS = ("psycopg2", "psycopg", "psycopg_async")
ASYNCPG = "asyncpg"
DRIVERS = (*LIBPQ_DRIVERS, ASYNCPG)

_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1"}


def project_driver(ini_url: str | None) -> str:
    """The driver the project's alembic.ini names for PostgreSQL, when runbook can set its
    session settings on it; else psycopg2 (also for a bare ``postgresql://``, as the
    target's URL means, jobs/config.py)."""
    if not ini_url:
        return "psycopg2"
    try:
        url = make_url(ini_url)
    except Exception:  # the template's placeholder, an interpolation left unfilled
        return "psycopg2"
    backend, _, driver = url.drivername.partition("+")
    if backend not in ("postgresql", "postgres") or driver not in DRIVERS:
        return "psycopg2"
    return driver


def project_url(target: Target, driver: str) -> PgURL:
    """The target's URL for the project's env.py, with ``driver``. asyncpg calls libpq's
    ``sslmode`` ``ssl``; any other option is passed as is (the driver names one it cannot
    take)."""
    url = target.url.set(drivername=f"postgresql+{driver}")
    if driver != ASYNCPG or "sslmode" not in url.query:
        return url
    query = dict(url.query)
    query["ssl"] = query.pop("sslmode")
    return url.set(query=query)


@dataclass
class _Rules:
    target: Target
    settings: dict[str, str]
    application_name: str
    refused: list[str] = field(default_factory=list)


_ACTIVE: contextvars.ContextVar[_Rules | None] = contextvars.ContextVar(
    "runbook_env_py_rules", default=None
)


def _same_server(target: Target, host: Any, port: Any, database: Any) -> bool:
    want_host = (target.url.host or "").lower()
    got_host = str(host or "").lower()
    local = {h for h in (want_host, got_host) if h in _LOCAL_HOSTS or h.startswith("/")}
    hosts_match = want_host == got_host or len(local) == 2
    try:
        same_port = int(port or 5432) == int(target.url.port or 5432)
    except (TypeError, ValueError):
        same_port = False
    return hosts_match and same_port and database == target.url.database


def _where(host: Any, port: Any, database: Any) -> str:
    return f"{host or 'localhost'}:{port or 5432}/{database}"


def on_connect(dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
    """SQLAlchemy's ``do_connect``: runbook's settings on a connection env.py opens."""
    rules = _ACTIVE.get()
    if rules is None or str(cparams.get("application_name", "")).startswith("runbook:"):
        return  # not inside env.py, or one of runbook's own engines (jobs/pg/db.py)
    target = rules.target
    database = cparams.get("database", cparams.get("dbname"))
    host, port = cparams.get("host"), cparams.get("port")
    if not _same_server(target, host, port, database):
        rules.refused.append(
            f"target {target.name!r}: the project's env.py connects to "
            f"{_where(host, port, database)}, not to the target's {target.where}; let env.py "
            "take sqlalchemy.url (runbook sets it to the target) or "
            'config.attributes["connection"]'
        )
        raise ProjectError(rules.refused[-1])
    driver = dialect.driver
    if driver in LIBPQ_DRIVERS:
        given = str(cparams.get("options") or "")
        ours = " ".join(f"-c {name}={value}" for name, value in rules.settings.items())
        cparams["options"] = f"{given} {ours}".strip()  # ours last: the last -c wins
        cparams["application_name"] = rules.application_name
    elif driver == ASYNCPG:
        server = dict(cparams.get("server_settings") or {})
        server.update(rules.settings, application_name=rules.application_name)
        cparams["server_settings"] = server
    else:
        rules.refused.append(
            f"target {target.name!r}: the project's env.py connects with driver {driver!r}, "
            f"on which runbook cannot set lock_timeout; name one of {', '.join(DRIVERS)} in "
            "its sqlalchemy.url"
        )
        raise ProjectError(rules.refused[-1])


event.listen(Engine, "do_connect", on_connect)


@contextmanager
def rules(target: Target, *, read_only: bool = False) -> Iterator[list[str]]:
    """While env.py runs: its own connections get the target's session settings (and
    ``default_transaction_read_only`` when ``read_only``). Yields the refusals made, so the
    caller can report the refusal rather than however env.py wrapped it."""
    settings = {"lock_timeout": str(target.lock_timeout_ms)}
    if target.statement_timeout_ms:
        settings["statement_timeout"] = str(target.statement_timeout_ms)
    if read_only:
        settings["default_transaction_read_only"] = "on"
    active = _Rules(target, settings, f"runbook:{target.name}")
    token = _ACTIVE.set(active)
    try:
        yield active.refused
    finally:
        _ACTIVE.reset(token)


@contextmanager
def keep_logging() -> Iterator[None]:
    """Stop a project's env.py ``fileConfig()`` from tearing down the worker's logging."""
    original = logging.config.fileConfig
    logging.config.fileConfig = lambda *a, **k: None
    try:
        yield
    finally:
        logging.config.fileConfig = original
