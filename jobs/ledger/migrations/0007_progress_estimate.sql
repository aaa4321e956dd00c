-- Progress that holds on bloated tables: each slice's key marks (keys at equal rank fractions
-- of its range) and its number of keys, stored at creation (jobs/backfill/marks.py), place the
-- cursor within its range at status time (jobs/ledger/estimate.py); the estimate's kinds.
ALTER TABLE runbook.backfill_slices
    ADD COLUMN key_marks text[],
    ADD COLUMN keys_estimate bigint;
ALTER TABLE runbook.backfills DROP CONSTRAINT backfills_estimate_kind_check,
    ADD CONSTRAINT backfills_estimate_kind_check
        CHECK (estimate_kind IN ('counted', 'key-range', 'sampled', 'planner'));
