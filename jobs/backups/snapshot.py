"""The pre-run data state, and proof that a backup restores to it.

``dump_with_stats`` takes ``pg_dump`` and per-table row counts and content checksums from
one exported snapshot, so they agree even while the application keeps writing.
``verify_by_restore`` restores the dump into a scratch database on the same server and
checks that it holds exactly that state; the scratch database is always dropped.

Tables larger than ``max_checksum_bytes`` get a row count only (``"checksum": None``):
hashing every row of a very large table costs a full read of it, so it is skipped, while
the table list and the row counts are still checked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from jobs.backups.dump import libpq_env
from jobs.backups.dump import tool as _tool
from jobs.backups.leftovers import Owner, scratch_name
from jobs.config import Target, redact
from jobs.errors import BackupError, RestoreMismatch
from jobs.ledger.read import SCHEMA as LEDGER_SCHEMA
from jobs.pg.db import connect

log = logging.getLogger(__name__)

INSUFFICIENT_PRIVILEGE = "42501"
LOCK_NOT_AVAILABLE = "55P03"

# Output formats pinned while hashing, so that the text of a row does not depend on the
# session or on per-database settings (a scratch database has none of the target's).
_PINNED = {
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "search_path": "pg_catalog, pg_temp",
    "row_security": "off",  # like pg_dump: fail rather than see a filtered table
}

# Ordinary and partitioned tables outside system schemas and runbook's ledger.
_TABLES = text(
    """
    SELECT n.nspname || '.' || c.relname AS name,
           format('%I.%I', n.nspname, c.relname) AS quoted,
           pg_total_relation_size(c.oid) AS bytes
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p')
      AND n.nspname <> 'information_schema'
      AND n.nspname NOT LIKE 'pg\\_%'
      AND n.nspname <> :ledger
    ORDER BY 1
    """
)


class TableStats(TypedDict):
    """Rows of one table and the md5 of its sorted row hashes (None: too large to hash)."""

    rows: int
    checksum: str | None


@contextmanager
def _pinned_settings(conn: Connection) -> Iterator[None]:
    """Pin ``_PINNED`` for the block and put the session back as it was afterwards.

    In a transaction the settings live in a savepoint rolled back at the end (which also
    leaves the caller's transaction usable if a read fails); on an autocommit connection
    they are set for the session and the previous values restored.
    """
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        previous = {
            name: conn.execute(text("SELECT current_setting(:n)"), {"n": name}).scalar_one()
            for name in _PINNED
        }
        try:
            for name, value in _PINNED.items():
                conn.execute(text("SELECT set_config(:n, :v, false)"), {"n": name, "v": value})
            yield
        finally:
            for name, value in previous.items():
                conn.execute(text("SELECT set_config(:n, :v, false)"), {"n": name, "v": value})
        return
    savepoint = conn.begin_nested()
    try:
        for name, value in _PINNED.items():
            conn.execute(text("SELECT set_config(:n, :v, true)"), {"n": name, "v": value})
        yield
    finally:
        savepoint.rollback()


def table_stats(
    conn: Connection,
    *,
    max_checksum_bytes: int | None = None,
    hash_only: Collection[str] | None = None,
) -> dict[str, TableStats]:
    """Row count and order-independent content checksum of every user table, by "schema.table".

    Each table is read with ONLY, so a partition or inheritance child is counted once, in
    itself (a partitioned parent holds no rows of its own). Tables whose total size exceeds
    ``max_checksum_bytes``, or that are not in ``hash_only`` when it is given, are counted but
    not hashed (``"checksum": None``).
    """
    return _collect(conn, max_checksum_bytes, stop=None, hash_only=hash_only)


# Order-independent without a sort: the sum of each row's 64-bit hash (hashtextextended,
# PostgreSQL's own text hash; the restored copy is always hashed by the same server). Sorting
# every row's md5 (string_agg … ORDER BY) cost as much as pg_dump itself on a 300 MB
# database; this is about 8x cheaper. The prefix names the format, so checksums of another
# format are never compared with these.
CHECKSUM_FORMAT = "h64:"


def _collect(
    conn: Connection,
    max_checksum_bytes: int | None,
    stop: Callable[[], bool] | None,
    hash_only: Collection[str] | None = None,
) -> dict[str, TableStats]:
    """``table_stats``, giving up early (incomplete) as soon as ``stop()`` is true."""
    stats: dict[str, TableStats] = {}
    with _pinned_settings(conn):
        tables = conn.execute(_TABLES, {"ledger": LEDGER_SCHEMA}).all()
        for name, quoted, size in tables:
            if stop is not None and stop():
                break
            too_big = max_checksum_bytes is not None and size > max_checksum_bytes
            if too_big or (hash_only is not None and name not in hash_only):
                rows = conn.execute(text(f"SELECT count(*) FROM ONLY {quoted}")).scalar_one()
                stats[name] = {"rows": int(rows), "checksum": None}
                continue
            rows, checksum = conn.execute(
                text(
                    "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)"
                    f" FROM ONLY {quoted} t"
                )
            ).one()
            stats[name] = {"rows": int(rows), "checksum": f"{CHECKSUM_FORMAT}{checksum}"}
    return stats


def _first_line(raw: bytes | str) -> str:
    textual = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return redact((textual.strip().splitlines() or ["no output"])[0])


def _db_error(exc: DBAPIError) -> str:
    return _first_line(str(exc.orig) if exc.orig is not None else str(exc))


def _read_hint(exc: DBAPIError) -> str:
    code = getattr(exc.orig, "pgcode", None)
    if code == INSUFFICIENT_PRIVILEGE:
        return "grant the target's role SELECT on every table"
    if code == LOCK_NOT_AVAILABLE:
        return "another session holds a lock on that table; retry when it is released"
    return "fix the cause and retry"


def dump_with_stats(
    target: Target, path: Path, *, max_checksum_bytes: int | None
) -> dict[str, Any]:
    """``pg_dump -Fc`` of ``target`` into ``path`` and the table stats of the same snapshot.

    A REPEATABLE READ transaction exports its snapshot; pg_dump imports it while the same
    transaction computes ``table_stats``, so both see exactly the same data. The ledger
    schema is excluded from both. ``path`` is removed if the dump fails.
    """
    pg_dump = _tool(target, "pg_dump", target.pg_dump)
    with connect(target) as conn:
        conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            snapshot = str(conn.execute(text("SELECT pg_export_snapshot()")).scalar_one())
            cmd = [
                pg_dump,
                "--format=custom",
                f"--snapshot={snapshot}",
                f"--exclude-schema={LEDGER_SCHEMA}",
                f"--lock-wait-timeout={max(target.lock_timeout_ms, 1000)}",
                "--no-password",
            ]
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out, tempfile.TemporaryFile() as err:
                proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=libpq_env(target))
                try:
                    # Stop hashing as soon as pg_dump has failed: its error is the verdict.
                    tables = _collect(
                        conn, max_checksum_bytes, lambda: proc.poll() not in (None, 0)
                    )
                except DBAPIError as exc:
                    proc.kill()
                    proc.wait()
                    path.unlink(missing_ok=True)
                    raise BackupError(
                        f"cannot read the tables of {target.where} to record the pre-run state: "
                        f"{_db_error(exc)}; {_read_hint(exc)}"
                    ) from None
                except BaseException:
                    proc.kill()
                    proc.wait()
                    path.unlink(missing_ok=True)
                    raise
                code = proc.wait()
                err.seek(0)
                stderr = err.read()
    if code != 0:
        path.unlink(missing_ok=True)
        raise BackupError(f"pg_dump failed (exit {code}): {_first_line(stderr)}")
    return {"tables": tables, "snapshot": snapshot}


def scratch_db_name(target: Target, owner: Owner | None, purpose: str) -> str:
    return scratch_name(target, owner, purpose)


def _create_scratch(target: Target, name: str) -> None:
    """CREATE DATABASE ``name`` with the target database's encoding and locale."""
    server = f"{target.url.host or 'localhost'}:{target.url.port or 5432}"
    with connect(target, autocommit=True) as conn:
        encoding, collate, ctype = conn.execute(
            text(
                "SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database"
                " WHERE datname = current_database()"
            )
        ).one()
        quoted = conn.dialect.identifier_preparer.quote(name)
        try:
            conn.execute(
                text(
                    f"CREATE DATABASE {quoted} TEMPLATE template0"
                    f" ENCODING {_literal(encoding)} LC_COLLATE {_literal(collate)}"
                    f" LC_CTYPE {_literal(ctype)}"
                )
            )
        except DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) == INSUFFICIENT_PRIVILEGE:
                raise BackupError(
                    f"cannot create a scratch database on {server} to verify the backup "
                    "(permission denied); grant CREATEDB to the target's role or set "
                    "verify_restore = false"
                ) from None
            raise BackupError(
                f"cannot create a scratch database on {server} to verify the backup: "
                f"{_db_error(exc)}"
            ) from None


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _drop_scratch(target: Target, name: str) -> None:
    """DROP DATABASE ``name`` WITH (FORCE); a failure is logged, never raised."""
    try:
        with connect(target, autocommit=True) as conn:
            quoted = conn.dialect.identifier_preparer.quote(name)
            conn.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
    except Exception as exc:  # cleanup must not hide the verdict
        log.warning(
            "could not drop scratch database %s on %s: %s; drop it by hand",
            name,
            target.where,
            redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__),
        )


