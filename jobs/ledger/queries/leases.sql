-- Leases of runs and slices, and what the reconciler takes over (jobs/ledger/leases.py).

-- begin_delivery --
-- A delivery of an unfinished run starts: count it and take the lease.
UPDATE runbook.runs SET unfinished = unfinished + 1, heartbeat_at = now(), heartbeat_by = :w
WHERE id = :id AND finished_at IS NULL RETURNING unfinished

-- heartbeat --
-- Renew a run's lease.
UPDATE runbook.runs SET heartbeat_at = now() WHERE id = :id

-- end_delivery --
-- A delivery of a run returned normally: reset its count and give the lease back.
UPDATE runbook.runs SET unfinished = 0, heartbeat_at = NULL, heartbeat_by = NULL
WHERE id = :id

-- begin_slice_delivery --
-- A slice's task of the current generation starts: count it and renew the lease.
UPDATE runbook.backfill_slices SET unfinished = unfinished + 1, updated_at = now()
WHERE backfill_id = :id AND slice = :n AND generation = :g
RETURNING unfinished

-- unsent_continuation --
-- The generation a slice was handed on to, while no task of that generation has started.
SELECT generation FROM runbook.backfill_slices
WHERE backfill_id = :id AND slice = :n AND generation = :g + 1 AND unfinished = 0
    AND state = 'active'

-- end_slice_delivery --
-- A slice's task returned normally: reset its count.
UPDATE runbook.backfill_slices SET unfinished = 0 WHERE backfill_id = :id AND slice = :n

-- stale_runs --
-- Unfinished runs with no live lease and no going backfill of theirs, oldest first. A
-- backfill that ended less than a lease ago has just sent its run on: that delivery is not
-- lost yet.
SELECT r.id, r.target, r.state, r.unfinished FROM runbook.runs r
WHERE r.finished_at IS NULL
    AND coalesce(r.heartbeat_at, r.updated_at) < now() - make_interval(secs => :lease)
    AND NOT EXISTS (SELECT 1 FROM runbook.backfills b WHERE b.run_id = r.id
        AND (b.state IN ('enqueued', 'running', 'pausing', 'cancelling')
            OR b.finished_at > now() - make_interval(secs => :lease)))
ORDER BY r.created_at

-- start_stale_backfills --
-- Start the backfills created longer than a lease ago and never started; their ids.
UPDATE runbook.backfills SET state = 'running', started_at = coalesce(started_at, now()),
    updated_at = now()
WHERE state = 'enqueued' AND created_at < now() - make_interval(secs => :lease)
RETURNING id

-- expire_backfill_slices --
-- Make a just-started backfill's slices active with their lease already run out.
UPDATE runbook.backfill_slices SET state = 'active',
    updated_at = now() - make_interval(secs => :lease + 1)
WHERE backfill_id = :id AND state <> 'done'

-- take_stale_slices --
-- Give each active slice of a going backfill whose lease ran out a new generation.
UPDATE runbook.backfill_slices s SET generation = s.generation + 1, updated_at = now()
FROM runbook.backfills b WHERE b.id = s.backfill_id
    AND b.state IN ('running', 'pausing', 'cancelling') AND s.state = 'active'
    AND s.updated_at < now() - make_interval(secs => :lease)
RETURNING s.backfill_id, b.target, s.slice, s.generation

-- run_deliveries --
-- State and delivery count of each of the runs :ids.
SELECT id, target, state, finished_at IS NOT NULL AS finished, deliveries
FROM runbook.runs WHERE id = ANY(:ids)
