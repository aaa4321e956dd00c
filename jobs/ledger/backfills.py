"""The ledger's backfills: the operator's state, settings, progress and throttling."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from jobs import ids
from jobs.errors import IllegalTransition
from jobs.ledger.notify import notify
from jobs.ledger.schema import SCHEMA
from jobs.ledger.sql import clean, iso, tx

# -- backfills ----------------------------------------------------------------------------------
# The state names and the legal transitions are jobs/states.py's; functions here that change
# a state take the table (or the claim mapping) from there.
#
# A backfill's key range is cut into slices (one by default), each walked by its own task with
# its own cursor and generation. The backfill row holds what the operator controls (state:
# pause, cancel, resume) and what was asked for; each slice row holds a walk's checkpoint.

# Slice states: a slice is `active` while a worker may walk it, `stopped` once its worker saw
# a pause, cancel or error (resume makes it active again), `done` when its range is walked.
SLICE_ACTIVE = "active"
SLICE_STOPPED = "stopped"
SLICE_DONE = "done"


@dataclass
class Backfill:
    id: str
    target: str
    run_id: str | None
    revision: str | None
    table_name: str
    key_column: str
    key_type: str
    set_sql: str
    where_sql: str | None
    state: str
    upper_key: str | None
    batch_size: int
    min_batch: int
    max_batch: int
    target_batch_ms: int
    sleep_ms: int
    lock_timeout_ms: int
    statement_timeout_ms: int
    slices: int
    on_error: str
    max_xact_age_s: int
    rows_total_estimate: int | None
    estimate_kind: str | None
    error: str | None
    error_range: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    # Summed over the slices.
    rows_done: int = 0
    throttled_ms: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for key in ("created_at", "started_at", "finished_at", "updated_at"):
            out[key] = iso(out[key])
        return out


@dataclass
class Slice:
    backfill_id: str
    slice: int
    lower_key: str | None  # the walk starts after this key (None: at the first key)
    upper_key: str  # and ends with this one
    cursor: str | None  # the last key done (None: none yet)
    generation: int
    state: str
    batch_size: int  # the next batch's size
    rows_done: int
    throttled_ms: int
    updated_at: datetime

    @property
    def position(self) -> str | None:
        """The key the next batch starts after."""
        return self.cursor if self.cursor is not None else self.lower_key

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "updated_at": iso(self.updated_at)}


@dataclass
class BackfillBatch:
    id: int
    backfill_id: str
    slice: int
    lo: str | None
    hi: str
    batch_size: int
    rows: int
    skipped: int
    duration_ms: int
    throttled_ms: int
    attempt: int
    generation: int
    committed_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "committed_at": iso(self.committed_at)}


# The backfill's own row; the counters summed over its slices are left at 0. Enough for a
# batch and a state change, which read it on every batch and should not sum the slices.
BACKFILL_ROW = (
    "b.id, b.target, b.run_id, b.revision, b.table_name, b.key_column, b.key_type, b.set_sql, "
    "b.where_sql, b.state, b.upper_key, b.batch_size, b.min_batch, b.max_batch, "
    "b.target_batch_ms, b.sleep_ms, b.lock_timeout_ms, b.statement_timeout_ms, b.slices, "
    "b.on_error, b.max_xact_age_s, b.rows_total_estimate, b.estimate_kind, b.error, "
    "b.error_range, b.created_at, b.started_at, b.finished_at, b.updated_at"
)
_BACKFILL_COLUMNS = (
    f"{BACKFILL_ROW}, "
    f"(SELECT CAST(coalesce(sum(s.rows_done), 0) AS bigint) FROM {SCHEMA}.backfill_slices s "
    " WHERE s.backfill_id = b.id) AS rows_done, "
    f"(SELECT CAST(coalesce(sum(s.throttled_ms), 0) AS bigint) FROM {SCHEMA}.backfill_slices s "
    " WHERE s.backfill_id = b.id) AS throttled_ms, "
    f"(SELECT count(*) FROM {SCHEMA}.backfill_skipped k WHERE k.backfill_id = b.id) AS skipped"
)
SLICE_COLUMNS = (
    "backfill_id, slice, lower_key, upper_key, cursor, generation, state, batch_size, "
    "rows_done, throttled_ms, updated_at"
)
_BATCH_COLUMNS = (
    "id, backfill_id, slice, lo, hi, batch_size, rows, skipped, duration_ms, throttled_ms, "
    "attempt, generation, committed_at"
)
_BACKFILL_SETTINGS = (
    "batch_size",
    "min_batch",
    "max_batch",
    "target_batch_ms",
    "sleep_ms",
    "lock_timeout_ms",
    "statement_timeout_ms",
    "max_xact_age_s",
)


BACKFILL_FIELDS = frozenset(c.strip().removeprefix("b.") for c in BACKFILL_ROW.split(","))


def _backfill(row: Any) -> Backfill:
    return Backfill(**row._mapping)


def create_backfill(
    conn: Connection,
    *,
    target: str,
    run_id: str | None,
    revision: str | None,
    table_name: str,
    key_column: str,
    key_type: str,
    set_sql: str,
    where_sql: str | None,
    state: str,
    upper_key: str | None,
    bounds: list[str],
    on_error: str,
    rows_total_estimate: int | None,
    estimate_kind: str | None,
    settings: dict[str, int],
    finished: bool = False,
) -> str:
    """Record a new backfill and its slices; its id. Commits.

    ``bounds`` are the slices' last keys, ascending, the last one ``upper_key`` (empty for an
    empty table); ``settings``: batch sizes, pacing, timeouts.
    """
    assert set(settings) == set(_BACKFILL_SETTINGS), settings
    backfill_id = ids.new_backfill_id()
    names = ", ".join(_BACKFILL_SETTINGS)
    binds = ", ".join(f":{k}" for k in _BACKFILL_SETTINGS)
    with tx(conn):
        if run_id:
            notify(conn, run_id)
        conn.execute(
            text(
                f"INSERT INTO {SCHEMA}.backfills (id, target, run_id, revision, table_name, "
                "key_column, key_type, set_sql, where_sql, state, upper_key, slices, on_error, "
                f"rows_total_estimate, estimate_kind, finished_at, {names}) VALUES (:id, "
                ":target, :run_id, :revision, :table, :key, :key_type, :set_sql, :where_sql, "
                ":state, :upper, :slices, :on_error, :estimate, :kind, "
                f"CASE WHEN :finished THEN now() END, {binds})"
            ),
            {
                "id": backfill_id,
                "target": target,
                "run_id": run_id,
                "revision": revision,
                "table": table_name,
                "key": key_column,
                "key_type": key_type,
                "set_sql": set_sql,
                "where_sql": where_sql,
                "state": state,
                "upper": upper_key,
                "slices": len(bounds),
                "on_error": on_error,
                "estimate": rows_total_estimate,
                "kind": estimate_kind,
                "finished": finished,
                **settings,
            },
        )
        for number, upper in enumerate(bounds):
            conn.execute(
                text(
                    f"INSERT INTO {SCHEMA}.backfill_slices (backfill_id, slice, lower_key, "
                    "upper_key, batch_size) VALUES (:id, :n, :lower, :upper, :size)"
                ),
                {
                    "id": backfill_id,
                    "n": number,
                    "lower": bounds[number - 1] if number else None,
                    "upper": upper,
                    "size": settings["batch_size"],
                },
            )
    return backfill_id


def get_backfill(conn: Connection, backfill_id: str) -> Backfill | None:
    """The backfill with ``backfill_id``, or None."""
    row = conn.execute(
        text(f"SELECT {_BACKFILL_COLUMNS} FROM {SCHEMA}.backfills b WHERE b.id = :id"),
        {"id": backfill_id},
    ).first()
    if conn.in_transaction():
        conn.rollback()
    return _backfill(row) if row else None


def list_backfills(
    conn: Connection,
    *,
    target: str | None = None,
    run_id: str | None = None,
    revision: str | None = None,
    limit: int = 50,
) -> list[Backfill]:
    """Backfills, newest first, optionally of one target, one run or one declaring revision."""
    rows = conn.execute(
        text(
            f"SELECT {_BACKFILL_COLUMNS} FROM {SCHEMA}.backfills b "
            "WHERE (CAST(:t AS text) IS NULL OR b.target = :t) "
            "AND (CAST(:r AS text) IS NULL OR b.run_id = :r) "
            "AND (CAST(:v AS text) IS NULL OR b.revision = :v) "
            "ORDER BY b.created_at DESC LIMIT :n"
        ),
        {"t": target, "r": run_id, "v": revision, "n": limit},
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return [_backfill(r) for r in rows]


def list_slices(conn: Connection, backfill_id: str) -> list[Slice]:
    """A backfill's slices, in key order."""
    rows = conn.execute(
        text(
            f"SELECT {SLICE_COLUMNS} FROM {SCHEMA}.backfill_slices "
            "WHERE backfill_id = :id ORDER BY slice"
        ),
        {"id": backfill_id},
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return [Slice(**r._mapping) for r in rows]


def list_batches(conn: Connection, backfill_id: str) -> list[BackfillBatch]:
    """A backfill's committed batches, in the order they committed."""
    rows = conn.execute(
        text(
            f"SELECT {_BATCH_COLUMNS} FROM {SCHEMA}.backfill_batches "
            "WHERE backfill_id = :id ORDER BY id"
        ),
        {"id": backfill_id},
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return [BackfillBatch(**r._mapping) for r in rows]


def list_skipped(conn: Connection, backfill_id: str) -> list[tuple[str, str]]:
    """The keys an isolating backfill left alone, with the error each row raised."""
    rows = conn.execute(
        text(
            f"SELECT key, error FROM {SCHEMA}.backfill_skipped WHERE backfill_id = :id "
            "ORDER BY recorded_at, key"
        ),
        {"id": backfill_id},
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return [(r.key, r.error) for r in rows]


def recent_rate(conn: Connection, backfill_id: str, window_s: int = 60) -> tuple[int, float]:
    """Rows and seconds of work (throttled time left out) over the last ``window_s`` seconds
    of committed batches, all slices together: the rate an ETA is drawn from."""
    row = conn.execute(
        text(
            "SELECT coalesce(sum(rows), 0) AS rows, "
            "coalesce(extract(epoch FROM max(committed_at) - min(committed_at - "
            "  make_interval(secs => duration_ms / 1000.0))), 0) AS span_s, "
            # Slices wait side by side: their waits overlap in wall time.
            "coalesce(sum(throttled_ms), 0) / 1000.0 / greatest(count(DISTINCT slice), 1) "
            "AS throttled_s "
            f"FROM {SCHEMA}.backfill_batches WHERE backfill_id = :id "
            "AND committed_at > (SELECT max(committed_at) FROM "
            f"  {SCHEMA}.backfill_batches WHERE backfill_id = :id) - make_interval(secs => :w)"
        ),
        {"id": backfill_id, "w": window_s},
    ).one()
    if conn.in_transaction():
        conn.rollback()
    busy = float(row.span_s) - float(row.throttled_s)
    return int(row.rows), max(busy, 0.0)


def set_state(
    conn: Connection,
    backfill_id: str,
    new_state: str | dict[str, str],
    transitions: dict[str, frozenset[str]],
    *,
    terminal: frozenset[str] = frozenset(),
) -> tuple[str, str] | None:
    """Move a backfill to ``new_state`` (or to ``new_state[current state]``) if ``transitions``
    allows it; (old, new), or None for an unknown backfill. Asking for the state it is in
    changes nothing. Commits."""
    with tx(conn):
        current = lock_for_state(conn, backfill_id)
        if current is None:
            return None
        old = current.state
        new = new_state.get(old) if isinstance(new_state, dict) else new_state
        if new is None:
            raise IllegalTransition(f"backfill {backfill_id} is {old}; that does not apply to it")
        if new != old and new not in transitions.get(old, frozenset()):
            raise IllegalTransition(f"backfill {backfill_id} is {old}; it cannot become {new}")
        if new != old:
            _mark(conn, current, new, finished=new in terminal)
    return old, new


def lock_backfill(conn: Connection, backfill_id: str) -> Backfill | None:
    """The backfill's own row (no counters), locked until the caller's transaction ends (no
    commit here)."""
    return lock_for_state(conn, backfill_id)


def read_backfill(conn: Connection, backfill_id: str) -> Backfill | None:
    """The backfill's own row (no counters) inside the caller's transaction, not locked (a
    batch reads the operator's flags this way, so that slices never wait for each other on
    the backfill's row)."""
    row = conn.execute(
        text(f"SELECT {BACKFILL_ROW} FROM {SCHEMA}.backfills b WHERE b.id = :id"),
        {"id": backfill_id},
    ).first()
    return _backfill(row) if row else None


def last_throttle(conn: Connection, backfill_id: str) -> tuple[str, datetime] | None:
    """The latest database signal any slice waited on, and when."""
    row = conn.execute(
        text(
            f"SELECT throttle_reason, throttled_at FROM {SCHEMA}.backfill_slices "
            "WHERE backfill_id = :id AND throttled_at IS NOT NULL "
            "ORDER BY throttled_at DESC LIMIT 1"
        ),
        {"id": backfill_id},
    ).first()
    if conn.in_transaction():
        conn.rollback()
    return None if row is None else (str(row.throttle_reason), row.throttled_at)


def mark_backfill(
    conn: Connection,
    backfill: Backfill,
    state: str,
    *,
    finished: bool = False,
    error: str | None = None,
    error_range: dict[str, Any] | None = None,
) -> None:
    """Within the caller's transaction (the row locked by lock_backfill): set the state and,
    for an error, its text and the key range that failed."""
    _mark(conn, backfill, state, finished=finished, error=error, error_range=error_range)


def lock_for_state(conn: Connection, backfill_id: str) -> Backfill | None:
    # NO KEY UPDATE, not UPDATE: a batch in flight holds its slice row and then takes KEY SHARE
    # on this row for its batch record's foreign key; FOR UPDATE here (held while a claim waits
    # for that slice row) would deadlock with it.
    row = conn.execute(
        text(f"SELECT {BACKFILL_ROW} FROM {SCHEMA}.backfills b WHERE b.id = :id FOR NO KEY UPDATE"),
        {"id": backfill_id},
    ).first()
    return _backfill(row) if row else None


def _mark(
    conn: Connection,
    backfill: Backfill,
    state: str,
    *,
    finished: bool,
    error: str | None = None,
    error_range: dict[str, Any] | None = None,
) -> None:
    if backfill.run_id:
        notify(conn, backfill.run_id)
    notify(conn, backfill.id)  # wakes `runbook backfill --wait` (api.follow_backfill)
    sets = ["state = :state", "updated_at = now()"]
    if finished:
        sets.append("finished_at = now()")
    if error is not None:
        sets += ["error = :error", "error_range = CAST(:range AS jsonb)"]
    conn.execute(
        text(f"UPDATE {SCHEMA}.backfills SET {', '.join(sets)} WHERE id = :id"),
        {
            "state": state,
            "error": clean(error),
            "range": None if error_range is None else json.dumps(error_range),
            "id": backfill.id,
        },
    )
    backfill.state = state
