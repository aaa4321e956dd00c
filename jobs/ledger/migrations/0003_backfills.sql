-- Batched, resumable UPDATEs walked by a unique key. The cursor (last key done, as
-- text) moves in the same transaction as each batch's UPDATE and its batch row; the
-- generation fences a zombie worker: only the latest claim may commit a batch.
CREATE TABLE runbook.backfills (
    id              text PRIMARY KEY,
    target          text NOT NULL,
    run_id          text REFERENCES runbook.runs (id) ON DELETE SET NULL,
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
CREATE INDEX backfills_target_created ON runbook.backfills (target, created_at DESC);
CREATE TABLE runbook.backfill_batches (
    id           bigserial PRIMARY KEY,
    backfill_id  text NOT NULL REFERENCES runbook.backfills (id) ON DELETE CASCADE,
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
