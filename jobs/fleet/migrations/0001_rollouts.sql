-- The control database, version 1: rollouts, their members, and the index of work ids.

CREATE TABLE runbook_control.rollouts (
    id text PRIMARY KEY,
    group_name text NOT NULL,
    state text NOT NULL,
    to_revision text,                  -- resolved when the rollout was asked for; NULL: base
    canary integer NOT NULL,
    parallel integer NOT NULL,
    max_failures integer NOT NULL,
    strict boolean NOT NULL DEFAULT false,
    accept_data_loss boolean NOT NULL DEFAULT false,
    members_listed boolean NOT NULL DEFAULT false,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    advanced_at timestamptz,           -- the last advancing pass; the reconciler's lease
    pass_token text,                   -- the one chain of passes that goes on (advance.py)
    pass_wanted boolean NOT NULL DEFAULT false,  -- a pass was asked for while one ran
    pass_sent_at timestamptz,          -- when the chain's next pass was sent
    settled_at timestamptz             -- nothing more happens by itself: --wait ends here
);
CREATE INDEX rollouts_group ON runbook_control.rollouts (group_name, created_at DESC);
CREATE INDEX rollouts_unsettled ON runbook_control.rollouts (advanced_at) WHERE settled_at IS NULL;

CREATE TABLE runbook_control.members (
    rollout_id text NOT NULL REFERENCES runbook_control.rollouts (id),
    ordinal integer NOT NULL,          -- the stable order (jobs/fleet/groups.py)
    target text NOT NULL,
    canary boolean NOT NULL DEFAULT false,
    state text NOT NULL DEFAULT 'pending',
    run_id text,
    rollback_run_id text,
    from_revision text,
    to_revision text,
    error text,
    started_at timestamptz,
    finished_at timestamptz,
    PRIMARY KEY (rollout_id, ordinal),
    UNIQUE (rollout_id, target)
);
CREATE INDEX members_state ON runbook_control.members (rollout_id, state, ordinal);

-- Which target's ledger holds a run or a backfill, so that `runbook status ID` opens one
-- database, not every target's.
CREATE TABLE runbook_control.work_ids (
    id text PRIMARY KEY,
    kind text NOT NULL,
    target text NOT NULL,
    rollout_id text,
    created_at timestamptz NOT NULL DEFAULT now()
);
