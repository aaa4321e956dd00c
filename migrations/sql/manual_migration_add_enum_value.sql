-- =====================================================
-- Revision ID: x6y7z8a9b0c1
-- Revises: w5x6y7z8a9b0
-- Create Date: 2026-01-12
-- calendar_event_type enum: move monitoring deadlines to the new next_plan_start_date value
-- (runbook §5.2 step 4).
-- =====================================================
--
-- Executed by migrations/versions/x6y7z8a9b0c1_add_next_plan_start_date_to_calendar_event_type.py
-- inside that revision's transaction, AFTER the revision has added the enum value in an
-- autocommit block: PostgreSQL refuses to use an enum value in the transaction that added it
-- ("unsafe use of new value"), so `ALTER TYPE ... ADD VALUE` cannot live in this file.
--
-- Keep this file to data statements only. It is re-runnable: a second run updates nothing.

UPDATE calendar_events
SET event_type = 'next_plan_start_date'
WHERE event_type = 'monitoring_deadline';
