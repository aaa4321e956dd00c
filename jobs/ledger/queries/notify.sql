-- Announcements of changed runs and backfills (jobs/ledger/notify.py); the channel is
-- jobs/ledger/notify.py CHANNEL.

-- notify --
-- Announce that run (or backfill) :id changed.
SELECT pg_notify(:ch, :id)

-- notify_unflushed --
-- Announce a change, and let this transaction commit without waiting for its WAL flush.
SELECT pg_notify(:ch, :id), set_config('synchronous_commit', 'off', true)

-- listen --
-- Subscribe this connection to the announcements.
LISTEN runbook_runs
