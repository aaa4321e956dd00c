"""The operator's requests (start, pause, resume, cancel) and the states a backfill settles
in once its slices stop, each move checked against the transition table in jobs/states.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from jobs.errors import (
    UnknownBackfill,
)
from jobs.ledger import backfills, records
from jobs.ledger import slices as ledger_slices
from jobs.states import (
    BACKFILL_ALL_DONE,
    BACKFILL_ALL_STOPPED,
    ERRORED,
    SliceState,
)
from jobs.states import BACKFILL_CANCEL as CANCEL
from jobs.states import BACKFILL_CLAIM as CLAIM
from jobs.states import BACKFILL_PAUSE as PAUSE
from jobs.states import BACKFILL_RESUME as RESUME
from jobs.states import BACKFILL_TERMINAL as TERMINAL
from jobs.states import BACKFILL_TRANSITIONS as TRANSITIONS
from jobs.states import (
    check_backfill_transition as check_transition,
)

log = logging.getLogger("runbook.backfill")
FENCED = "fenced"  # a newer generation owns the backfill: this worker stops


# -- operator requests ------------------------------------------------------------------------


def get(conn: Connection, backfill_id: str) -> records.Backfill:
    """The backfill; UnknownBackfill when the ledger has none with that id."""
    found = backfills.get_backfill(conn, backfill_id)
    if found is None:
        raise UnknownBackfill(f"unknown backfill {backfill_id!r}; `runbook backfills` lists them")
    return found


def start(conn: Connection, backfill_id: str, *, resume: bool = False) -> list[tuple[int, int]]:
    """Take the backfill over: each unfinished slice gets a new generation (fencing every
    earlier worker); [(slice, generation)], one task to send for each.

    Without ``resume`` (a start, a reconciler's takeover) a pending pause or cancel stays;
    with it (the operator's resume) a paused or errored backfill runs again.
    """
    slices = ledger_slices.claim(conn, backfill_id, RESUME if resume else CLAIM, fresh=resume)
    if slices is None:
        raise UnknownBackfill(f"unknown backfill {backfill_id!r}; `runbook backfills` lists them")
    return slices


def _request(conn: Connection, backfill_id: str, moves: dict[str, str]) -> str:
    """Move the backfill as ``moves`` says for the state it is in; the new state."""
    done = backfills.set_state(conn, backfill_id, moves, TRANSITIONS, terminal=TERMINAL)
    if done is None:
        raise UnknownBackfill(f"unknown backfill {backfill_id!r}; `runbook backfills` lists them")
    return done[1]


def pause(conn: Connection, backfill_id: str) -> str:
    """Ask the backfill to pause; its slices stop before their next batch (``pausing`` →
    ``paused`` once all have)."""
    return _request(conn, backfill_id, PAUSE)


def cancel(conn: Connection, backfill_id: str) -> str:
    """Ask the backfill to stop for good; batches already committed stay."""
    return _request(conn, backfill_id, CANCEL)


def settled_state(state: str, slices: list[str]) -> str | None:
    """What the backfill becomes once its slices are as ``slices`` say, or None (no change):
    succeeded when every slice is done, paused or cancelled once none is still active."""
    if slices and all(s == SliceState.DONE for s in slices):
        return BACKFILL_ALL_DONE.get(state)
    if SliceState.ACTIVE in slices:
        return None
    return BACKFILL_ALL_STOPPED.get(state)


def settle(conn: Connection, backfill_id: str) -> str | None:
    """Move the backfill as its slices allow (see settled_state); the state it reached, or
    None when it did not move. Commits."""
    with conn.begin():
        bf = backfills.lock_backfill(conn, backfill_id)
        if bf is None:
            return None
        new = settled_state(bf.state, ledger_slices.slice_states(conn, backfill_id))
        if new is None or new == bf.state:
            return None
        move_state(conn, bf, new)
    return new


def abandon(conn: Connection, backfill_id: str, slice_no: int, generation: int, why: str) -> str:
    """Stop a slice whose tasks keep dying (a poison slice): the backfill is errored with
    ``why`` and the slice's position, and resume can try again. The state reached. Commits."""
    with conn.begin():
        bf = backfills.lock_backfill(conn, backfill_id)
        piece = ledger_slices.lock_slice(conn, backfill_id, slice_no)
        if bf is None or piece is None or piece.generation != generation:
            return FENCED
        ledger_slices.set_slice_state(conn, piece, SliceState.STOPPED)
        if ERRORED not in TRANSITIONS[bf.state]:
            return bf.state
        where = Range(slice_no, piece.position, None)
        message = f"slice {slice_no} after key {piece.position or 'start'}: {why}"
        move_state(conn, bf, ERRORED, error=message, error_range=where.as_dict())
    return ERRORED


@dataclass
class Range:
    slice: int = 0
    lo: str | None = None
    hi: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"slice": self.slice, "lo": self.lo, "hi": self.hi}


def move_state(conn: Connection, bf: records.Backfill, new: str, **error: Any) -> None:
    """A worker's own state change, inside its transaction, checked against the table."""
    check_transition(bf.state, new)
    log.info("backfill %s: %s -> %s", bf.id, bf.state, new)
    backfills.mark_backfill(conn, bf, new, finished=new in TERMINAL, **error)
