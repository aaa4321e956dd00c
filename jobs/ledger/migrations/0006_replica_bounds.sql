-- Replica-aware throttling: each backfill's bounds (its target's when not given), why it
-- paused itself (a throttle that held past max_throttle), the standbys it has seen and a note
-- when one is gone; each slice's current throttle (since when) and the waits recorded on it
-- while no batch followed, which its next batch row carries for the rate.
ALTER TABLE runbook.backfills
    ADD COLUMN max_replica_lag_ms integer NOT NULL DEFAULT 2000,
    ADD COLUMN max_replica_lag_bytes bigint NOT NULL DEFAULT 67108864,
    ADD COLUMN max_retained_wal_bytes bigint NOT NULL DEFAULT 1073741824,
    ADD COLUMN max_wal_rate_bytes bigint,
    ADD COLUMN max_throttle_ms bigint NOT NULL DEFAULT 1800000,
    ADD COLUMN pause_reason text,
    ADD COLUMN standbys_seen text[] NOT NULL DEFAULT '{}',
    ADD COLUMN replica_note text;
ALTER TABLE runbook.backfill_slices
    ADD COLUMN throttle_since timestamptz,
    ADD COLUMN throttle_carried_ms bigint NOT NULL DEFAULT 0;
