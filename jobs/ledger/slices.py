"""The ledger's slices and batches: claims, hand-offs, and each batch recorded with its cursor
move in the batch's own transaction under the generation fence.
"""

from __future__ import annotations

import functools
from dataclasses import fields
from typing import Any

from sqlalchemy import Connection, TextClause, text

from jobs.errors import IllegalTransition
from jobs.ledger.backfills import BACKFILL_FIELDS, Backfill, Slice, lock_for_state
from jobs.ledger.notify import notify
from jobs.ledger.records import SLICE_ESTIMATE_FIELDS
from jobs.ledger.sql import clean, query, query_text, tx
from jobs.states import check_slice_transition


def claim(
    conn: Connection, backfill_id: str, after_claim: dict[str, str], *, fresh: bool = False
) -> list[tuple[int, int]] | None:
    """Take a backfill over: every slice not done gets a new generation, fencing every earlier
    worker, and is active again. Commits. ``fresh`` (an operator's resume) also forgets the
    deliveries that died: a takeover keeps counting them, so that a poison slice still stops.

    ``after_claim`` maps each claimable state to the state the claim leaves (a pause or a
    cancel asked for stays asked for). [(slice, generation)] of the slices to walk; None for
    an unknown backfill; IllegalTransition when its state is not claimable.
    """
    with tx(conn):
        current = lock_for_state(conn, backfill_id)
        if current is None:
            return None
        if current.state not in after_claim:
            raise IllegalTransition(
                f"backfill {backfill_id} is {current.state}; only a backfill that is "
                f"{', '.join(sorted(after_claim))} can be started or resumed"
            )
        if current.run_id:
            notify(conn, current.run_id)
        notify(conn, backfill_id)
        conn.execute(
            query("claim_backfill"), {"state": after_claim[current.state], "id": backfill_id}
        )
        rows = conn.execute(query("claim_slices"), {"id": backfill_id, "fresh": fresh}).all()
    return sorted((int(r.slice), int(r.generation)) for r in rows)


def handoff(conn: Connection, backfill_id: str, slice_no: int, generation: int) -> int | None:
    """Pass an active slice from ``generation`` to the next one (for the continuation task),
    so that a redelivered copy of the finished task is fenced; None when no longer ours."""
    with tx(conn):
        value = conn.execute(
            query("handoff_slice"), {"id": backfill_id, "n": slice_no, "g": generation}
        ).scalar()
    return None if value is None else int(value)


# open_batch reads the slice's columns as s_<name> (jobs/ledger/queries/slices.sql); a batch
# needs not the key marks progress is estimated from.
_SLICE_NAMES = tuple(f.name for f in fields(Slice) if f.name not in SLICE_ESTIMATE_FIELDS)


def open_batch(
    conn: Connection,
    backfill_id: str,
    slice_no: int,
    session: dict[str, str],
    extra: tuple[str, dict[str, Any]] | None = None,
    *,
    begin: bool = False,
) -> tuple[Slice, Backfill, Any] | None:
    """A batch transaction's first statement: set ``session``'s settings for the transaction
    (set_config, local), lock the slice row (until the transaction ends; no commit here) and
    read the backfill's own row, unlocked (so that slices never wait for each other on it).
    ``extra`` is one more scalar query (SQL, binds; binds must not start with ``bf_``)
    evaluated in the same statement: its value is the third item. One round trip instead of
    three or four; None for an unknown backfill or slice.

    The settings are set in the projection, which runs before the row lock is taken, so a
    lock_timeout among them already bounds this statement's wait for the slice row (the
    statement_timeout applies from the next statement on).

    ``begin``: the statement starts the transaction itself (``BEGIN;`` in the same round
    trip), for a connection whose driver is in autocommit (see jobs/backfill/walk.py _Walk)."""
    names = sorted(session)
    columns = [f"set_config(:bf_name_{i}, :bf_value_{i}, true)" for i in range(len(names))]
    binds: dict[str, Any] = {"bf_id": backfill_id, "bf_slice": slice_no}
    for i, name in enumerate(names):
        binds[f"bf_name_{i}"], binds[f"bf_value_{i}"] = name, session[name]
    if extra is not None:
        assert not any(k.startswith("bf_") for k in extra[1]), extra[1]
        columns.append(f"({extra[0]})")
        binds.update(extra[1])
    selected = "".join(f"{c} AS bf_col_{i}, " for i, c in enumerate(columns))
    row = conn.execute(_open_batch_statement(selected, begin), binds).first()
    if row is None:
        return None
    values = row._mapping
    piece = Slice(**{c: values[f"s_{c}"] for c in _SLICE_NAMES})
    bf = Backfill(**{k: v for k, v in values.items() if k in BACKFILL_FIELDS})
    return piece, bf, values[f"bf_col_{len(columns) - 1}"] if extra is not None else None


