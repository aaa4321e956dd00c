-- Runs and their steps (jobs/ledger/runs.py). A step record announces itself in its own
-- statement: the CTE `announced` is notify_unflushed of jobs/ledger/queries/notify.sql, and
-- the statement must read from it for it to run (one round trip less per record).

-- unfinished_run --
-- The oldest run not in a terminal state (:terminal), which holds the target.
SELECT id, state FROM runbook.runs WHERE state <> ALL(:terminal) ORDER BY created_at LIMIT 1

-- insert_run --
-- Record a new run; its current revision starts at its from revision.
INSERT INTO runbook.runs (id, target, kind, state, from_revision, to_revision,
    current_revision, options, irreversible)
VALUES (:id, :target, :kind, :state, :from_rev, :to_rev, :from_rev, CAST(:options AS jsonb),
    CAST(:irreversible AS jsonb))

-- get_run --
-- One run by id.
SELECT id, target, kind, state, from_revision, to_revision, current_revision, error, options,
    backup, fingerprint_before, created_at, started_at, finished_at, deliveries, irreversible
FROM runbook.runs WHERE id = :id

-- run_steps --
-- A run's steps, in the order they were first started.
SELECT id, run_id, kind, revision, state, started_at, finished_at, attempts, error, detail
FROM runbook.steps WHERE run_id = :id ORDER BY id

-- list_runs --
-- The latest :n runs, newest first.
SELECT id, target, kind, state, from_revision, to_revision, current_revision, error, options,
    backup, fingerprint_before, created_at, started_at, finished_at, deliveries, irreversible
FROM runbook.runs ORDER BY created_at DESC LIMIT :n

-- transition_run --
-- Move a run from state :old to :new; the error, finish and start times only when asked.
UPDATE runbook.runs SET state = :new, updated_at = now(),
    error = CASE WHEN CAST(:set_error AS boolean) THEN :error ELSE error END,
    finished_at = CASE WHEN CAST(:finishes AS boolean) THEN now() ELSE finished_at END,
    started_at = CASE WHEN CAST(:starts AS boolean) THEN coalesce(started_at, now())
        ELSE started_at END
WHERE id = :id AND state = :old

-- update_run --
-- Set the plain columns of a run whose :set_<column> flag is true.
UPDATE runbook.runs SET
    current_revision = CASE WHEN CAST(:set_current_revision AS boolean) THEN :current_revision
        ELSE current_revision END,
    backup = CASE WHEN CAST(:set_backup AS boolean) THEN CAST(:backup AS jsonb)
        ELSE backup END,
    fingerprint_before = CASE WHEN CAST(:set_fingerprint_before AS boolean)
        THEN :fingerprint_before ELSE fingerprint_before END,
    error = CASE WHEN CAST(:set_error AS boolean) THEN :error ELSE error END,
    irreversible = CASE WHEN CAST(:set_irreversible AS boolean) THEN CAST(:irreversible AS jsonb)
        ELSE irreversible END,
    updated_at = now()
WHERE id = :id

-- count_delivery --
-- Count one more delivery of a run's task; the new count.
UPDATE runbook.runs SET deliveries = deliveries + 1 WHERE id = :id RETURNING deliveries

-- start_step --
-- Record that a step starts, or that an interrupted one starts again (attempts + 1).
WITH announced AS (SELECT pg_notify(:ch, :run), set_config('synchronous_commit', 'off', true))
INSERT INTO runbook.steps (run_id, kind, revision, state)
SELECT :run, :kind, :rev, 'running' FROM announced
ON CONFLICT (run_id, kind, revision) DO UPDATE SET
    attempts = steps.attempts + 1, state = 'running', error = NULL,
    started_at = clock_timestamp(), finished_at = NULL
RETURNING id, run_id, kind, revision, state, started_at, finished_at, attempts, error, detail

-- bump_step_attempts --
-- Count one more attempt of a running step, with the error that made it retry.
UPDATE runbook.steps SET attempts = attempts + 1, error = :e WHERE id = :id RETURNING attempts

-- finish_step --
-- Close a step; with :move, set the run's current revision in the same statement.
WITH announced AS (SELECT pg_notify(:ch, :run), set_config('synchronous_commit', 'off', true)),
moved AS (UPDATE runbook.runs SET current_revision = :rev, updated_at = now()
    WHERE id = :run AND CAST(:move AS boolean))
UPDATE runbook.steps SET state = :state, error = :error, finished_at = clock_timestamp(),
    detail = CAST(:d AS jsonb)
FROM announced WHERE id = :id

-- note_step --
-- Replace a running step's detail.
UPDATE runbook.steps SET detail = CAST(:d AS jsonb) WHERE id = :id
