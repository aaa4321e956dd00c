"""The ledger's backfills: the operator's state, settings, progress and throttling."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from sqlalchemy import Connection

from jobs import ids
from jobs.errors import IllegalTransition
from jobs.ledger.notify import notify
from jobs.ledger.records import Backfill, BackfillBatch, Slice, Throttle
from jobs.ledger.sql import clean, query, tx

# -- backfills ----------------------------------------------------------------------------------
# The state names and the legal transitions are jobs/states.py's; functions here that change
# a state take the table (or the claim mapping) from there.
#
# A backfill's key range is cut into slices (one by default), each walked by its own task with
# its own cursor and generation. The backfill row holds what the operator controls (state:
# pause, cancel, resume) and what was asked for; each slice row holds a walk's checkpoint.
# Slice states (SliceState, SLICE_TRANSITIONS) are jobs/states.py's too.

# The settings create_backfill takes (jobs/ledger/queries/backfills.sql insert_backfill).
BACKFILL_SETTINGS = (
    "batch_size",
    "min_batch",
    "max_batch",
    "target_batch_ms",
    "sleep_ms",
    "lock_timeout_ms",
    "statement_timeout_ms",
    "max_xact_age_s",
    "max_replica_lag_ms",
    "max_replica_lag_bytes",
    "max_retained_wal_bytes",
    "max_wal_rate_bytes",
    "max_throttle_ms",
)

# The backfill's own row: its columns, without the counters summed over its slices. Enough
# for a batch and a state change, which read it on every batch and should not sum the slices.
BACKFILL_FIELDS = frozenset(f.name for f in fields(Backfill)) - {
    "rows_done",
    "throttled_ms",
    "skipped",
}


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
    settings: dict[str, int | None],
    finished: bool = False,
    marks: Any = None,
) -> str:
    """Record a new backfill and its slices; its id. Commits.

    ``bounds`` are the slices' last keys, ascending, the last one ``upper_key`` (empty for an
    empty table); ``settings``: batch sizes, pacing, timeouts; ``marks``: the slices' key
    marks (jobs/backfill/marks.py Marks), which the progress is estimated from.
    """
    assert set(settings) == set(BACKFILL_SETTINGS), settings
    backfill_id = ids.new_backfill_id()
    with tx(conn):
        if run_id:
            notify(conn, run_id)
        conn.execute(
            query("insert_backfill"),
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
        _insert_slices(conn, backfill_id, bounds, int(settings["batch_size"] or 0), marks)
    return backfill_id


def set_estimate(
    conn: Connection,
    backfill_id: str,
    estimate: int,
    kind: str,
    marks: Any = None,
    *,
    session_name: str,
) -> None:
    """Replace a running backfill's estimate (its rows to update, their kind and, when they
    were not counted, each slice's key marks). Commits. The backfill's row before its
    slices' rows: the order of every state change, so it cannot deadlock with one. A slice's
    row waits for its batch in flight: ``session_name`` is the application_name the walk
    does not count as a session its batch holds up (jobs/backfill/batch_sql.py)."""
    with tx(conn):
        conn.execute(query("name_session"), {"name": session_name})
        conn.execute(query("set_estimate"), {"id": backfill_id, "estimate": estimate, "kind": kind})
        for number, piece in enumerate([] if marks is None else marks.slices):
            conn.execute(
                query("set_slice_marks"),
                {"id": backfill_id, "n": number, "marks": piece.marks, "keys": piece.keys},
            )


def _insert_slices(
    conn: Connection, backfill_id: str, bounds: list[str], batch_size: int, marks: Any
) -> None:
    """A new backfill's slices: each walks the keys after the previous one's last key."""
    for number, upper in enumerate(bounds):
        piece = None if marks is None else marks.slices[number]
        conn.execute(
            query("insert_backfill_slice"),
            {
                "id": backfill_id,
                "n": number,
                "lower": bounds[number - 1] if number else None,
                "upper": upper,
                "size": batch_size,
                "marks": None if piece is None else piece.marks,
                "keys": None if piece is None else piece.keys,
            },
        )


def get_backfill(conn: Connection, backfill_id: str) -> Backfill | None:
    """The backfill with ``backfill_id``, or None."""
    row = conn.execute(query("get_backfill"), {"id": backfill_id}).first()
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
        query("list_backfills"), {"t": target, "r": run_id, "v": revision, "n": limit}
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return [_backfill(r) for r in rows]


def list_slices(conn: Connection, backfill_id: str) -> list[Slice]:
    """A backfill's slices, in key order."""
    rows = conn.execute(query("list_slices"), {"id": backfill_id}).all()
    if conn.in_transaction():
        conn.rollback()
    return [Slice(**r._mapping) for r in rows]


def list_batches(conn: Connection, backfill_id: str) -> list[BackfillBatch]:
    """A backfill's committed batches, in the order they committed."""
    rows = conn.execute(query("list_batches"), {"id": backfill_id}).all()
    if conn.in_transaction():
        conn.rollback()
    return [BackfillBatch(**r._mapping) for r in rows]


def list_skipped(conn: Connection, backfill_id: str) -> list[tuple[str, str]]:
    """The keys an isolating backfill left alone, with the error each row raised."""
    rows = conn.execute(query("list_skipped"), {"id": backfill_id}).all()
    if conn.in_transaction():
        conn.rollback()
    return [(r.key, r.error) for r in rows]


def recent_rate(conn: Connection, backfill_id: str, window_s: int = 60) -> tuple[int, float]:
    """Rows and seconds of work (throttled time left out) over the last ``window_s`` seconds
    of committed batches, all slices together: the rate an ETA is drawn from."""
    row = conn.execute(query("recent_rate"), {"id": backfill_id, "w": window_s}).one()
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
    row = conn.execute(query("read_backfill"), {"id": backfill_id}).first()
    return _backfill(row) if row else None


def last_throttle(conn: Connection, backfill_id: str) -> Throttle | None:
    """The latest reason any slice waited for, when, and since when if it still holds."""
    row = conn.execute(query("last_throttle"), {"id": backfill_id}).first()
    if conn.in_transaction():
        conn.rollback()
    return None if row is None else Throttle(**row._mapping)


def note_standbys(conn: Connection, backfill_id: str, seen: list[str], note: str | None) -> bool:
    """Record the standbys the backfill has seen and the note on those gone; whether that
    changed what was recorded (another slice may have recorded it first). Commits."""
    with tx(conn):
        row = conn.execute(
            query("note_standbys"), {"id": backfill_id, "seen": seen, "note": note}
        ).first()
    return row is not None


def set_pause_reason(conn: Connection, backfill_id: str, reason: str) -> None:
    """Within the caller's transaction: why the backfill paused itself."""
    conn.execute(query("set_pause_reason"), {"id": backfill_id, "reason": clean(reason)})


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
    row = conn.execute(query("lock_backfill_for_state"), {"id": backfill_id}).first()
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
    conn.execute(
        query("mark_backfill"),
        {
            "state": state,
            "finished": finished,
            "set_error": error is not None,
            "error": clean(error),
            "range": None if error_range is None else json.dumps(error_range),
            "id": backfill.id,
        },
    )
    backfill.state = state
