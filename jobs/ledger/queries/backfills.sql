-- Backfills, their slices and batches as read by the operator (jobs/ledger/backfills.py).
-- A backfill's own row is its 37 columns of jobs/ledger/backfills.py Backfill; the counters
-- summed over its slices (rows_done, throttled_ms, skipped) only where a query names them.

-- insert_backfill --
-- Record a new backfill (finished at once with :finished, for an empty table).
INSERT INTO runbook.backfills (id, target, run_id, revision, table_name, key_column, key_type,
    set_sql, where_sql, state, upper_key, slices, on_error, rows_total_estimate, estimate_kind,
    finished_at, batch_size, min_batch, max_batch, target_batch_ms, sleep_ms, lock_timeout_ms,
    statement_timeout_ms, max_xact_age_s, max_replica_lag_ms, max_replica_lag_bytes,
    max_retained_wal_bytes, max_wal_rate_bytes, max_throttle_ms)
VALUES (:id, :target, :run_id, :revision, :table, :key, :key_type, :set_sql, :where_sql,
    :state, :upper, :slices, :on_error, :estimate, :kind, CASE WHEN :finished THEN now() END,
    :batch_size, :min_batch, :max_batch, :target_batch_ms, :sleep_ms, :lock_timeout_ms,
    :statement_timeout_ms, :max_xact_age_s, :max_replica_lag_ms, :max_replica_lag_bytes,
    :max_retained_wal_bytes, CAST(:max_wal_rate_bytes AS bigint), :max_throttle_ms)

-- insert_backfill_slice --
-- Record slice :n of a new backfill: the keys after :lower up to :upper, with its key marks
-- and number of keys (jobs/backfill/marks.py) when the rows to update were not counted.
INSERT INTO runbook.backfill_slices (backfill_id, slice, lower_key, upper_key, batch_size,
    key_marks, keys_estimate)
VALUES (:id, :n, :lower, :upper, :size, CAST(:marks AS text[]), :keys)

-- name_session --
-- The transaction's application_name (pg_stat_activity's), as the sessions that look at
-- others' waits tell it apart.
SELECT set_config('application_name', :name, true)

-- set_estimate --
-- A backfill's rows to update and how they were estimated, refined after its slices were sent
-- (jobs/backfill/create.py refine). The state and updated_at are the walk's: left alone.
UPDATE runbook.backfills SET rows_total_estimate = :estimate, estimate_kind = :kind
WHERE id = :id

-- set_slice_marks --
-- Slice :n's key marks and number of keys (jobs/backfill/marks.py), refined likewise.
UPDATE runbook.backfill_slices SET key_marks = CAST(:marks AS text[]), keys_estimate = :keys
WHERE backfill_id = :id AND slice = :n

-- get_backfill --
-- One backfill by id, with its counters summed over its slices.
SELECT b.id, b.target, b.run_id, b.revision, b.table_name, b.key_column, b.key_type,
    b.set_sql, b.where_sql, b.state, b.upper_key, b.batch_size, b.min_batch, b.max_batch,
    b.target_batch_ms, b.sleep_ms, b.lock_timeout_ms, b.statement_timeout_ms, b.slices,
    b.on_error, b.max_xact_age_s, b.max_replica_lag_ms, b.max_replica_lag_bytes,
    b.max_retained_wal_bytes, b.max_wal_rate_bytes, b.max_throttle_ms, b.pause_reason,
    b.standbys_seen, b.replica_note, b.rows_total_estimate, b.estimate_kind, b.error,
    b.error_range, b.created_at, b.started_at, b.finished_at, b.updated_at,
    (SELECT CAST(coalesce(sum(s.rows_done), 0) AS bigint) FROM runbook.backfill_slices s
        WHERE s.backfill_id = b.id) AS rows_done,
    (SELECT CAST(coalesce(sum(s.throttled_ms), 0) AS bigint) FROM runbook.backfill_slices s
        WHERE s.backfill_id = b.id) AS throttled_ms,
    (SELECT count(*) FROM runbook.backfill_skipped k WHERE k.backfill_id = b.id) AS skipped
FROM runbook.backfills b WHERE b.id = :id

-- list_backfills --
-- Backfills with their counters, newest first; of one target, run or revision when given.
SELECT b.id, b.target, b.run_id, b.revision, b.table_name, b.key_column, b.key_type,
    b.set_sql, b.where_sql, b.state, b.upper_key, b.batch_size, b.min_batch, b.max_batch,
    b.target_batch_ms, b.sleep_ms, b.lock_timeout_ms, b.statement_timeout_ms, b.slices,
    b.on_error, b.max_xact_age_s, b.max_replica_lag_ms, b.max_replica_lag_bytes,
    b.max_retained_wal_bytes, b.max_wal_rate_bytes, b.max_throttle_ms, b.pause_reason,
    b.standbys_seen, b.replica_note, b.rows_total_estimate, b.estimate_kind, b.error,
    b.error_range, b.created_at, b.started_at, b.finished_at, b.updated_at,
    (SELECT CAST(coalesce(sum(s.rows_done), 0) AS bigint) FROM runbook.backfill_slices s
        WHERE s.backfill_id = b.id) AS rows_done,
    (SELECT CAST(coalesce(sum(s.throttled_ms), 0) AS bigint) FROM runbook.backfill_slices s
        WHERE s.backfill_id = b.id) AS throttled_ms,
    (SELECT count(*) FROM runbook.backfill_skipped k WHERE k.backfill_id = b.id) AS skipped
