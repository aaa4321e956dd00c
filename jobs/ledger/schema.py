"""The ledger's schema ``runbook`` in each target: versioned migrations, applied by runbook
itself, excluded from every backup and restore.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from jobs.ledger.read import (
    SCHEMA,
)
from jobs.ledger.sql import tx
from jobs.pg.db import ADMISSION_LOCK_KEY

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


def exists(conn: Connection) -> bool:
    """Whether this database has a ledger (without creating one)."""
    return bool(
        conn.execute(
            text("SELECT to_regclass(:t) IS NOT NULL"), {"t": f"{SCHEMA}.runs"}
        ).scalar_one()
    )


def ensure(conn: Connection) -> None:
    """Create or upgrade the ledger schema; safe to call concurrently. Commits."""
    with tx(conn):
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
