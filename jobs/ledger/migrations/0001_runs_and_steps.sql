CREATE TABLE runbook.runs (
    id              text PRIMARY KEY,
    target          text NOT NULL,
    kind            text NOT NULL,
    state           text NOT NULL,
    from_revision   text,
    to_revision     text,
    current_revision text,
    error           text,
    options         jsonb NOT NULL DEFAULT '{}',
    backup          jsonb,
    fingerprint_before text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deliveries      integer NOT NULL DEFAULT 0
);
CREATE INDEX runs_target_created ON runbook.runs (target, created_at DESC);
CREATE TABLE runbook.steps (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      text NOT NULL REFERENCES runbook.runs (id) ON DELETE CASCADE,
    kind        text NOT NULL,
    revision    text NOT NULL DEFAULT '',
    state       text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    attempts    integer NOT NULL DEFAULT 1,
    error       text,
    detail      jsonb NOT NULL DEFAULT '{}',
    -- A run upgrades, verifies or downgrades a revision at most once: this is what
    -- makes a redelivered task find its step instead of doing it twice.
    UNIQUE (run_id, kind, revision)
);