def _restore(target: Target, path: Path, scratch: str) -> None:
    pg_restore = _tool(target, "pg_restore", target.pg_restore)
    env = dict(libpq_env(target), PGDATABASE=scratch)
    cmd = [
        pg_restore,
        "--no-owner",
        "--exit-on-error",
        "--no-password",
        f"--dbname={scratch}",
        str(path),
    ]
    proc = subprocess.run(cmd, capture_output=True, env=env, check=False)
    if proc.returncode != 0:
        raise BackupError(
            f"backup {path.name} does not restore into a scratch database "
            f"(pg_restore exit {proc.returncode}): "
            f"{_first_line(proc.stderr)}; the backup is not proven restorable, fix that and retry"
        )


def _scratch_stats(
    target: Target, scratch: str, hash_only: Collection[str] | None = None
) -> dict[str, TableStats]:
    eng = create_engine(
        target.url.set(database=scratch).sqlalchemy_url(),
        poolclass=NullPool,
        connect_args={"connect_timeout": 5, "application_name": f"runbook:{target.name}"},
    )
    try:
        with eng.connect() as conn, conn.begin():
            return table_stats(conn, hash_only=hash_only)
    except DBAPIError as exc:
        raise BackupError(
            f"cannot read the scratch restore {scratch} on {target.where}: {_db_error(exc)}"
        ) from None
    finally:
        eng.dispose()


