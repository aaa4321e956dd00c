"""add next_plan_start_date to calendar_event_type

Revision ID: x6y7z8a9b0c1
Revises: w5x6y7z8a9b0
Create Date: 2026-01-12

Runbook §2.2 / §5.2 / §5.3: the manual SQL migration recorded in Alembic's history, so that
``alembic current`` tells the truth and the data update cannot be forgotten.
"""

from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "x6y7z8a9b0c1"
down_revision: str | Sequence[str] | None = "w5x6y7z8a9b0"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The runbook's manual SQL (§5.2), kept as a file so a DBA can read and review it as SQL.
MANUAL_SQL = Path(__file__).resolve().parent.parent / "sql" / "manual_migration_add_enum_value.sql"

irreversible = "PostgreSQL cannot remove an ENUM value; restore from backup"

verify = """
SELECT EXISTS (
           SELECT 1
           FROM pg_enum e
           JOIN pg_type t ON e.enumtypid = t.oid
           WHERE t.typname = 'calendar_event_type' AND e.enumlabel = 'next_plan_start_date'
       )
   AND NOT EXISTS (
           SELECT 1 FROM calendar_events WHERE event_type::text = 'monitoring_deadline'
       )
"""


def sql_statements(path: Path) -> list[str]:
    """The statements of a plain SQL file: ``--`` comment lines dropped, split on ``;``.

    Deliberately simple: the file holds plain UPDATEs, no ``;`` inside string literals.
    """
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("--")]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


def upgrade() -> None:
    # ALTER TYPE ... ADD VALUE must be committed before the value can be used, so it runs in
    # an autocommit block (this commits the revisions before it, see transaction_per_migration
    # in env.py). IF NOT EXISTS keeps it idempotent if a run is retried after this point.
    with op.get_context().autocommit_block():
        op.execute("ALTER TYPE calendar_event_type ADD VALUE IF NOT EXISTS 'next_plan_start_date'")

    # Back inside this revision's transaction: the data update commits together with the
    # alembic_version bump, or not at all.
    for statement in sql_statements(MANUAL_SQL):
        op.execute(statement)


def downgrade() -> None:
    """Remove 'next_plan_start_date' from calendar_event_type ENUM

    WARNING: PostgreSQL does not support removing ENUM values, and the upgrade also rewrote
    monitoring_deadline rows, which cannot be told apart afterwards. Roll back by restoring
    the backup taken before the upgrade (runbook does this for revisions marked irreversible).
    """
    raise NotImplementedError(
        "Cannot remove ENUM value 'next_plan_start_date' directly: PostgreSQL cannot drop an "
        "ENUM value. Manual intervention required: restore from backup "
        "(see runbook §4.3 for the manual procedure)."
    )
