-- The backups table (jobs/ledger/backups.py) and the rehearsals read from runs and steps.

-- record_backup --
-- Record a backup taken (its checks and tables as jsonb).
INSERT INTO runbook.backups (id, target, run_id, path, size, sha256, taken_at, verified,
    verification, tables, copies, revision, deleted_at)
VALUES (:id, :target, :run_id, :path, :size, :sha256, :taken_at, :verified,
    CAST(:verification AS jsonb), CAST(:tables AS jsonb), CAST(:copies AS jsonb), :revision,
    :deleted_at)

-- get_backup --
-- One backup by id.
SELECT id, target, run_id, path, size, sha256, taken_at, verified, verification, tables,
    copies, revision, deleted_at
FROM runbook.backups WHERE id = :id

-- list_backups --
-- A target's backups, newest first; deleted ones only with :include_deleted.
SELECT id, target, run_id, path, size, sha256, taken_at, verified, verification, tables,
    copies, revision, deleted_at
FROM runbook.backups
WHERE target = :t AND (CAST(:include_deleted AS boolean) OR deleted_at IS NULL)
ORDER BY taken_at DESC

-- mark_backup_deleted --
-- Note that a backup's file was deleted (its row stays).
UPDATE runbook.backups SET deleted_at = now() WHERE id = :id

-- latest_rehearsal --
-- The newest finished rehearsal of exactly these revisions, with its step's findings.
SELECT r.id, r.state, r.finished_at, s.detail FROM runbook.runs r
JOIN runbook.steps s ON s.run_id = r.id AND s.kind = 'rehearse'
WHERE r.kind = 'rehearse' AND r.state IN ('succeeded', 'failed')
    AND r.from_revision IS NOT DISTINCT FROM :f AND r.to_revision IS NOT DISTINCT FROM :t
ORDER BY r.created_at DESC LIMIT 1