# A batch's statements, assembled once per shape: str.format of a 1 KB query costs more than
# the rest of the assembly (~10 us).
@functools.lru_cache(maxsize=64)
def _open_batch_statement(columns: str, begin: bool) -> TextClause:
    """open_batch's statement selecting ``columns`` first, starting the transaction too
    with ``begin``."""
    return text(("BEGIN; " if begin else "") + query_text("open_batch").format(columns=columns))


def lock_slice(conn: Connection, backfill_id: str, slice_no: int) -> Slice | None:
    """The slice, row-locked until the caller's transaction ends (no commit here)."""
    row = conn.execute(query("lock_slice"), {"id": backfill_id, "n": slice_no}).first()
    return Slice(**row._mapping) if row else None


def set_slice_state(conn: Connection, piece: Slice, state: str) -> None:
    """Within the caller's transaction (the slice locked by lock_slice)."""
    check_slice_transition(piece.state, state)
    conn.execute(
        query("set_slice_state"), {"state": state, "id": piece.backfill_id, "n": piece.slice}
    )
    piece.state = state


def slice_states(conn: Connection, backfill_id: str) -> list[str]:
    """Each slice's state, within the caller's transaction."""
    rows = conn.execute(query("slice_states"), {"id": backfill_id}).scalars()
    return [str(s) for s in rows]


def record_batch(
    conn: Connection,
    backfill: Backfill,
    piece: Slice,
    *,
    hi: str,
    batch_size: int,
    rows: int,
    skipped: list[tuple[str, str]],
    duration_ms: int,
    attempt: int,
    generation: int,
    next_batch_size: int,
    throttled_ms: int,
    blocked_sql: str | None = None,
    next_if_blocked: int | None = None,
    commit: bool = False,
) -> int:
    """Within the caller's batch transaction: the batch row, rows skipped by isolation, the
    slice's cursor and counters, in one statement (one round trip).

    ``blocked_sql`` (a scalar query: how many sessions wait on this transaction's locks),
    when given, is counted in the same statement; when it counts any, the slice's next batch
    size is ``next_if_blocked`` instead of ``next_batch_size``. The count (0 without it).

    ``commit``: the same round trip also commits, for a transaction opened by
    ``open_batch(begin=True)`` on a connection whose driver is in autocommit. The count then
    outlives the COMMIT in a session setting, read back by the round trip's last statement."""
    if backfill.run_id:
        notify(conn, backfill.run_id)
    for key, error in skipped:
        conn.execute(
            query("record_skipped"),
            {"b": backfill.id, "n": piece.slice, "key": key, "error": clean(error)},
        )
    value = conn.execute(
        _record_batch_statement(blocked_sql, commit),
        {
            "b": backfill.id,
            "n": piece.slice,
            "lo": piece.position,
            "hi": hi,
            "size": batch_size,
            "rows": rows,
            "skipped": len(skipped),
            "ms": duration_ms,
            "throttled": throttled_ms,
            "attempt": attempt,
            "g": generation,
            "next": next_batch_size,
            "shrunk": next_batch_size if next_if_blocked is None else next_if_blocked,
        },
    ).scalar_one()
    piece.cursor = hi
    return int(value)


@functools.lru_cache(maxsize=64)
def _record_batch_statement(blocked_sql: str | None, commit: bool) -> TextClause:
    """record_batch's statement, with or without its COMMIT, counting ``blocked_sql``."""
    template = query_text("record_batch").format(blocked=f"({blocked_sql})" if blocked_sql else "0")
    return text(f"{template}; {query_text('commit_after_batch')}" if commit else template)


def add_throttled(
    conn: Connection,
    backfill_id: str,
    slice_no: int,
    ms: int,
    reason: str | None = None,
    *,
    hold: bool | None = None,
) -> float | None:
    """Count time a slice waited between batches (not in a batch row: its next batch row
    carries it for the rate) and, given a ``reason``, why. ``hold``: True when a throttle
    holds now, False once it is over, None leaves it as it was. How many seconds the
    throttle has held (None when none does). Commits."""
    with tx(conn):
        held = conn.execute(
            query("add_throttled"),
            {"ms": ms, "reason": reason, "hold": hold, "id": backfill_id, "n": slice_no},
        ).scalar()
    return None if held is None else float(held)
