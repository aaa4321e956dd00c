"""add threshold fields to notification_preferences

Revision ID: b0c1d2e3f4g5
Revises: a9b0c1d2e3f4
Create Date: 2026-01-15

Runbook §7.3: add email_threshold_days / push_threshold_days to the existing JSONB column,
keeping every staff's current choices. Upgrade and downgrade are the runbook's own.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b0c1d2e3f4g5"
down_revision: str | Sequence[str] | None = "a9b0c1d2e3f4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every row has both fields, and new rows get them from the column default.
verify = """
SELECT NOT EXISTS (
           SELECT 1 FROM staffs
           WHERE notification_preferences -> 'email_threshold_days' IS NULL
              OR notification_preferences -> 'push_threshold_days' IS NULL
       )
   AND position('push_threshold_days' IN (
           SELECT pg_get_expr(d.adbin, d.adrelid)
           FROM pg_attrdef d
           JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
           WHERE d.adrelid = 'staffs'::regclass AND a.attname = 'notification_preferences'
       )) > 0
"""


def upgrade() -> None:
    """Add threshold fields to existing notification_preferences column"""

    # Existing rows: merge the new fields in (|| keeps every key the staff already has).
    # One UPDATE is fine here: staffs is a small table (large tables: see d2e3f4g5h6i7).
    op.execute("""
        UPDATE staffs
        SET notification_preferences = notification_preferences ||
            '{"email_threshold_days": 30, "push_threshold_days": 10}'::jsonb
        WHERE notification_preferences IS NOT NULL
    """)

    # New rows: widen the column default.
    op.alter_column(
        "staffs",
        "notification_preferences",
        server_default=sa.text(
            '\'{"in_app_notification": true, "email_notification": true, '
            '"system_notification": false, "email_threshold_days": 30, '
            '"push_threshold_days": 10}\'::jsonb'
        ),
    )


def downgrade() -> None:
    """Remove threshold fields from notification_preferences"""

    # Remove the fields (staffs' other preferences stay as they are)
    op.execute("""
        UPDATE staffs
        SET notification_preferences =
            notification_preferences - 'email_threshold_days' - 'push_threshold_days'
        WHERE notification_preferences IS NOT NULL
    """)

    # Restore the previous default
    op.alter_column(
        "staffs",
        "notification_preferences",
        server_default=sa.text(
            '\'{"in_app_notification": true, "email_notification": true, '
            '"system_notification": false}\'::jsonb'
        ),
    )
