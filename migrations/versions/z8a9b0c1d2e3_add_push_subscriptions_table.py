"""Add push_subscriptions table for Web Push notifications

Revision ID: z8a9b0c1d2e3
Revises: y7z8a9b0c1d2
Create Date: 2026-01-13

Task: Web Push通知のためのpush_subscriptionsテーブル作成 (runbook §2.1, §7.1)
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "z8a9b0c1d2e3"
down_revision: str | Sequence[str] | None = "y7z8a9b0c1d2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The checks of the runbook's §3.3: table, cascading foreign key, unique endpoint, index.
verify = """
SELECT to_regclass('push_subscriptions') IS NOT NULL
   AND EXISTS (
           SELECT 1 FROM pg_constraint
           WHERE conname = 'push_subscriptions_staff_id_fkey'
             AND conrelid = 'push_subscriptions'::regclass
             AND confrelid = 'staffs'::regclass
             AND confdeltype = 'c'
       )
   AND EXISTS (
           SELECT 1 FROM pg_constraint
           WHERE conname = 'push_subscriptions_endpoint_key'
             AND conrelid = 'push_subscriptions'::regclass
             AND contype = 'u'
       )
   AND to_regclass('idx_push_subscriptions_staff_id') IS NOT NULL
"""


def upgrade() -> None:
    """Add push_subscriptions table for Web Push notifications"""

    # 1. push_subscriptions table (new and empty: no lock or rewrite concerns)
    op.create_table(
        "push_subscriptions",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            primary_key=True,
            server_default=sa.text("gen_random_uuid()"),
        ),
        sa.Column("staff_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("p256dh_key", sa.Text(), nullable=False),
        sa.Column("auth_key", sa.Text(), nullable=False),
        sa.Column("user_agent", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("NOW()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("NOW()"),
            nullable=False,
        ),
        # Foreign key: a staff's subscriptions go with the staff
        sa.ForeignKeyConstraint(
            ["staff_id"],
            ["staffs.id"],
            name="push_subscriptions_staff_id_fkey",
            ondelete="CASCADE",
        ),
        # UNIQUE: one row per endpoint (同一エンドポイントは1つのみ)
        sa.UniqueConstraint("endpoint", name="push_subscriptions_endpoint_key"),
    )

    # 2. Index for the per-staff lookups and for the cascade on staff delete
    op.create_index("idx_push_subscriptions_staff_id", "push_subscriptions", ["staff_id"])


def downgrade() -> None:
    """Remove push_subscriptions table

    WARNING: This will permanently delete all push subscription data. Users will need to
    re-enable push notifications after upgrading again; the run's backup keeps the rows
    (runbook §4.3: pg_restore -t push_subscriptions).
    """
    op.drop_index("idx_push_subscriptions_staff_id", table_name="push_subscriptions")
    op.drop_table("push_subscriptions")
