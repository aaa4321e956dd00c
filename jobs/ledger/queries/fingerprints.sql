-- What the steps recorded of applied revisions (jobs/ledger/fingerprints.py).

-- applied_file_hashes --
-- Per revision, the latest succeeded upgrade or downgrade step, its file hash and run state.
SELECT DISTINCT ON (s.revision) s.revision, s.kind, s.run_id, r.state AS run_state,
    s.detail->>'file_sha256' AS file_sha256
FROM runbook.steps s JOIN runbook.runs r ON r.id = s.run_id
WHERE s.kind IN ('upgrade', 'downgrade') AND s.state = 'succeeded' AND s.revision <> ''
ORDER BY s.revision, s.id DESC

-- ledger_changes --
-- Succeeded upgrade and downgrade steps, newest first.
SELECT kind, revision, run_id FROM runbook.steps
WHERE kind IN ('upgrade', 'downgrade') AND state = 'succeeded' AND revision <> ''
ORDER BY id DESC

-- recorded_fingerprints --
-- The latest schema fingerprint each revision's succeeded verify step recorded.
SELECT DISTINCT ON (revision) revision, detail->>'fingerprint' AS fp
FROM runbook.steps WHERE kind = 'verify' AND state = 'succeeded'
    AND detail->>'fingerprint' IS NOT NULL
ORDER BY revision, id DESC

-- recorded_fingerprint --
-- The schema fingerprint the latest succeeded verify step of revision :rev recorded.
SELECT detail->>'fingerprint' FROM runbook.steps
WHERE kind = 'verify' AND revision = :rev AND state = 'succeeded'
ORDER BY id DESC LIMIT 1