FROM runbook.backfills b
WHERE (CAST(:t AS text) IS NULL OR b.target = :t)
    AND (CAST(:r AS text) IS NULL OR b.run_id = :r)
    AND (CAST(:v AS text) IS NULL OR b.revision = :v)
ORDER BY b.created_at DESC LIMIT :n

-- list_slices --
-- A backfill's slices, in key order.
SELECT backfill_id, slice, lower_key, upper_key, cursor, generation, state, batch_size,
    rows_done, throttled_ms, updated_at, key_marks, keys_estimate
FROM runbook.backfill_slices WHERE backfill_id = :id ORDER BY slice

-- list_batches --
-- A backfill's committed batches, in the order they committed.
SELECT id, backfill_id, slice, lo, hi, batch_size, rows, skipped, duration_ms, throttled_ms,
    attempt, generation, committed_at
FROM runbook.backfill_batches WHERE backfill_id = :id ORDER BY id

-- list_skipped --
-- The keys an isolating backfill left alone, with each row's error.
SELECT key, error FROM runbook.backfill_skipped WHERE backfill_id = :id
ORDER BY recorded_at, key

-- recent_rate --
-- Rows, seconds spanned and seconds throttled of the batches of the last :w seconds; each
-- batch's span starts where the wait before it (its throttled_ms) began.
-- Slices wait side by side: their waits overlap in wall time, hence the division.
SELECT coalesce(sum(rows), 0) AS rows,
    coalesce(extract(epoch FROM max(committed_at) - min(committed_at -
        make_interval(secs => (duration_ms + throttled_ms) / 1000.0))), 0) AS span_s,
    coalesce(sum(throttled_ms), 0) / 1000.0 / greatest(count(DISTINCT slice), 1) AS throttled_s
FROM runbook.backfill_batches WHERE backfill_id = :id
    AND committed_at > (SELECT max(committed_at) FROM runbook.backfill_batches
        WHERE backfill_id = :id) - make_interval(secs => :w)

-- read_backfill --
-- A backfill's own row (no counters), not locked.
SELECT b.id, b.target, b.run_id, b.revision, b.table_name, b.key_column, b.key_type,
    b.set_sql, b.where_sql, b.state, b.upper_key, b.batch_size, b.min_batch, b.max_batch,
    b.target_batch_ms, b.sleep_ms, b.lock_timeout_ms, b.statement_timeout_ms, b.slices,
    b.on_error, b.max_xact_age_s, b.max_replica_lag_ms, b.max_replica_lag_bytes,
    b.max_retained_wal_bytes, b.max_wal_rate_bytes, b.max_throttle_ms, b.pause_reason,
    b.standbys_seen, b.replica_note, b.rows_total_estimate, b.estimate_kind, b.error,
    b.error_range, b.created_at, b.started_at, b.finished_at, b.updated_at
FROM runbook.backfills b WHERE b.id = :id

-- lock_backfill_for_state --
-- A backfill's own row (no counters), locked FOR NO KEY UPDATE until the transaction ends.
SELECT b.id, b.target, b.run_id, b.revision, b.table_name, b.key_column, b.key_type,
    b.set_sql, b.where_sql, b.state, b.upper_key, b.batch_size, b.min_batch, b.max_batch,
    b.target_batch_ms, b.sleep_ms, b.lock_timeout_ms, b.statement_timeout_ms, b.slices,
    b.on_error, b.max_xact_age_s, b.max_replica_lag_ms, b.max_replica_lag_bytes,
    b.max_retained_wal_bytes, b.max_wal_rate_bytes, b.max_throttle_ms, b.pause_reason,
    b.standbys_seen, b.replica_note, b.rows_total_estimate, b.estimate_kind, b.error,
    b.error_range, b.created_at, b.started_at, b.finished_at, b.updated_at
FROM runbook.backfills b WHERE b.id = :id FOR NO KEY UPDATE

-- last_throttle --
-- The latest reason any slice of a backfill waited for, when, and since when the throttle
-- has held if it still does.
SELECT throttle_reason, throttled_at, throttle_since FROM runbook.backfill_slices
WHERE backfill_id = :id AND throttled_at IS NOT NULL
ORDER BY throttle_since IS NULL, throttled_at DESC LIMIT 1

-- mark_backfill --
-- Set a backfill's state; its finish time with :finished, its error and range with :set_error.
UPDATE runbook.backfills SET state = :state, updated_at = now(),
    finished_at = CASE WHEN CAST(:finished AS boolean) THEN now() ELSE finished_at END,
    error = CASE WHEN CAST(:set_error AS boolean) THEN :error ELSE error END,
    error_range = CASE WHEN CAST(:set_error AS boolean) THEN CAST(:range AS jsonb)
        ELSE error_range END
WHERE id = :id

-- note_standbys --
-- Record the standbys a backfill has seen and its note on those gone, if they changed; the
-- backfill's id when they did (so that only one slice logs the change).
UPDATE runbook.backfills SET standbys_seen = CAST(:seen AS text[]), replica_note = :note
WHERE id = :id AND (standbys_seen IS DISTINCT FROM CAST(:seen AS text[])
    OR replica_note IS DISTINCT FROM CAST(:note AS text))
RETURNING id

-- set_pause_reason --
-- Why a backfill paused itself (a throttle held past its max_throttle).
UPDATE runbook.backfills SET pause_reason = :reason WHERE id = :id
