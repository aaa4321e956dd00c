"""Connections to a target, with errors an operator can act on.

Engines are cached per process and target, the most recently used ENGINE_CACHE of them (a
worker serving a fleet meets thousands of targets; an engine holds no connection, NullPool,
so one dropped from the cache costs only its re-creation); each carries ``lock_timeout`` so
that no statement of ours queues production traffic behind it for long.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from jobs.config import Target
from jobs.errors import TargetUnreachable
from jobs.pg.connect import connect_args as _connect_args
from jobs.pg.connect import describe_connect_error

# Advisory lock keys (one bigint namespace of runbook's own). The run lock is held by the
# task executing a run, for the whole run; the admission lock serialises enqueue decisions.
RUN_LOCK_KEY = 0x72756E626F6F6B01
ADMISSION_LOCK_KEY = 0x72756E626F6F6B02

ENGINE_CACHE = 128
_ENGINES: OrderedDict[tuple[str, str, int], Engine] = OrderedDict()
_ENGINES_LOCK = threading.Lock()


def engine(target: Target, *, lock_timeout_ms: int | None = None) -> Engine:
    """A cached engine for ``target``; its sessions run with ``lock_timeout`` set."""
    timeout = target.lock_timeout_ms if lock_timeout_ms is None else lock_timeout_ms
    key = (target.name, target.url.render_as_string(hide_password=False), timeout)
    with _ENGINES_LOCK:
        found = _ENGINES.get(key)
        if found is None:
            found = _ENGINES[key] = create_engine(
                target.url.sqlalchemy_url(),
                poolclass=NullPool,
                connect_args=_connect_args(target, timeout),
            )
            while len(_ENGINES) > ENGINE_CACHE:
                _ENGINES.popitem(last=False)
        _ENGINES.move_to_end(key)
        return found


def pooled_engine(target: Target) -> Engine:
    """An engine of its own (not cached) like :func:`engine`'s, keeping two idle connections
    for reuse; ``dispose()`` it when done. For a run's migrations: an env.py that opens a
    connection of its own from the one handed to it (``connection.engine.connect()``, as
    MLflow's does) then reuses one per run instead of connecting anew for every revision."""
    return create_engine(
        target.url.sqlalchemy_url(),
        pool_size=2,
        max_overflow=-1,
        pool_pre_ping=True,  # a connection idle since a server restart is replaced
        connect_args=_connect_args(target, target.lock_timeout_ms),
    )


@contextmanager
def connect(target: Target, *, autocommit: bool = False) -> Iterator[Connection]:
    """A connection to ``target``, raising TargetUnreachable with a clear line on failure."""
    eng = engine(target)
    try:
        conn = eng.connect()
    except (OperationalError, DBAPIError, psycopg2.Error) as exc:
        raise TargetUnreachable(describe_connect_error(target, exc)) from None
    try:
        if autocommit:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn
    finally:
        conn.close()


def server_version_num(conn: Connection) -> int:
    return int(conn.execute(text("SHOW server_version_num")).scalar_one())


@contextmanager
def run_lock(target: Target, *, wait_s: float = 0.0, poll_s: float = 0.25) -> Iterator[bool]:
    """Hold the target's run lock on a dedicated autocommit connection.

    Polls ``pg_try_advisory_lock`` (never blocks inside Postgres) for up to ``wait_s``;
    yields False when another session still holds it. Closing the connection releases it,
    so a worker that dies frees the target for the redelivered task.
    """
    with connect(target, autocommit=True) as conn:
        deadline = time.monotonic() + wait_s
        while True:
            got = conn.execute(
                text("SELECT pg_try_advisory_lock(:k)"), {"k": RUN_LOCK_KEY}
            ).scalar_one()
            if got or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
        try:
            yield bool(got)
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": RUN_LOCK_KEY})
