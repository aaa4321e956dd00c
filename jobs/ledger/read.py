"""The ledger reads of `runbook status`, as named SQL on a plain psycopg2 connection.

`runbook status` must start quickly; SQLAlchemy's import alone cost more than its whole
start-up budget (bench/README.md). So status reads the ledger here, with psycopg2 and no
SQLAlchemy, into the records of jobs/ledger/records.py. jobs/ledger/, which owns every write,
takes its column lists and the backfill aggregates from here, so both sides read the same
columns. Parameters are psycopg2's ``%(name)s``.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from jobs.ledger.records import Backfill, Run, Slice, Step, Throttle

if TYPE_CHECKING:
    from jobs.config import Target

log = logging.getLogger("runbook.ledger")
T = TypeVar("T")

SCHEMA = "runbook"

RUN_COLUMNS = (
    "id, target, kind, state, from_revision, to_revision, current_revision, error, options, "
    "backup, fingerprint_before, created_at, started_at, finished_at, deliveries, irreversible"
)
STEP_COLUMNS = "id, run_id, kind, revision, state, started_at, finished_at, attempts, error, detail"
# The backfill's own row; the counters summed over its slices are left at 0. Enough for a
# batch and a state change, which read it on every batch and should not sum the slices.
BACKFILL_ROW = (
    "b.id, b.target, b.run_id, b.revision, b.table_name, b.key_column, b.key_type, b.set_sql, "
    "b.where_sql, b.state, b.upper_key, b.batch_size, b.min_batch, b.max_batch, "
    "b.target_batch_ms, b.sleep_ms, b.lock_timeout_ms, b.statement_timeout_ms, b.slices, "
    "b.on_error, b.max_xact_age_s, b.max_replica_lag_ms, b.max_replica_lag_bytes, "
    "b.max_retained_wal_bytes, b.max_wal_rate_bytes, b.max_throttle_ms, b.pause_reason, "
    "b.standbys_seen, b.replica_note, b.rows_total_estimate, b.estimate_kind, b.error, "
    "b.error_range, b.created_at, b.started_at, b.finished_at, b.updated_at"
)
BACKFILL_COLUMNS = (
    f"{BACKFILL_ROW}, "
    f"(SELECT CAST(coalesce(sum(s.rows_done), 0) AS bigint) FROM {SCHEMA}.backfill_slices s "
    " WHERE s.backfill_id = b.id) AS rows_done, "
    f"(SELECT CAST(coalesce(sum(s.throttled_ms), 0) AS bigint) FROM {SCHEMA}.backfill_slices s "
    " WHERE s.backfill_id = b.id) AS throttled_ms, "
    f"(SELECT count(*) FROM {SCHEMA}.backfill_skipped k WHERE k.backfill_id = b.id) AS skipped"
)
SLICE_COLUMNS = (
    "backfill_id, slice, lower_key, upper_key, cursor, generation, state, batch_size, "
    "rows_done, throttled_ms, updated_at, key_marks, keys_estimate"
)

LEDGER_EXISTS = "SELECT to_regclass(%(t)s) IS NOT NULL"
SELECT_RUN = f"SELECT {RUN_COLUMNS} FROM {SCHEMA}.runs WHERE id = %(id)s"
SELECT_STEPS = f"SELECT {STEP_COLUMNS} FROM {SCHEMA}.steps WHERE run_id = %(id)s ORDER BY id"
SELECT_BACKFILL = f"SELECT {BACKFILL_COLUMNS} FROM {SCHEMA}.backfills b WHERE b.id = %(id)s"
SELECT_SLICES = (
    f"SELECT {SLICE_COLUMNS} FROM {SCHEMA}.backfill_slices WHERE backfill_id = %(id)s "
    "ORDER BY slice"
)
# Rows and seconds of work (throttled time left out) over the last %(w)s seconds of
# committed batches, all slices together: the rate an ETA is drawn from.
RECENT_RATE = (
    "SELECT coalesce(sum(rows), 0) AS rows, "
    "coalesce(extract(epoch FROM max(committed_at) - min(committed_at - "
    "  make_interval(secs => (duration_ms + throttled_ms) / 1000.0))), 0) AS span_s, "
    # Slices wait side by side: their waits overlap in wall time.
    "coalesce(sum(throttled_ms), 0) / 1000.0 / greatest(count(DISTINCT slice), 1) "
    "AS throttled_s "
    f"FROM {SCHEMA}.backfill_batches WHERE backfill_id = %(id)s "
    "AND committed_at > (SELECT max(committed_at) FROM "
    f"  {SCHEMA}.backfill_batches WHERE backfill_id = %(id)s) - make_interval(secs => %(w)s)"
)
# The latest reason any slice waited for, when, and since when if the throttle still holds
# (a slice holding one first).
LAST_THROTTLE = (
    f"SELECT throttle_reason, throttled_at, throttle_since FROM {SCHEMA}.backfill_slices "
    "WHERE backfill_id = %(id)s AND throttled_at IS NOT NULL "
    "ORDER BY throttle_since IS NULL, throttled_at DESC LIMIT 1"
)


def _rows(conn: Any, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        names = [column.name for column in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def exists(conn: Any) -> bool:
    """Whether this database has a ledger (without creating one)."""
    return bool(_rows(conn, LEDGER_EXISTS, {"t": f"{SCHEMA}.runs"})[0]["?column?"])


def get_run(conn: Any, run_id: str) -> Run | None:
    """The run with ``run_id`` and its steps, or None."""
    found = _rows(conn, SELECT_RUN, {"id": run_id})
    if not found:
        return None
    run = Run(**found[0])
    run.steps = [Step(**r) for r in _rows(conn, SELECT_STEPS, {"id": run_id})]
    return run


def get_backfill(conn: Any, backfill_id: str) -> Backfill | None:
    """The backfill with ``backfill_id`` (its counters summed over its slices), or None."""
    found = _rows(conn, SELECT_BACKFILL, {"id": backfill_id})
    return Backfill(**found[0]) if found else None


def list_slices(conn: Any, backfill_id: str) -> list[Slice]:
    """A backfill's slices, in key order."""
    return [Slice(**r) for r in _rows(conn, SELECT_SLICES, {"id": backfill_id})]


