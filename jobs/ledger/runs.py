"""The ledger's runs and steps.

Postgres is the source of truth for a run; Redis only carries the messages.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection

from jobs import ids
from jobs.errors import TargetBusy, UnknownRun
from jobs.ledger.notify import CHANNEL, notify
from jobs.ledger.records import Run, Step
from jobs.ledger.sql import clean, query, tx
from jobs.pg.db import ADMISSION_LOCK_KEY
from jobs.states import ENQUEUED, TERMINAL, StepState, check_step_transition, check_transition


def admit(
    conn: Connection,
    *,
    target: str,
    kind: str,
    from_revision: str | None,
    to_revision: str | None,
    options: dict[str, Any],
    irreversible: dict[str, str] | None = None,
) -> str:
    """Record a new enqueued run, unless another run of the target is not finished.

    The admission lock makes check-and-insert atomic against concurrent `apply`s.
    """
    run_id = ids.new_run_id()
    with tx(conn):
        conn.execute(query("take_admission_lock"), {"k": ADMISSION_LOCK_KEY})
        holder = conn.execute(query("unfinished_run"), {"terminal": sorted(TERMINAL)}).first()
        if holder is not None:
            raise TargetBusy(
                f"target {target!r} is busy: run {holder.id} is {holder.state}; wait for it "
                f"(runbook status {holder.id} --watch) or resume it (runbook resume {holder.id})",
                holder=holder.id,
            )
        conn.execute(
            query("insert_run"),
            {
                "id": run_id,
                "target": target,
                "kind": kind,
                "state": ENQUEUED,
                "from_rev": from_revision,
                "to_rev": to_revision,
                "options": json.dumps(options),
                "irreversible": json.dumps(irreversible or {}),
            },
        )
    return run_id


def _run_from_row(row: Any) -> Run:
    return Run(**row._mapping)


def get_run(conn: Connection, run_id: str, *, with_steps: bool = True) -> Run:
    """The run with ``run_id`` and its steps; UnknownRun when this ledger lacks it."""
    row = conn.execute(query("get_run"), {"id": run_id}).first()
    if row is None:
        raise UnknownRun(f"unknown run {run_id!r}; `runbook history` lists the runs")
    run = _run_from_row(row)
    if with_steps:
        rows = conn.execute(query("run_steps"), {"id": run_id})
        run.steps = [Step(**r._mapping) for r in rows]
    if conn.in_transaction():
        conn.commit()
    return run


def list_runs(conn: Connection, *, limit: int = 50) -> list[Run]:
    rows = conn.execute(query("list_runs"), {"n": limit}).all()
    if conn.in_transaction():
        conn.commit()
    return [_run_from_row(r) for r in rows]


def transition(conn: Connection, run: Run, new_state: str, *, error: str | None = None) -> None:
    """Move ``run`` to ``new_state`` if the transition table allows it. Commits."""
    check_transition(run.state, new_state)
    with tx(conn):
        notify(conn, run.id)
        updated = conn.execute(
            query("transition_run"),
            {
                "new": new_state,
                "old": run.state,
                "id": run.id,
                "set_error": error is not None,
                "error": clean(error),
                "finishes": new_state in TERMINAL,
                "starts": run.started_at is None and new_state != ENQUEUED,
            },
        ).rowcount
    if updated != 1:
        # Someone else moved it first (cancel, a duplicate task): re-read and refuse.
        fresh = get_run(conn, run.id, with_steps=False)
        check_transition(fresh.state, new_state)
        return transition(conn, fresh, new_state, error=error)
    run.state = new_state
    if error is not None:
        run.error = clean(error)


# The columns update_run sets (jobs/ledger/queries/runs.sql update_run), and which are jsonb.
_UPDATABLE = frozenset(
    {"current_revision", "backup", "fingerprint_before", "error", "irreversible"}
)
_JSONB = frozenset({"backup", "irreversible"})


def update_run(conn: Connection, run: Run, **values: Any) -> None:
    """Set plain columns of a run (current_revision, backup, fingerprint_before, ...)."""
    assert set(values) <= _UPDATABLE, values
    params: dict[str, Any] = {"id": run.id}
    for column in _UPDATABLE:
        value = values.get(column)
        params[column] = json.dumps(value) if column in _JSONB and column in values else value
        params[f"set_{column}"] = column in values
    with tx(conn):
        notify(conn, run.id)
        conn.execute(query("update_run"), params)
    for k, v in values.items():
        setattr(run, k, v)


def count_delivery(conn: Connection, run: Run) -> None:
    with tx(conn):
        notify(conn, run.id)
        run.deliveries = conn.execute(query("count_delivery"), {"id": run.id}).scalar_one()


def start_step(conn: Connection, run: Run, kind: str, revision: str | None = None) -> Step:
    """Record that a step starts, or that an interrupted one starts again (attempts + 1)."""
    rev = revision or ""
    previous = run.step(kind, rev)
    if previous is not None:
        check_step_transition(previous.state, StepState.RUNNING)
    with tx(conn):
        row = conn.execute(
            query("start_step"),
            {"ch": CHANNEL, "run": run.id, "kind": kind, "rev": rev},
        ).one()
    step = Step(**row._mapping)
    run.steps = [s for s in run.steps if s.id != step.id] + [step]
    return step


def bump_attempts(conn: Connection, step: Step, error: str) -> None:
    """Count one more attempt of a running step (a retried lock timeout)."""
    with tx(conn):
        notify(conn, step.run_id, flush=False)
        step.attempts = conn.execute(
            query("bump_step_attempts"), {"e": clean(error), "id": step.id}
        ).scalar_one()


def finish_step(
    conn: Connection,
    step: Step,
    state: str,
    *,
    error: str | None = None,
    current_revision: str | None = None,
    **detail: Any,
) -> None:
    """Close a step; with ``current_revision``, move the run's revision in the same commit."""
    check_step_transition(step.state, state)
    step.detail = {**step.detail, **detail}
    with tx(conn):
        conn.execute(
            query("finish_step"),
            {
                "ch": CHANNEL,
                "run": step.run_id,
                "rev": current_revision,
                "move": current_revision is not None,
                "state": state,
                "error": clean(error),
                "d": json.dumps(step.detail),
                "id": step.id,
            },
        )
    step.state = state
    step.error = clean(error)


# -- declared backfills (coordinator) --


def note_step(conn: Connection, step: Step, **detail: Any) -> None:
    """Add to a running step's detail without closing it (the backfill a step waits for,
    so that `status` shows it while the run waits). Commits."""
    step.detail = {**step.detail, **detail}
    with tx(conn):
        notify(conn, step.run_id)
        conn.execute(query("note_step"), {"d": json.dumps(step.detail), "id": step.id})
