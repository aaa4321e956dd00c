"""Add notification_preferences to staffs

Revision ID: a9b0c1d2e3f4
Revises: z8a9b0c1d2e3
Create Date: 2026-01-14
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "a9b0c1d2e3f4"
down_revision: str | Sequence[str] | None = "z8a9b0c1d2e3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT = (
    '\'{"in_app_notification": true, "email_notification": true, '
    '"system_notification": false}\'::jsonb'
)

verify = """
SELECT a.attnotnull
   AND NOT EXISTS (
           SELECT 1 FROM staffs WHERE notification_preferences -> 'in_app_notification' IS NULL
       )
FROM pg_attribute a
WHERE a.attrelid = 'staffs'::regclass
  AND a.attname = 'notification_preferences'
  AND NOT a.attisdropped
"""


def upgrade() -> None:
    # NOT NULL with a constant default is metadata-only since PostgreSQL 11: existing rows
    # read the default without a table rewrite, so this holds ACCESS EXCLUSIVE only briefly.
    op.add_column(
        "staffs",
        sa.Column(
            "notification_preferences",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text(DEFAULT),
            nullable=False,
        ),
    )


def downgrade() -> None:
    """Drop the column.

    WARNING: staffs' chosen preferences are lost; the run's backup keeps them.
    """
    op.drop_column("staffs", "notification_preferences")