def recent_rate(conn: Any, backfill_id: str, window_s: int = 60) -> tuple[int, float]:
    """Rows and busy seconds of the last ``window_s`` seconds of batches (RECENT_RATE)."""
    row = _rows(conn, RECENT_RATE, {"id": backfill_id, "w": window_s})[0]
    busy = float(row["span_s"]) - float(row["throttled_s"])
    return int(row["rows"]), max(busy, 0.0)


def last_throttle(conn: Any, backfill_id: str) -> Throttle | None:
    """The latest reason any slice waited for (LAST_THROTTLE)."""
    found = _rows(conn, LAST_THROTTLE, {"id": backfill_id})
    return None if not found else Throttle(**found[0])


# The channel of jobs/ledger/notify.py CHANNEL (which imports SQLAlchemy; spelled again here).
LISTEN = "LISTEN runbook_runs"
SERVER_NOW = "SELECT now() AS now"


def listen(conn: Any) -> None:
    """Subscribe an autocommit psycopg2 connection to run and backfill changes."""
    with conn.cursor() as cur:
        cur.execute(LISTEN)


def wait_for_notice(conn: Any, ids: set[str], timeout_s: float) -> bool:
    """Whether one of ``ids`` was announced within ``timeout_s`` (False: the time ran out; the
    caller reads again either way, so a lost notification costs only the wait)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([conn], [], [], left)[0]:
            return False
        conn.poll()
        hit = any(n.payload in ids for n in conn.notifies)
        conn.notifies.clear()
        if hit:
            return True
    return False


def server_now(conn: Any) -> Any:
    """The database server's clock (timestamptz): what the ledger's times are taken by."""
    return _rows(conn, SERVER_NOW, {})[0]["now"]


# -- a ledger older than this runbook -----------------------------------------------------------

# What a read gets from a ledger that an earlier runbook made: a column or a table that a
# later migration (jobs/ledger/migrations/) adds is missing. Writes upgrade the ledger first
# (jobs/ledger/schema.py ensure); reads find out this way, at no cost when it is current.
_BEHIND = ("42703", "42P01")  # undefined_column, undefined_table


def reading(target: Target, work: Callable[[Any], T]) -> T:
    """``work(conn)`` on a read-only psycopg2 connection to ``target``
    (jobs/pg/connect.py reading). When the ledger is older than this runbook's, it is
    upgraded as any write would upgrade it (with SQLAlchemy, on this rare path only) and
    ``work`` runs again."""
    from jobs.pg import connect

    try:
        with connect.reading(target) as conn:
            return work(conn)
    except Exception as exc:
        if getattr(exc, "pgcode", None) not in _BEHIND:
            raise
    from jobs.ledger import schema
    from jobs.pg import db

    log.info("target %s: the ledger predates this runbook; upgrading it", target.name)
    with db.connect(target) as conn:
        schema.ensure(conn)
    with connect.reading(target) as conn:
        return work(conn)