def compare_stats(
    expected: Mapping[str, TableStats], actual: Mapping[str, TableStats]
) -> str | None:
    """The first difference between two ``table_stats`` results, or None when they agree."""
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            return f"table {name} is missing"
        if name not in expected:
            return f"table {name} was not there before the run"
        want, got = expected[name], actual[name]
        if want["rows"] != got["rows"]:
            return f"table {name} has {got['rows']} rows, expected {want['rows']}"
        if comparable(want.get("checksum"), got.get("checksum")) and (
            want["checksum"] != got["checksum"]
        ):
            return f"table {name} has {got['rows']} rows as expected but different content"
    return None


def comparable(a: str | None, b: str | None) -> bool:
    """Both checksums exist and are of the same format."""
    return bool(a and b) and (a or "").startswith(CHECKSUM_FORMAT) == (b or "").startswith(
        CHECKSUM_FORMAT
    )


def verify_by_restore(
    target: Target, path: Path, expected: Mapping[str, Any], *, owner: Owner | None = None
) -> dict[str, object]:
    """Restore ``path`` into a scratch database and check it holds the ``expected`` stats.

    ``expected`` is the "tables" mapping of ``dump_with_stats`` (its whole result is
    accepted too). Raises RestoreMismatch naming the first differing table. ``owner``, the
    run's delivery, goes into the scratch database's name (jobs/backups/leftovers.py).
    """
    tables: Mapping[str, TableStats] = (
        expected["tables"] if "tables" in expected and "snapshot" in expected else expected
    )
    scratch = scratch_db_name(target, owner, "v")
    _create_scratch(target, scratch)
    try:
        _restore(target, path, scratch)
        hashed = {name for name, stats in tables.items() if stats.get("checksum")}
        actual = _scratch_stats(target, scratch, hash_only=hashed)
    finally:
        _drop_scratch(target, scratch)
    problem = compare_stats(tables, actual)
    if problem:
        raise RestoreMismatch(
            f"backup {path.name} does not restore to the pre-run state: {problem}; "
            "the backup cannot be trusted, take a new one"
        )
    return {
        "tables": len(actual),
        "rows": sum(s["rows"] for s in actual.values()),
        "checksummed": sum(1 for s in tables.values() if s.get("checksum") is not None),
        "scratch_restore": "ok",
    }


@contextmanager
def scratch_copy(target: Target, path: Path, *, owner: Owner | None = None) -> Iterator[Target]:
    """A scratch database restored from ``path``, as a Target of its own; dropped after.

    The target itself is never touched: this is where a rehearsal runs the migrations.
    """
    scratch = scratch_db_name(target, owner, "r")
    _create_scratch(target, scratch)
    try:
        _restore(target, path, scratch)
        yield dataclasses.replace(
            target, name=f"{target.name}.rehearsal", url=target.url.set(database=scratch)
        )
    finally:
        _drop_scratch(target, scratch)
