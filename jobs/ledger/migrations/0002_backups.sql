-- What the plan knows before a run starts: revisions whose downgrade cannot undo them.
ALTER TABLE runbook.runs ADD COLUMN irreversible jsonb NOT NULL DEFAULT '{}';
CREATE TABLE runbook.backups (
    id          text PRIMARY KEY,
    target      text NOT NULL,
    run_id      text REFERENCES runbook.runs (id) ON DELETE SET NULL,
    path        text NOT NULL,
    size        bigint NOT NULL,
    sha256      text NOT NULL,
    taken_at    timestamptz NOT NULL DEFAULT now(),
    verified    boolean NOT NULL,
    verification jsonb NOT NULL DEFAULT '{}',
    -- per table: rows and content checksum of the dumped snapshot
    tables      jsonb NOT NULL DEFAULT '{}',
    copies      jsonb NOT NULL DEFAULT '[]',
    revision    text,
    deleted_at  timestamptz
);
CREATE INDEX backups_target_taken ON runbook.backups (target, taken_at DESC);
