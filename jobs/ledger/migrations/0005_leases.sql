-- Leases: a delivery of a run renews heartbeat_at while it works; `unfinished` counts
-- deliveries (of a run, of a slice) that started and never returned, to stop a poison one.
ALTER TABLE runbook.runs
    ADD COLUMN heartbeat_at timestamptz,
    ADD COLUMN heartbeat_by text,
    ADD COLUMN unfinished integer NOT NULL DEFAULT 0;
ALTER TABLE runbook.backfill_slices ADD COLUMN unfinished integer NOT NULL DEFAULT 0;
CREATE INDEX runs_unfinished ON runbook.runs (created_at) WHERE finished_at IS NULL;
