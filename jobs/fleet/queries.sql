-- The control database's statements (jobs/fleet/store.py), named as the ledger's are
-- (jobs/ledger/sql.py). The schema is spelled runbook_control (jobs/fleet/store.py SCHEMA).

-- take_control_lock --
-- Serialize schema upgrades of the control database (held to the end of the transaction).
SELECT pg_advisory_xact_lock(:k)

-- create_control_schema --
-- The control schema, before its first version.
CREATE SCHEMA IF NOT EXISTS runbook_control

-- create_control_version --
-- The table that records the control schema's version.
CREATE TABLE IF NOT EXISTS runbook_control.version (version integer NOT NULL)

-- control_version --
-- The control schema's version (no row: none yet).
SELECT max(version) FROM runbook_control.version

-- record_control_version --
-- Note that one more migration was applied.
INSERT INTO runbook_control.version (version) VALUES (:v)

-- control_exists --
-- Whether this database holds a control schema.
SELECT to_regclass('runbook_control.rollouts') IS NOT NULL

-- insert_rollout --
-- Record a new rollout, enqueued.
INSERT INTO runbook_control.rollouts
    (id, group_name, state, to_revision, canary, parallel, max_failures, strict)
VALUES (:id, :group_name, 'enqueued', :to_revision, :canary, :parallel, :max_failures, :strict)

-- get_rollout --
-- One rollout.
SELECT * FROM runbook_control.rollouts WHERE id = :id

-- list_rollouts --
-- The newest rollouts, of one group or of all (:group_name NULL).
SELECT * FROM runbook_control.rollouts
WHERE CAST(:group_name AS text) IS NULL OR group_name = :group_name
ORDER BY created_at DESC LIMIT :limit

-- set_rollout_state --
-- Move a rollout to a state; settled_at is set once nothing more happens by itself (its state
-- settled and no member in flight), cleared when it goes on.
UPDATE runbook_control.rollouts
SET state = :state, error = :error, updated_at = now(),
    settled_at = CASE WHEN :settled THEN coalesce(settled_at, now()) END,
    accept_data_loss = coalesce(CAST(:accept_data_loss AS boolean), accept_data_loss)
WHERE id = :id

-- touch_rollout --
-- An advancing pass starts: renew the rollout's lease.
UPDATE runbook_control.rollouts SET advanced_at = now() WHERE id = :id

-- want_pass --
-- A pass was asked for (a member ended) while another held the rollout: that one goes again.
UPDATE runbook_control.rollouts SET pass_wanted = true WHERE id = :id

-- take_wanted --
-- Whether a pass was asked for since the last look, and clear it.
UPDATE runbook_control.rollouts SET pass_wanted = false
WHERE id = :id AND pass_wanted RETURNING id

-- next_pass --
-- The pass about to be sent carries this token; a pass carrying an older one ends at once.
UPDATE runbook_control.rollouts SET pass_token = :token, pass_sent_at = now() WHERE id = :id

-- members_listed --
-- The group's members are recorded.
UPDATE runbook_control.rollouts SET members_listed = true, updated_at = now() WHERE id = :id

-- insert_member --
-- Record one member, pending (idempotent: a second listing adds nothing).
INSERT INTO runbook_control.members (rollout_id, ordinal, target, canary, state, error)
VALUES (:rollout_id, :ordinal, :target, :canary, 'pending', :error)
ON CONFLICT DO NOTHING

-- member_counts --
-- How many members are in each state.
SELECT state, count(*) AS n FROM runbook_control.members WHERE rollout_id = :id GROUP BY state

-- canary_counts --
-- The canaries not yet through (pending or in flight) and the ones that failed.
SELECT count(*) FILTER (WHERE state IN ('pending', 'running')) AS open,
       count(*) FILTER (WHERE state = 'failed') AS failed
FROM runbook_control.members WHERE rollout_id = :id AND canary

-- members_in_flight --
-- The members whose run is in flight.
SELECT * FROM runbook_control.members
WHERE rollout_id = :id AND state IN ('running', 'rolling_back') ORDER BY ordinal

-- next_pending --
-- The next members to start, in order (canaries only while :canaries_only).
SELECT * FROM runbook_control.members
WHERE rollout_id = :id AND state = 'pending' AND (canary OR NOT :canaries_only)
ORDER BY ordinal LIMIT :n

-- next_advanced --
-- The next members a rollback brings back, in order.
SELECT * FROM runbook_control.members
WHERE rollout_id = :id AND state = 'succeeded' ORDER BY ordinal LIMIT :n

-- retry_rollbacks --
-- `rollback ROLLOUT` again: the members whose rollback failed are tried again.
UPDATE runbook_control.members SET state = 'succeeded', error = NULL
WHERE rollout_id = :id AND state = 'rollback_failed'

-- member_of_run --
-- The member whose run (or rollback run) this is, while that run is in flight.
SELECT * FROM runbook_control.members
WHERE rollout_id = :id AND ((run_id = :run AND state = 'running')
    OR (rollback_run_id = :run AND state = 'rolling_back'))

-- claim_member --
-- A member starts: only from the state the pass saw, so two passes never start it twice.
UPDATE runbook_control.members
SET state = :state, started_at = now(), finished_at = NULL, error = NULL
WHERE rollout_id = :id AND ordinal = :ordinal AND state = :seen
RETURNING ordinal

-- member_run --
-- The run a member's start admitted, and the revisions it goes between.
UPDATE runbook_control.members
SET run_id = coalesce(:run_id, run_id), rollback_run_id = coalesce(:rollback_run_id, rollback_run_id),
    from_revision = CASE WHEN :forward THEN :from_revision ELSE from_revision END,
    to_revision = CASE WHEN :forward THEN :to_revision ELSE to_revision END
WHERE rollout_id = :id AND ordinal = :ordinal

-- end_member --
-- A member's run ended (or it was skipped, or refused); its from_revision as its run says.
UPDATE runbook_control.members
SET state = :state, error = :error, finished_at = now(),
    from_revision = CASE WHEN :from_known THEN :from_revision ELSE from_revision END
WHERE rollout_id = :id AND ordinal = :ordinal

-- retry_failed --
-- `resume` after a halt: the failed members start again.
UPDATE runbook_control.members SET state = 'pending', error = NULL
WHERE rollout_id = :id AND state = 'failed'

-- members_page --
-- The members in order, a page at a time.
SELECT * FROM runbook_control.members WHERE rollout_id = :id
ORDER BY ordinal LIMIT :limit OFFSET :offset

-- stale_rollouts --
-- Unsettled rollouts whose advancing task has not run for :after_s seconds (its message lost
-- with Redis, or its worker died).
SELECT id FROM runbook_control.rollouts
WHERE settled_at IS NULL
    AND (advanced_at IS NULL OR advanced_at < now() - make_interval(secs => :after_s))

-- targets_in_flight --
-- The members whose run is in flight, in every unsettled rollout: the reconciler visits them
-- beside [targets] (a catalog's members are in no runbook.toml).
SELECT DISTINCT m.target FROM runbook_control.members m
JOIN runbook_control.rollouts r ON r.id = m.rollout_id
WHERE r.settled_at IS NULL AND m.state IN ('running', 'rolling_back')

-- note_work --
-- Index a run's id under its target (kept once).
INSERT INTO runbook_control.work_ids (id, kind, target, rollout_id)
VALUES (:id, :kind, :target, :rollout_id) ON CONFLICT DO NOTHING
