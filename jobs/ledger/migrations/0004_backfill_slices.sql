-- Parallel slices, each with its own cursor and generation (moved off the backfill's
-- row); the revision that declared a backfill; rows an isolating backfill skipped.
ALTER TABLE runbook.backfills
    ADD COLUMN revision text,
    ADD COLUMN slices integer NOT NULL DEFAULT 1,
    ADD COLUMN on_error text NOT NULL DEFAULT 'stop' CHECK (on_error IN ('stop', 'isolate')),
    ADD COLUMN max_xact_age_s integer NOT NULL DEFAULT 600;
CREATE INDEX backfills_run ON runbook.backfills (run_id) WHERE run_id IS NOT NULL;
CREATE TABLE runbook.backfill_slices (
    backfill_id  text NOT NULL REFERENCES runbook.backfills (id) ON DELETE CASCADE,
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
INSERT INTO runbook.backfill_slices (backfill_id, slice, upper_key, cursor, generation,
    state, batch_size, rows_done, throttled_ms)
SELECT id, 0, upper_key, cursor, generation,
       CASE WHEN state = 'succeeded' THEN 'done' ELSE 'active' END,
       batch_size, rows_done, throttled_ms
FROM runbook.backfills WHERE upper_key IS NOT NULL;
ALTER TABLE runbook.backfills DROP COLUMN cursor, DROP COLUMN generation,
    DROP COLUMN rows_done, DROP COLUMN throttled_ms;
ALTER TABLE runbook.backfill_batches
    ADD COLUMN slice integer NOT NULL DEFAULT 0,
    ADD COLUMN skipped integer NOT NULL DEFAULT 0,
    ADD COLUMN throttled_ms integer NOT NULL DEFAULT 0;
CREATE TABLE runbook.backfill_skipped (
    backfill_id text NOT NULL REFERENCES runbook.backfills (id) ON DELETE CASCADE,
    slice       integer NOT NULL,
    key         text NOT NULL,
    error       text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (backfill_id, key)
);
