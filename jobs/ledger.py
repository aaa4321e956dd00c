"""The ledger: runs and steps in schema ``runbook`` of the target database.

This module owns all of the ledger's SQL. Postgres is the source of truth for a run; Redis
only carries the messages. The schema is versioned and upgraded here, by runbook itself,
and is excluded from every backup and restore.
"""

from __future__ import annotations

import functools
import json
import select
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from jobs.config import redact
from jobs.db import ADMISSION_LOCK_KEY
from jobs.errors import IllegalTransition, TargetBusy, UnknownRun
from jobs.states import ENQUEUED, TERMINAL, check_transition

SCHEMA = "runbook"
# The statements a backfill batch runs each time, parsed once (text() costs ~50 us each).
_cached_text = functools.lru_cache(maxsize=256)(text)
# Every change to a run or its steps is announced here (payload: the run id), so that
# `wait` and `status --watch` follow a run without polling it.
CHANNEL = "runbook_runs"

# Each entry upgrades the ledger by one version; never edit one that has shipped.
_MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE {SCHEMA}.runs (
        id              text PRIMARY KEY,
        target          text NOT NULL,
        kind            text NOT NULL,
        state           text NOT NULL,
        from_revision   text,
        to_revision     text,
        current_revision text,
        error           text,
        options         jsonb NOT NULL DEFAULT '{{}}',
        backup          jsonb,
        fingerprint_before text,
        created_at      timestamptz NOT NULL DEFAULT now(),
        started_at      timestamptz,
        finished_at     timestamptz,
        updated_at      timestamptz NOT NULL DEFAULT now(),
        deliveries      integer NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_target_created ON {SCHEMA}.runs (target, created_at DESC);
    CREATE TABLE {SCHEMA}.steps (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id      text NOT NULL REFERENCES {SCHEMA}.runs (id) ON DELETE CASCADE,
        kind        text NOT NULL,
        revision    text NOT NULL DEFAULT '',
        state       text NOT NULL,
        started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
        finished_at timestamptz,
        attempts    integer NOT NULL DEFAULT 1,
        error       text,
        detail      jsonb NOT NULL DEFAULT '{{}}',
        -- A run upgrades, verifies or downgrades a revision at most once: this is what
        -- makes a redelivered task find its step instead of doing it twice.
        UNIQUE (run_id, kind, revision)
    );
    """,
    f"""
    -- What the plan knows before a run starts: revisions whose downgrade cannot undo them.
    ALTER TABLE {SCHEMA}.runs ADD COLUMN irreversible jsonb NOT NULL DEFAULT '{{}}';
    CREATE TABLE {SCHEMA}.backups (
        id          text PRIMARY KEY,
        target      text NOT NULL,
        run_id      text REFERENCES {SCHEMA}.runs (id) ON DELETE SET NULL,
        path        text NOT NULL,
        size        bigint NOT NULL,
        sha256      text NOT NULL,
        taken_at    timestamptz NOT NULL DEFAULT now(),
        verified    boolean NOT NULL,
        verification jsonb NOT NULL DEFAULT '{{}}',
        -- per table: rows and content checksum of the dumped snapshot
        tables      jsonb NOT NULL DEFAULT '{{}}',
        copies      jsonb NOT NULL DEFAULT '[]',
        revision    text,
        deleted_at  timestamptz
    );
    CREATE INDEX backups_target_taken ON {SCHEMA}.backups (target, taken_at DESC);
    """,
    f"""
    -- Batched, resumable UPDATEs walked by a unique key. The cursor (last key done, as
    -- text) moves in the same transaction as each batch's UPDATE and its batch row; the
    -- generation fences a zombie worker: only the latest claim may commit a batch.
    CREATE TABLE {SCHEMA}.backfills (
        id              text PRIMARY KEY,
        target          text NOT NULL,
        run_id          text REFERENCES {SCHEMA}.runs (id) ON DELETE SET NULL,
        table_name      text NOT NULL,
        key_column      text NOT NULL,
        key_type        text NOT NULL,
        set_sql         text NOT NULL,
        where_sql       text,
        state           text NOT NULL,
        generation      bigint NOT NULL DEFAULT 0,
        cursor          text,
        upper_key       text,
        batch_size      integer NOT NULL,
        min_batch       integer NOT NULL,
        max_batch       integer NOT NULL,
        target_batch_ms integer NOT NULL,
        sleep_ms        integer NOT NULL,
        lock_timeout_ms integer NOT NULL,
        statement_timeout_ms integer NOT NULL,
        rows_done       bigint NOT NULL DEFAULT 0,
        rows_total_estimate bigint,
        estimate_kind   text CHECK (estimate_kind IN ('counted', 'planner')),
        error           text,
        error_range     jsonb,
        throttled_ms    bigint NOT NULL DEFAULT 0,
        created_at      timestamptz NOT NULL DEFAULT now(),
        started_at      timestamptz,
        finished_at     timestamptz,
        updated_at      timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX backfills_target_created ON {SCHEMA}.backfills (target, created_at DESC);
    CREATE TABLE {SCHEMA}.backfill_batches (
        id           bigserial PRIMARY KEY,
        backfill_id  text NOT NULL REFERENCES {SCHEMA}.backfills (id) ON DELETE CASCADE,
        lo           text,
        hi           text NOT NULL,
        batch_size   integer NOT NULL,
        rows         integer NOT NULL,
        duration_ms  integer NOT NULL,
        attempt      integer NOT NULL,
        generation   bigint NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        -- Keys only grow along the walk: a second batch ending at the same key would be a
        -- batch applied twice, whatever the code above got wrong.
        UNIQUE (backfill_id, hi)
    );
    """,
    f"""
    -- Parallel slices, each with its own cursor and generation (moved off the backfill's
    -- row); the revision that declared a backfill; rows an isolating backfill skipped.
    ALTER TABLE {SCHEMA}.backfills
        ADD COLUMN revision text,
        ADD COLUMN slices integer NOT NULL DEFAULT 1,
        ADD COLUMN on_error text NOT NULL DEFAULT 'stop' CHECK (on_error IN ('stop', 'isolate')),
        ADD COLUMN max_xact_age_s integer NOT NULL DEFAULT 600;
    CREATE INDEX backfills_run ON {SCHEMA}.backfills (run_id) WHERE run_id IS NOT NULL;
    CREATE TABLE {SCHEMA}.backfill_slices (
        backfill_id  text NOT NULL REFERENCES {SCHEMA}.backfills (id) ON DELETE CASCADE,
        slice        integer NOT NULL,
        lower_key    text,
        upper_key    text NOT NULL,
        cursor       text,
        generation   bigint NOT NULL DEFAULT 0,
        state        text NOT NULL DEFAULT 'active'
                     CHECK (state IN ('active', 'stopped', 'done')),
        batch_size   integer NOT NULL,
        rows_done    bigint NOT NULL DEFAULT 0,
        throttled_ms bigint NOT NULL DEFAULT 0,
        throttle_reason text,
        throttled_at timestamptz,
        updated_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (backfill_id, slice)
    );
    INSERT INTO {SCHEMA}.backfill_slices (backfill_id, slice, upper_key, cursor, generation,
        state, batch_size, rows_done, throttled_ms)
    SELECT id, 0, upper_key, cursor, generation,
           CASE WHEN state = 'succeeded' THEN 'done' ELSE 'active' END,
           batch_size, rows_done, throttled_ms
    FROM {SCHEMA}.backfills WHERE upper_key IS NOT NULL;
    ALTER TABLE {SCHEMA}.backfills DROP COLUMN cursor, DROP COLUMN generation,
        DROP COLUMN rows_done, DROP COLUMN throttled_ms;
    ALTER TABLE {SCHEMA}.backfill_batches
        ADD COLUMN slice integer NOT NULL DEFAULT 0,
        ADD COLUMN skipped integer NOT NULL DEFAULT 0,
        ADD COLUMN throttled_ms integer NOT NULL DEFAULT 0;
    CREATE TABLE {SCHEMA}.backfill_skipped (
        backfill_id text NOT NULL REFERENCES {SCHEMA}.backfills (id) ON DELETE CASCADE,
        slice       integer NOT NULL,
        key         text NOT NULL,
        error       text NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (backfill_id, key)
    );
    """,
    f"""
    -- Leases: a delivery of a run renews heartbeat_at while it works; `unfinished` counts
    -- deliveries (of a run, of a slice) that started and never returned, to stop a poison one.
    ALTER TABLE {SCHEMA}.runs
        ADD COLUMN heartbeat_at timestamptz,
        ADD COLUMN heartbeat_by text,
        ADD COLUMN unfinished integer NOT NULL DEFAULT 0;
    ALTER TABLE {SCHEMA}.backfill_slices ADD COLUMN unfinished integer NOT NULL DEFAULT 0;
    CREATE INDEX runs_unfinished ON {SCHEMA}.runs (created_at) WHERE finished_at IS NULL;
    """,
]


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
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
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
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "deliveries": self.deliveries,
            "irreversible": self.irreversible,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def exists(conn: Connection) -> bool:
    """Whether this database has a ledger (without creating one)."""
    return bool(
        conn.execute(
            text("SELECT to_regclass(:t) IS NOT NULL"), {"t": f"{SCHEMA}.runs"}
        ).scalar_one()
    )


def ensure(conn: Connection) -> None:
    """Create or upgrade the ledger schema; safe to call concurrently. Commits."""
    with _tx(conn):
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADMISSION_LOCK_KEY})
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        conn.execute(
            text(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.ledger_version (version integer NOT NULL)")
        )
        version = conn.execute(text(f"SELECT max(version) FROM {SCHEMA}.ledger_version")).scalar()
        for number, ddl in enumerate(_MIGRATIONS, start=1):
            if version is None or number > version:
                conn.execute(text(ddl))
                conn.execute(
                    text(f"INSERT INTO {SCHEMA}.ledger_version (version) VALUES (:v)"),
                    {"v": number},
                )


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


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
    run_id = new_run_id()
    with _tx(conn):
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
    with _tx(conn):
        _notify(conn, run.id)
        updated = conn.execute(
            text(f"UPDATE {SCHEMA}.runs SET {', '.join(sets)} WHERE id = :id AND state = :old"),
            {"new": new_state, "old": run.state, "id": run.id, "error": _clean(error)},
        ).rowcount
    if updated != 1:
        # Someone else moved it first (cancel, a duplicate task): re-read and refuse.
        fresh = get_run(conn, run.id, with_steps=False)
        check_transition(fresh.state, new_state)
        return transition(conn, fresh, new_state, error=error)
    run.state = new_state
    if error is not None:
        run.error = _clean(error)


def update_run(conn: Connection, run: Run, **values: Any) -> None:
    """Set plain columns of a run (current_revision, backup, fingerprint_before, ...)."""
    allowed = {"current_revision", "backup", "fingerprint_before", "error", "irreversible"}
    assert set(values) <= allowed, values
    jsonb = {"backup", "irreversible"}
    params = {k: (json.dumps(v) if k in jsonb else v) for k, v in values.items()}
    sets = ", ".join(f"{k} = CAST(:{k} AS jsonb)" if k in jsonb else f"{k} = :{k}" for k in values)
    with _tx(conn):
        _notify(conn, run.id)
        conn.execute(
            text(f"UPDATE {SCHEMA}.runs SET {sets}, updated_at = now() WHERE id = :id"),
            {**params, "id": run.id},
        )
    for k, v in values.items():
        setattr(run, k, v)


def count_delivery(conn: Connection, run: Run) -> None:
    with _tx(conn):
        _notify(conn, run.id)
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
    with _tx(conn):
        row = conn.execute(
            text(
                f"{_ANNOUNCED} INSERT INTO {SCHEMA}.steps (run_id, kind, revision, state) "
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
    with _tx(conn):
        _notify(conn, step.run_id, flush=False)
        step.attempts = conn.execute(
            text(
                f"UPDATE {SCHEMA}.steps SET attempts = attempts + 1, error = :e "
                "WHERE id = :id RETURNING attempts"
            ),
            {"e": _clean(error), "id": step.id},
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
    with _tx(conn):
        conn.execute(
            text(
                f"{_ANNOUNCED}, moved AS (UPDATE {SCHEMA}.runs SET current_revision = :rev, "
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
                "error": _clean(error),
                "d": json.dumps(step.detail),
                "id": step.id,
            },
        )
    step.state = state
    step.error = _clean(error)


@dataclass
class Backup:
    id: str
    target: str
    run_id: str | None
    path: str
    size: int
    sha256: str
    taken_at: datetime
    verified: bool
    verification: dict[str, Any]
    tables: dict[str, Any]
    copies: list[dict[str, Any]]
    revision: str | None
    deleted_at: datetime | None

    def as_dict(self, *, with_tables: bool = False) -> dict[str, Any]:
        out = {
            "id": self.id,
            "target": self.target,
            "run": self.run_id,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "taken_at": _iso(self.taken_at),
            "verified": self.verified,
            "verification": self.verification,
            "copies": self.copies,
            "revision": self.revision,
            "deleted_at": _iso(self.deleted_at),
        }
        if with_tables:
            out["tables"] = self.tables
        return out


_BACKUP_COLUMNS = (
    "id, target, run_id, path, size, sha256, taken_at, verified, verification, tables, "
    "copies, revision, deleted_at"
)


def record_backup(conn: Connection, backup: Backup) -> None:
    with _tx(conn):
        conn.execute(
            text(
                f"INSERT INTO {SCHEMA}.backups ({_BACKUP_COLUMNS}) VALUES (:id, :target, "
                ":run_id, :path, :size, :sha256, :taken_at, :verified, CAST(:verification AS "
                "jsonb), CAST(:tables AS jsonb), CAST(:copies AS jsonb), :revision, :deleted_at)"
            ),
            {
                **backup.__dict__,
                "verification": json.dumps(backup.verification),
                "tables": json.dumps(backup.tables),
                "copies": json.dumps(backup.copies),
            },
        )


def get_backup(conn: Connection, backup_id: str) -> Backup | None:
    row = conn.execute(
        text(f"SELECT {_BACKUP_COLUMNS} FROM {SCHEMA}.backups WHERE id = :id"), {"id": backup_id}
    ).first()
    if conn.in_transaction():
        conn.rollback()
    return Backup(**row._mapping) if row else None


def list_backups(conn: Connection, target: str, *, include_deleted: bool = False) -> list[Backup]:
    rows = conn.execute(
        text(
            f"SELECT {_BACKUP_COLUMNS} FROM {SCHEMA}.backups WHERE target = :t "
            + ("" if include_deleted else "AND deleted_at IS NULL ")
            + "ORDER BY taken_at DESC"
        ),
        {"t": target},
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return [Backup(**r._mapping) for r in rows]


def mark_backup_deleted(conn: Connection, backup_id: str) -> None:
    with _tx(conn):
        conn.execute(
            text(f"UPDATE {SCHEMA}.backups SET deleted_at = now() WHERE id = :id"),
            {"id": backup_id},
        )


def latest_rehearsal(
    conn: Connection, from_revision: str | None, to_revision: str | None
) -> dict[str, Any] | None:
    """The newest rehearsal of exactly these revisions: its run id, state and findings."""
    row = conn.execute(
        text(
            f"SELECT r.id, r.state, r.finished_at, s.detail FROM {SCHEMA}.runs r "
            f"JOIN {SCHEMA}.steps s ON s.run_id = r.id AND s.kind = 'rehearse' "
            "WHERE r.kind = 'rehearse' AND r.state IN ('succeeded', 'failed') "
            "AND r.from_revision IS NOT DISTINCT FROM :f AND r.to_revision IS NOT DISTINCT FROM :t "
            "ORDER BY r.created_at DESC LIMIT 1"
        ),
        {"f": from_revision, "t": to_revision},
    ).first()
    if conn.in_transaction():
        conn.rollback()
    if row is None:
        return None
    return {"run": row.id, "state": row.state, "finished_at": _iso(row.finished_at), **row.detail}


def applied_file_hashes(conn: Connection) -> list[tuple[str, str, str]]:
    """(revision, file_sha256, run_id) of each revision runbook applied and did not undo:
    per revision, the latest succeeded upgrade or downgrade step decides."""
    rows = conn.execute(
        text(
            "SELECT DISTINCT ON (s.revision) s.revision, s.kind, s.run_id, r.state AS run_state, "
            "s.detail->>'file_sha256' AS file_sha256 "
            f"FROM {SCHEMA}.steps s JOIN {SCHEMA}.runs r ON r.id = s.run_id "
            "WHERE s.kind IN ('upgrade', 'downgrade') AND s.state = 'succeeded' "
            "AND s.revision <> '' ORDER BY s.revision, s.id DESC"
        )
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return [
        (r.revision, r.file_sha256, r.run_id)
        for r in rows
        if r.kind == "upgrade" and r.run_state != "restored" and r.file_sha256
    ]


def ledger_changes(conn: Connection) -> list[Any]:
    """Succeeded upgrade and downgrade steps, newest first: (kind, revision, run_id)."""
    if not exists(conn):
        return []
    rows = conn.execute(
        text(
            f"SELECT kind, revision, run_id FROM {SCHEMA}.steps "
            "WHERE kind IN ('upgrade', 'downgrade') AND state = 'succeeded' AND revision <> '' "
            "ORDER BY id DESC"
        )
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return list(rows)


def recorded_fingerprints(conn: Connection) -> dict[str, str]:
    """The latest schema fingerprint each revision's verify step recorded."""
    if not exists(conn):
        return {}
    rows = conn.execute(
        text(
            "SELECT DISTINCT ON (revision) revision, detail->>'fingerprint' AS fp "
            f"FROM {SCHEMA}.steps WHERE kind = 'verify' AND state = 'succeeded' "
            "AND detail->>'fingerprint' IS NOT NULL ORDER BY revision, id DESC"
        )
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return {r.revision: r.fp for r in rows}


def recorded_fingerprint(conn: Connection, revision: str | None) -> str | None:
    """The schema fingerprint a past run's verify step recorded at ``revision``."""
    if revision is None:
        return None
    value = conn.execute(
        text(
            f"SELECT detail->>'fingerprint' FROM {SCHEMA}.steps WHERE kind = 'verify' "
            "AND revision = :rev AND state = 'succeeded' ORDER BY id DESC LIMIT 1"
        ),
        {"rev": revision},
    ).scalar()
    if conn.in_transaction():
        conn.rollback()
    return str(value) if value else None


# What _notify(flush=False) does, as a CTE of a step record's own statement (one round trip
# less per record); the statement must read from ``announced`` for it to run.
_ANNOUNCED = (
    "WITH announced AS (SELECT pg_notify(:ch, :run), set_config('synchronous_commit', 'off', true))"
)


def _notify(conn: Connection, run_id: str, *, flush: bool = True) -> None:
    """Announce a change of ``run_id``. ``flush=False`` (step records) also lets this
    transaction commit without waiting for its WAL to reach the disk: the next synchronous
    commit on the server (the next revision's migration, the run's next state change)
    flushes it too, so a Postgres crash can lose only the step records written after the
    last of those, which a redelivered run redoes after checking the database, as it does
    after a worker died before recording them (jobs/coordinator.py). One fsync less per
    step record."""
    if flush:
        conn.execute(text("SELECT pg_notify(:ch, :id)"), {"ch": CHANNEL, "id": run_id})
    else:
        conn.execute(
            text("SELECT pg_notify(:ch, :id), set_config('synchronous_commit', 'off', true)"),
            {"ch": CHANNEL, "id": run_id},
        )


def listen(conn: Connection) -> None:
    """Subscribe an autocommit connection to run and backfill changes (see wait_for_change)."""
    conn.execute(text(f"LISTEN {CHANNEL}"))


def wait_for_change(conn: Connection, run_id: str, timeout_s: float) -> None:
    """Return when ``run_id`` changed, or after ``timeout_s`` (a safety net for a lost
    notification: the caller re-reads the run either way)."""
    raw: Any = conn.connection.dbapi_connection
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if select.select([raw], [], [], left)[0]:
            raw.poll()
            hit = any(n.payload == run_id for n in raw.notifies)
            raw.notifies.clear()
            if hit:
                return


def _tx(conn: Connection) -> Any:
    """A fresh transaction. Ledger writes commit inside their own block, so whatever is
    still open here is a read left by SQLAlchemy's autobegin (or one a lock timeout
    aborted): rolling it back loses nothing."""
    if conn.in_transaction():
        conn.rollback()
    return conn.begin()


def _clean(message: str | None) -> str | None:
    return None if message is None else redact(message)


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
            out[key] = _iso(out[key])
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
        return {**self.__dict__, "updated_at": _iso(self.updated_at)}


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
        return {**self.__dict__, "committed_at": _iso(self.committed_at)}


# The backfill's own row; the counters summed over its slices are left at 0. Enough for a
# batch and a state change, which read it on every batch and should not sum the slices.
_BACKFILL_ROW = (
    "b.id, b.target, b.run_id, b.revision, b.table_name, b.key_column, b.key_type, b.set_sql, "
    "b.where_sql, b.state, b.upper_key, b.batch_size, b.min_batch, b.max_batch, "
    "b.target_batch_ms, b.sleep_ms, b.lock_timeout_ms, b.statement_timeout_ms, b.slices, "
    "b.on_error, b.max_xact_age_s, b.rows_total_estimate, b.estimate_kind, b.error, "
    "b.error_range, b.created_at, b.started_at, b.finished_at, b.updated_at"
)
_BACKFILL_COLUMNS = (
    f"{_BACKFILL_ROW}, "
    f"(SELECT CAST(coalesce(sum(s.rows_done), 0) AS bigint) FROM {SCHEMA}.backfill_slices s "
    " WHERE s.backfill_id = b.id) AS rows_done, "
    f"(SELECT CAST(coalesce(sum(s.throttled_ms), 0) AS bigint) FROM {SCHEMA}.backfill_slices s "
    " WHERE s.backfill_id = b.id) AS throttled_ms, "
    f"(SELECT count(*) FROM {SCHEMA}.backfill_skipped k WHERE k.backfill_id = b.id) AS skipped"
)
_SLICE_COLUMNS = (
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


_BACKFILL_FIELDS = frozenset(c.strip().removeprefix("b.") for c in _BACKFILL_ROW.split(","))


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
    backfill_id = new_run_id()
    names = ", ".join(_BACKFILL_SETTINGS)
    binds = ", ".join(f":{k}" for k in _BACKFILL_SETTINGS)
    with _tx(conn):
        if run_id:
            _notify(conn, run_id)
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
            f"SELECT {_SLICE_COLUMNS} FROM {SCHEMA}.backfill_slices "
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
    with _tx(conn):
        current = _lock(conn, backfill_id)
        if current is None:
            return None
        if current.state not in after_claim:
            raise IllegalTransition(
                f"backfill {backfill_id} is {current.state}; only a backfill that is "
                f"{', '.join(sorted(after_claim))} can be started or resumed"
            )
        if current.run_id:
            _notify(conn, current.run_id)
        _notify(conn, backfill_id)
        conn.execute(
            text(
                f"UPDATE {SCHEMA}.backfills SET state = :state, "
                "error = CASE WHEN state = 'errored' THEN NULL ELSE error END, "
                "error_range = CASE WHEN state = 'errored' THEN NULL ELSE error_range END, "
                "started_at = coalesce(started_at, now()), updated_at = now() WHERE id = :id"
            ),
            {"state": after_claim[current.state], "id": backfill_id},
        )
        rows = conn.execute(
            text(
                f"UPDATE {SCHEMA}.backfill_slices SET generation = generation + 1, "
                f"state = '{SLICE_ACTIVE}', updated_at = now(), "
                "unfinished = CASE WHEN :fresh THEN 0 ELSE unfinished END "
                f"WHERE backfill_id = :id AND state <> '{SLICE_DONE}' RETURNING slice, generation"
            ),
            {"id": backfill_id, "fresh": fresh},
        ).all()
    return sorted((int(r.slice), int(r.generation)) for r in rows)


def handoff(conn: Connection, backfill_id: str, slice_no: int, generation: int) -> int | None:
    """Pass an active slice from ``generation`` to the next one (for the continuation task),
    so that a redelivered copy of the finished task is fenced; None when no longer ours."""
    with _tx(conn):
        value = conn.execute(
            text(
                f"UPDATE {SCHEMA}.backfill_slices SET generation = generation + 1, "
                "updated_at = now() WHERE backfill_id = :id AND slice = :n AND generation = :g "
                f"AND state = '{SLICE_ACTIVE}' RETURNING generation"
            ),
            {"id": backfill_id, "n": slice_no, "g": generation},
        ).scalar()
    return None if value is None else int(value)


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
    with _tx(conn):
        current = _lock(conn, backfill_id)
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
    return _lock(conn, backfill_id)


def read_backfill(conn: Connection, backfill_id: str) -> Backfill | None:
    """The backfill's own row (no counters) inside the caller's transaction, not locked (a
    batch reads the operator's flags this way, so that slices never wait for each other on
    the backfill's row)."""
    row = conn.execute(
        text(f"SELECT {_BACKFILL_ROW} FROM {SCHEMA}.backfills b WHERE b.id = :id"),
        {"id": backfill_id},
    ).first()
    return _backfill(row) if row else None


_SLICE_NAMES = tuple(c.strip() for c in _SLICE_COLUMNS.split(","))
_SLICE_AS = ", ".join(f"s.{c} AS s_{c}" for c in _SLICE_NAMES)


def open_batch(
    conn: Connection,
    backfill_id: str,
    slice_no: int,
    session: dict[str, str],
    extra: tuple[str, dict[str, Any]] | None = None,
) -> tuple[Slice, Backfill, Any] | None:
    """A batch transaction's first statement: set ``session``'s settings for the transaction
    (set_config, local), lock the slice row (until the transaction ends; no commit here) and
    read the backfill's own row, unlocked (so that slices never wait for each other on it).
    ``extra`` is one more scalar query (SQL, binds; binds must not start with ``bf_``)
    evaluated in the same statement: its value is the third item. One round trip instead of
    three or four; None for an unknown backfill or slice.

    The settings are set in the projection, which runs before the row lock is taken, so a
    lock_timeout among them already bounds this statement's wait for the slice row (the
    statement_timeout applies from the next statement on)."""
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
    row = conn.execute(
        _cached_text(
            f"SELECT {selected}{_SLICE_AS}, {_BACKFILL_ROW} "
            f"FROM {SCHEMA}.backfill_slices s JOIN {SCHEMA}.backfills b ON b.id = s.backfill_id "
            "WHERE s.backfill_id = :bf_id AND s.slice = :bf_slice FOR UPDATE OF s"
        ),
        binds,
    ).first()
    if row is None:
        return None
    values = row._mapping
    piece = Slice(**{c: values[f"s_{c}"] for c in _SLICE_NAMES})
    bf = Backfill(**{k: v for k, v in values.items() if k in _BACKFILL_FIELDS})
    return piece, bf, values[f"bf_col_{len(columns) - 1}"] if extra is not None else None


def lock_slice(conn: Connection, backfill_id: str, slice_no: int) -> Slice | None:
    """The slice, row-locked until the caller's transaction ends (no commit here)."""
    row = conn.execute(
        text(
            f"SELECT {_SLICE_COLUMNS} FROM {SCHEMA}.backfill_slices "
            "WHERE backfill_id = :id AND slice = :n FOR UPDATE"
        ),
        {"id": backfill_id, "n": slice_no},
    ).first()
    return Slice(**row._mapping) if row else None


def set_slice_state(conn: Connection, piece: Slice, state: str) -> None:
    """Within the caller's transaction (the slice locked by lock_slice)."""
    conn.execute(
        text(
            f"UPDATE {SCHEMA}.backfill_slices SET state = :state, updated_at = now() "
            "WHERE backfill_id = :id AND slice = :n"
        ),
        {"state": state, "id": piece.backfill_id, "n": piece.slice},
    )
    piece.state = state


def slice_states(conn: Connection, backfill_id: str) -> list[str]:
    """Each slice's state, within the caller's transaction."""
    rows = conn.execute(
        text(f"SELECT state FROM {SCHEMA}.backfill_slices WHERE backfill_id = :id"),
        {"id": backfill_id},
    ).scalars()
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
) -> int:
    """Within the caller's batch transaction: the batch row, rows skipped by isolation, the
    slice's cursor and counters, in one statement (one round trip).

    ``blocked_sql`` (a scalar query: how many sessions wait on this transaction's locks),
    when given, is counted in the same statement; when it counts any, the slice's next batch
    size is ``next_if_blocked`` instead of ``next_batch_size``. The count (0 without it)."""
    if backfill.run_id:
        _notify(conn, backfill.run_id)
    for key, error in skipped:
        conn.execute(
            text(
                f"INSERT INTO {SCHEMA}.backfill_skipped (backfill_id, slice, key, error) "
                "VALUES (:b, :n, :key, :error)"
            ),
            {"b": backfill.id, "n": piece.slice, "key": key, "error": _clean(error)},
        )
    blocked = f"({blocked_sql})" if blocked_sql else "0"
    value = conn.execute(
        _cached_text(
            f"WITH blocked AS MATERIALIZED (SELECT CAST({blocked} AS bigint) AS n), "
            f"batch AS (INSERT INTO {SCHEMA}.backfill_batches (backfill_id, slice, lo, hi, "
            "batch_size, rows, skipped, duration_ms, throttled_ms, attempt, generation) VALUES "
            "(:b, :n, :lo, :hi, :size, :rows, :skipped, :ms, :throttled, :attempt, :g)), "
            f"moved AS (UPDATE {SCHEMA}.backfill_slices SET cursor = :hi, "
            "rows_done = rows_done + :rows, batch_size = CASE WHEN (SELECT n FROM blocked) > 0 "
            "THEN :shrunk ELSE :next END, throttled_ms = throttled_ms + :throttled, "
            "updated_at = now() WHERE backfill_id = :b AND slice = :n) "
            "SELECT n FROM blocked"
        ),
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


def add_throttled(
    conn: Connection, backfill_id: str, slice_no: int, ms: int, reason: str | None = None
) -> None:
    """Count time a slice waited between batches (not yet in a batch row) and, when a
    database signal made it wait, why. Commits."""
    with _tx(conn):
        conn.execute(
            text(
                f"UPDATE {SCHEMA}.backfill_slices SET throttled_ms = throttled_ms + :ms, "
                "throttle_reason = coalesce(:reason, throttle_reason), "
                "throttled_at = CASE WHEN :reason IS NULL THEN throttled_at ELSE now() END "
                "WHERE backfill_id = :id AND slice = :n"
            ),
            {"ms": ms, "reason": reason, "id": backfill_id, "n": slice_no},
        )


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


def _lock(conn: Connection, backfill_id: str) -> Backfill | None:
    # NO KEY UPDATE, not UPDATE: a batch in flight holds its slice row and then takes KEY SHARE
    # on this row for its batch record's foreign key; FOR UPDATE here (held while a claim waits
    # for that slice row) would deadlock with it.
    row = conn.execute(
        text(
            f"SELECT {_BACKFILL_ROW} FROM {SCHEMA}.backfills b WHERE b.id = :id FOR NO KEY UPDATE"
        ),
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
        _notify(conn, backfill.run_id)
    _notify(conn, backfill.id)  # wakes `runbook backfill --wait` (api.follow_backfill)
    sets = ["state = :state", "updated_at = now()"]
    if finished:
        sets.append("finished_at = now()")
    if error is not None:
        sets += ["error = :error", "error_range = CAST(:range AS jsonb)"]
    conn.execute(
        text(f"UPDATE {SCHEMA}.backfills SET {', '.join(sets)} WHERE id = :id"),
        {
            "state": state,
            "error": _clean(error),
            "range": None if error_range is None else json.dumps(error_range),
            "id": backfill.id,
        },
    )
    backfill.state = state


# -- leases and reconciliation ------------------------------------------------------------------
# A delivery of a run's task holds a lease (heartbeat_at, renewed while it works) and counts
# itself in `unfinished` until it returns normally; a slice's lease is its updated_at (every
# batch and hand-off renews it) and its `unfinished` the same count. The reconciler sends
# again what has no live lease; a count that keeps growing is a poison message.


def begin_delivery(conn: Connection, run_id: str, worker: str) -> int | None:
    """A delivery of the run's task starts: take the lease; how many deliveries in a row have
    now started without returning (this one included). None when the run has ended. Commits."""
    with _tx(conn):
        value = conn.execute(
            text(
                f"UPDATE {SCHEMA}.runs SET unfinished = unfinished + 1, heartbeat_at = now(), "
                "heartbeat_by = :w WHERE id = :id AND finished_at IS NULL RETURNING unfinished"
            ),
            {"id": run_id, "w": worker},
        ).scalar()
    return None if value is None else int(value)


def heartbeat(conn: Connection, run_id: str) -> None:
    """Renew the run's lease. Commits."""
    with _tx(conn):
        conn.execute(
            text(f"UPDATE {SCHEMA}.runs SET heartbeat_at = now() WHERE id = :id"), {"id": run_id}
        )


def end_delivery(conn: Connection, run_id: str) -> None:
    """The delivery returned normally: the run is not poison, and its lease is given back."""
    with _tx(conn):
        conn.execute(
            text(
                f"UPDATE {SCHEMA}.runs SET unfinished = 0, heartbeat_at = NULL, "
                "heartbeat_by = NULL WHERE id = :id"
            ),
            {"id": run_id},
        )


def begin_slice_delivery(conn: Connection, backfill_id: str, slice_no: int, generation: int) -> int:
    """A slice's task starts: how many in a row have started without returning (this one
    included); 0 when the task is not the slice's current generation. Commits."""
    with _tx(conn):
        value = conn.execute(
            text(
                f"UPDATE {SCHEMA}.backfill_slices SET unfinished = unfinished + 1, "
                "updated_at = now() WHERE backfill_id = :id AND slice = :n AND generation = :g "
                "RETURNING unfinished"
            ),
            {"id": backfill_id, "n": slice_no, "g": generation},
        ).scalar()
    return 0 if value is None else int(value)


def end_slice_delivery(conn: Connection, backfill_id: str, slice_no: int) -> None:
    """The slice's task returned normally."""
    with _tx(conn):
        conn.execute(
            text(
                f"UPDATE {SCHEMA}.backfill_slices SET unfinished = 0 "
                "WHERE backfill_id = :id AND slice = :n"
            ),
            {"id": backfill_id, "n": slice_no},
        )


@dataclass
class StaleRun:
    id: str
    target: str
    state: str
    unfinished: int


def stale_runs(conn: Connection, lease_s: float) -> list[StaleRun]:
    """Unfinished runs nobody holds: no live lease (or, never started, queued longer than a
    lease), and no backfill of theirs still going (that backfill sends the run on)."""
    rows = conn.execute(
        text(
            f"SELECT r.id, r.target, r.state, r.unfinished FROM {SCHEMA}.runs r "
            "WHERE r.finished_at IS NULL "
            "AND coalesce(r.heartbeat_at, r.updated_at) < now() - make_interval(secs => :lease) "
            f"AND NOT EXISTS (SELECT 1 FROM {SCHEMA}.backfills b WHERE b.run_id = r.id "
            "  AND b.state IN ('enqueued', 'running', 'pausing', 'cancelling')) "
            "ORDER BY r.created_at"
        ),
        {"lease": lease_s},
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return [StaleRun(r.id, r.target, r.state, int(r.unfinished)) for r in rows]


def take_stale_slices(conn: Connection, lease_s: float) -> list[tuple[str, str, int, int]]:
    """Active slices of going backfills whose lease ran out, each taken over with a new
    generation (fencing a worker that may still wake up); [(backfill, target, slice,
    generation)] to send. A backfill created but never started is started. Commits."""
    with _tx(conn):
        started = conn.execute(
            text(
                f"UPDATE {SCHEMA}.backfills SET state = 'running', "
                "started_at = coalesce(started_at, now()), updated_at = now() "
                "WHERE state = 'enqueued' AND created_at < now() - make_interval(secs => :lease) "
                "RETURNING id"
            ),
            {"lease": lease_s},
        ).scalars()
        for backfill_id in list(started):
            conn.execute(
                text(
                    f"UPDATE {SCHEMA}.backfill_slices SET state = 'active', updated_at = "
                    "now() - make_interval(secs => :lease + 1) "
                    "WHERE backfill_id = :id AND state <> 'done'"
                ),
                {"id": backfill_id, "lease": lease_s},
            )
        rows = conn.execute(
            text(
                f"UPDATE {SCHEMA}.backfill_slices s SET generation = s.generation + 1, "
                f"updated_at = now() FROM {SCHEMA}.backfills b WHERE b.id = s.backfill_id "
                "AND b.state IN ('running', 'pausing', 'cancelling') AND s.state = 'active' "
                "AND s.updated_at < now() - make_interval(secs => :lease) "
                "RETURNING s.backfill_id, b.target, s.slice, s.generation"
            ),
            {"lease": lease_s},
        ).all()
    return [(r.backfill_id, r.target, int(r.slice), int(r.generation)) for r in rows]


# -- leftovers (jobs/leftovers.py): whose scratch database or partial dump is dead --


@dataclass
class RunDeliveries:
    id: str
    target: str
    state: str
    finished: bool
    deliveries: int


def run_deliveries(conn: Connection, run_ids: set[str]) -> dict[str, RunDeliveries]:
    """State and delivery count of each of ``run_ids`` this ledger holds."""
    rows = conn.execute(
        text(
            f"SELECT id, target, state, finished_at IS NOT NULL AS finished, deliveries "
            f"FROM {SCHEMA}.runs WHERE id = ANY(:ids)"
        ),
        {"ids": sorted(run_ids)},
    ).all()
    if conn.in_transaction():
        conn.rollback()
    return {
        r.id: RunDeliveries(r.id, r.target, r.state, bool(r.finished), int(r.deliveries))
        for r in rows
    }


# -- declared backfills (coordinator) --


def note_step(conn: Connection, step: Step, **detail: Any) -> None:
    """Add to a running step's detail without closing it (the backfill a step waits for,
    so that `status` shows it while the run waits). Commits."""
    step.detail = {**step.detail, **detail}
    with _tx(conn):
        _notify(conn, step.run_id)
        conn.execute(
            text(f"UPDATE {SCHEMA}.steps SET detail = CAST(:d AS jsonb) WHERE id = :id"),
            {"d": json.dumps(step.detail), "id": step.id},
        )
