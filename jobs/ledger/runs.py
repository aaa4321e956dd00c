"""The ledger's runs and steps.

Postgres is the source of truth for a run; Redis only carries the messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from jobs import ids
from jobs.errors import TargetBusy, UnknownRun
from jobs.ledger.notify import ANNOUNCED, CHANNEL, notify
from jobs.ledger.schema import SCHEMA
from jobs.ledger.sql import clean, iso, tx
from jobs.pg.db import ADMISSION_LOCK_KEY
from jobs.states import ENQUEUED, TERMINAL, check_transition


@dataclass
class Step:
    id: int
    run_id: str
    kind: str
    revision: str
    state: str
    started_at: datetime
    finished_at: datetime | None
    attempts: int
    error: str | None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "revision": self.revision or None,
            "state": self.state,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "attempts": self.attempts,
            "error": self.error,
            "detail": self.detail,
        }


@dataclass
class Run:
    id: str
    target: str
    kind: str
    state: str
    from_revision: str | None
    to_revision: str | None
    current_revision: str | None
    error: str | None
    options: dict[str, Any]
    backup: dict[str, Any] | None
    fingerprint_before: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deliveries: int
    irreversible: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def step(self, kind: str, revision: str | None = None) -> Step | None:
        for s in self.steps:
            if s.kind == kind and s.revision == (revision or ""):
                return s
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "target": self.target,
            "kind": self.kind,
            "state": self.state,
            "from_revision": self.from_revision,
            "to_revision": self.to_revision,
            "current_revision": self.current_revision,
            "backup": self.backup,
            "steps": [s.as_dict() for s in self.steps],
            "error": self.error,
            "options": self.options,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "deliveries": self.deliveries,
            "irreversible": self.irreversible,
        }


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
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADMISSION_LOCK_KEY})
        holder = conn.execute(
            text(
                f"SELECT id, state FROM {SCHEMA}.runs WHERE state <> ALL(:terminal) "
                "ORDER BY created_at LIMIT 1"
            ),
            {"terminal": sorted(TERMINAL)},
        ).first()
        if holder is not None:
            raise TargetBusy(
                f"target {target!r} is busy: run {holder.id} is {holder.state}; wait for it "
                f"(runbook status {holder.id} --watch) or resume it (runbook resume {holder.id})",
                holder=holder.id,
            )
        conn.execute(
            text(
                f"INSERT INTO {SCHEMA}.runs (id, target, kind, state, from_revision, "
                "to_revision, current_revision, options, irreversible) VALUES (:id, :target, "
                ":kind, :state, :from_rev, :to_rev, :from_rev, CAST(:options AS jsonb), "
                "CAST(:irreversible AS jsonb))"
            ),
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


_RUN_COLUMNS = (
    "id, target, kind, state, from_revision, to_revision, current_revision, error, options, "
    "backup, fingerprint_before, created_at, started_at, finished_at, deliveries, irreversible"
)


def _run_from_row(row: Any) -> Run:
    return Run(**row._mapping)


def get_run(conn: Connection, run_id: str, *, with_steps: bool = True) -> Run:
    """The run with ``run_id`` and its steps; UnknownRun when this ledger lacks it."""
    row = conn.execute(
        text(f"SELECT {_RUN_COLUMNS} FROM {SCHEMA}.runs WHERE id = :id"), {"id": run_id}
    ).first()
    if row is None:
        raise UnknownRun(f"unknown run {run_id!r}; `runbook history` lists the runs")
    run = _run_from_row(row)
    if with_steps:
        rows = conn.execute(
            text(
                "SELECT id, run_id, kind, revision, state, started_at, finished_at, attempts, "
                f"error, detail FROM {SCHEMA}.steps WHERE run_id = :id ORDER BY id"
            ),
            {"id": run_id},
        )
        run.steps = [Step(**r._mapping) for r in rows]
    if conn.in_transaction():
        conn.commit()
    return run


def list_runs(conn: Connection, *, limit: int = 50) -> list[Run]:
    rows = conn.execute(
        text(f"SELECT {_RUN_COLUMNS} FROM {SCHEMA}.runs ORDER BY created_at DESC LIMIT :n"),
        {"n": limit},
    ).all()
    if conn.in_transaction():
        conn.commit()
    return [_run_from_row(r) for r in rows]


def transition(conn: Connection, run: Run, new_state: str, *, error: str | None = None) -> None:
    """Move ``run`` to ``new_state`` if the transition table allows it. Commits."""
    check_transition(run.state, new_state)
    sets = ["state = :new", "updated_at = now()"]
    if error is not None:
        sets.append("error = :error")
    if new_state in TERMINAL:
        sets.append("finished_at = now()")
    if run.started_at is None and new_state != ENQUEUED:
        sets.append("started_at = coalesce(started_at, now())")
    with tx(conn):
        notify(conn, run.id)
        updated = conn.execute(
            text(f"UPDATE {SCHEMA}.runs SET {', '.join(sets)} WHERE id = :id AND state = :old"),
            {"new": new_state, "old": run.state, "id": run.id, "error": clean(error)},
        ).rowcount
    if updated != 1:
        # Someone else moved it first (cancel, a duplicate task): re-read and refuse.
        fresh = get_run(conn, run.id, with_steps=False)
        check_transition(fresh.state, new_state)
        return transition(conn, fresh, new_state, error=error)
    run.state = new_state
    if error is not None:
        run.error = clean(error)


def update_run(conn: Connection, run: Run, **values: Any) -> None:
    """Set plain columns of a run (current_revision, backup, fingerprint_before, ...)."""
    allowed = {"current_revision", "backup", "fingerprint_before", "error", "irreversible"}
    assert set(values) <= allowed, values
    jsonb = {"backup", "irreversible"}
    params = {k: (json.dumps(v) if k in jsonb else v) for k, v in values.items()}
    sets = ", ".join(f"{k} = CAST(:{k} AS jsonb)" if k in jsonb else f"{k} = :{k}" for k in values)
    with tx(conn):
        notify(conn, run.id)
        conn.execute(
            text(f"UPDATE {SCHEMA}.runs SET {sets}, updated_at = now() WHERE id = :id"),
            {**params, "id": run.id},
        )
    for k, v in values.items():
        setattr(run, k, v)


def count_delivery(conn: Connection, run: Run) -> None:
    with tx(conn):
        notify(conn, run.id)
        run.deliveries = conn.execute(
            text(
                f"UPDATE {SCHEMA}.runs SET deliveries = deliveries + 1 WHERE id = :id "
                "RETURNING deliveries"
            ),
            {"id": run.id},
        ).scalar_one()


def start_step(conn: Connection, run: Run, kind: str, revision: str | None = None) -> Step:
    """Record that a step starts, or that an interrupted one starts again (attempts + 1)."""
    rev = revision or ""
    with tx(conn):
        row = conn.execute(
            text(
                f"{ANNOUNCED} INSERT INTO {SCHEMA}.steps (run_id, kind, revision, state) "
                "SELECT :run, :kind, :rev, 'running' FROM announced "
                "ON CONFLICT (run_id, kind, revision) DO UPDATE SET "
                "attempts = steps.attempts + 1, state = 'running', error = NULL, "
                "started_at = clock_timestamp(), finished_at = NULL "
                "RETURNING id, run_id, kind, revision, state, started_at, finished_at, "
                "attempts, error, detail"
            ),
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
            text(
                f"UPDATE {SCHEMA}.steps SET attempts = attempts + 1, error = :e "
                "WHERE id = :id RETURNING attempts"
            ),
            {"e": clean(error), "id": step.id},
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
    step.detail = {**step.detail, **detail}
    with tx(conn):
        conn.execute(
            text(
                f"{ANNOUNCED}, moved AS (UPDATE {SCHEMA}.runs SET current_revision = :rev, "
                "updated_at = now() WHERE id = :run AND CAST(:move AS boolean)) "
                f"UPDATE {SCHEMA}.steps SET state = :state, error = :error, "
                "finished_at = clock_timestamp(), detail = CAST(:d AS jsonb) "
                "FROM announced WHERE id = :id"
            ),
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
        conn.execute(
            text(f"UPDATE {SCHEMA}.steps SET detail = CAST(:d AS jsonb) WHERE id = :id"),
            {"d": json.dumps(step.detail), "id": step.id},
        )
