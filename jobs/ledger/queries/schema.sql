-- The ledger's own bookkeeping (jobs/ledger/schema.py); its tables come from
-- jobs/ledger/migrations/.

-- ledger_exists --
-- Whether the ledger's runs table exists, without creating anything (:t = 'runbook.runs').
SELECT to_regclass(:t) IS NOT NULL

-- take_admission_lock --
-- Serialise ledger upgrades and run admissions on one target until the transaction ends.
SELECT pg_advisory_xact_lock(:k)

-- create_ledger_schema --
-- The ledger's schema, if this database has none yet.
CREATE SCHEMA IF NOT EXISTS runbook

-- create_ledger_version --
-- The table recording which migrations of jobs/ledger/migrations/ were applied.
CREATE TABLE IF NOT EXISTS runbook.ledger_version (version integer NOT NULL)

-- ledger_version --
-- The ledger's version: the last migration applied (NULL for a new ledger).
SELECT max(version) FROM runbook.ledger_version

-- record_ledger_version --
-- Note that migration :v was applied.
INSERT INTO runbook.ledger_version (version) VALUES (:v)
