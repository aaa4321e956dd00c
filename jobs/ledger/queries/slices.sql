-- A backfill's walk: claims, hand-offs, batches and their cursor moves under the generation
-- fence (jobs/ledger/slices.py).

-- claim_backfill --
-- Move a claimed backfill to :state, forgetting an error it stopped on, and why it paused
-- itself once it runs again.
UPDATE runbook.backfills SET state = :state,
    error = CASE WHEN state = 'errored' THEN NULL ELSE error END,
    error_range = CASE WHEN state = 'errored' THEN NULL ELSE error_range END,
    pause_reason = CASE WHEN :state = 'running' THEN NULL ELSE pause_reason END,
    started_at = coalesce(started_at, now()), updated_at = now()
WHERE id = :id

-- claim_slices --
-- Give every slice not done a new generation and make it active; with :fresh, forget its
-- deliveries that died and how long its throttle has held (max_throttle starts again).
UPDATE runbook.backfill_slices SET generation = generation + 1, state = 'active',
    updated_at = now(), unfinished = CASE WHEN :fresh THEN 0 ELSE unfinished END,
    throttle_since = CASE WHEN :fresh THEN NULL ELSE throttle_since END
WHERE backfill_id = :id AND state <> 'done'
RETURNING slice, generation

-- handoff_slice --
-- Pass an active slice from generation :g to the next one; the new generation.
UPDATE runbook.backfill_slices SET generation = generation + 1, updated_at = now()
WHERE backfill_id = :id AND slice = :n AND generation = :g AND state = 'active'
RETURNING generation

-- open_batch --
-- Lock a slice and read its backfill's own row, unlocked; {columns}: the batch's set_config
-- calls and one more scalar query, each "... AS bf_col_<i>, " (jobs/ledger/slices.py).
SELECT {columns}s.backfill_id AS s_backfill_id, s.slice AS s_slice,
    s.lower_key AS s_lower_key, s.upper_key AS s_upper_key, s.cursor AS s_cursor,
    s.generation AS s_generation, s.state AS s_state, s.batch_size AS s_batch_size,
    s.rows_done AS s_rows_done, s.throttled_ms AS s_throttled_ms, s.updated_at AS s_updated_at,
    b.id, b.target, b.run_id, b.revision, b.table_name, b.key_column, b.key_type,
    b.set_sql, b.where_sql, b.state, b.upper_key, b.batch_size, b.min_batch, b.max_batch,
    b.target_batch_ms, b.sleep_ms, b.lock_timeout_ms, b.statement_timeout_ms, b.slices,
    b.on_error, b.max_xact_age_s, b.max_replica_lag_ms, b.max_replica_lag_bytes,
    b.max_retained_wal_bytes, b.max_wal_rate_bytes, b.max_throttle_ms, b.pause_reason,
    b.standbys_seen, b.replica_note, b.rows_total_estimate, b.estimate_kind, b.error,
    b.error_range, b.created_at, b.started_at, b.finished_at, b.updated_at
FROM runbook.backfill_slices s JOIN runbook.backfills b ON b.id = s.backfill_id
WHERE s.backfill_id = :bf_id AND s.slice = :bf_slice FOR UPDATE OF s

-- lock_slice --
-- One slice, row-locked until the transaction ends.
SELECT backfill_id, slice, lower_key, upper_key, cursor, generation, state, batch_size,
    rows_done, throttled_ms, updated_at
FROM runbook.backfill_slices WHERE backfill_id = :id AND slice = :n FOR UPDATE

-- set_slice_state --
-- Set one slice's state.
UPDATE runbook.backfill_slices SET state = :state, updated_at = now()
WHERE backfill_id = :id AND slice = :n

-- slice_states --
-- Each slice's state of a backfill.
SELECT state FROM runbook.backfill_slices WHERE backfill_id = :id

-- record_skipped --
-- Record a row an isolating backfill left alone, with its error.
INSERT INTO runbook.backfill_skipped (backfill_id, slice, key, error)
VALUES (:b, :n, :key, :error)

-- record_batch --
-- The batch row and the slice's cursor, counters and next batch size (:shrunk when
-- {blocked}, a scalar query, counts sessions waiting on this transaction); that count. The
-- batch row carries the waits recorded on the slice since its last batch (for the rate),
-- and the slice's throttle, if one held, is over. The count is also kept in a session
-- setting, so that commit_after_batch can read it back after its COMMIT.
WITH blocked AS MATERIALIZED (SELECT CAST({blocked} AS bigint) AS n),
batch AS (INSERT INTO runbook.backfill_batches (backfill_id, slice, lo, hi, batch_size, rows,
    skipped, duration_ms, throttled_ms, attempt, generation)
    VALUES (:b, :n, :lo, :hi, :size, :rows, :skipped, :ms, :throttled + (SELECT
        throttle_carried_ms FROM runbook.backfill_slices WHERE backfill_id = :b AND slice = :n),
        :attempt, :g)),
moved AS (UPDATE runbook.backfill_slices SET cursor = :hi, rows_done = rows_done + :rows,
    batch_size = CASE WHEN (SELECT n FROM blocked) > 0 THEN :shrunk ELSE :next END,
    throttled_ms = throttled_ms + :throttled, throttle_carried_ms = 0, throttle_since = NULL,
    updated_at = now()
    WHERE backfill_id = :b AND slice = :n)
SELECT CAST(set_config('runbook.blocked', CAST(n AS text), false) AS bigint) FROM blocked

-- commit_after_batch --
-- Sent after record_batch in the same round trip: COMMIT, then the count record_batch kept
-- in its session setting (the count outlives the COMMIT there).
COMMIT;
SELECT CAST(current_setting('runbook.blocked') AS bigint)

-- add_throttled --
-- Count time a slice waited between batches (carried by its next batch row too) and, given a
-- reason, why and when; :hold true: a throttle holds (since now, unless it held already),
-- false: it is over, NULL: as it was. How many seconds the throttle has held.
UPDATE runbook.backfill_slices SET throttled_ms = throttled_ms + :ms,
    throttle_carried_ms = throttle_carried_ms + :ms,
    throttle_reason = coalesce(:reason, throttle_reason),
    throttled_at = CASE WHEN :reason IS NULL THEN throttled_at ELSE now() END,
    throttle_since = CASE CAST(:hold AS boolean) WHEN true THEN coalesce(throttle_since, now())
        WHEN false THEN NULL ELSE throttle_since END
WHERE backfill_id = :id AND slice = :n
RETURNING extract(epoch FROM now() - throttle_since)
