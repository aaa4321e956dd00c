"""Initial schema: staffs, audit_logs, calendar_events (with its ENUM) and large_table

Revision ID: w5x6y7z8a9b0
Revises:
Create Date: 2026-01-05

The state of the runbook's application before its case studies: audit_logs.staff_id is still
NOT NULL with ON DELETE CASCADE (§7.2 changes that), calendar_event_type has three values
(§5.2 adds a fourth), and large_table is the "millions of rows" table of §6.4.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "w5x6y7z8a9b0"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

verify = """
SELECT to_regclass('staffs') IS NOT NULL
   AND to_regclass('audit_logs') IS NOT NULL
   AND to_regclass('calendar_events') IS NOT NULL
   AND to_regclass('large_table') IS NOT NULL
   AND to_regtype('calendar_event_type') IS NOT NULL
"""

# create_type=False: the type is created and dropped explicitly below, which renders the
# same SQL online and offline (--sql) instead of relying on table events.
calendar_event_type = postgresql.ENUM(
    "renewal_deadline",
    "monitoring_deadline",
    "custom",
    name="calendar_event_type",
    create_type=False,
)


def upgrade() -> None:
    op.create_table(
        "staffs",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
        ),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="staffs_pkey"),
        sa.UniqueConstraint("email", name="staffs_email_key"),
    )
    op.create_table(
        "audit_logs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("staff_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="audit_logs_pkey"),
        # CASCADE: deleting a staff deletes their audit trail; y7z8a9b0c1d2 fixes that.
        sa.ForeignKeyConstraint(
            ["staff_id"], ["staffs.id"], name="audit_logs_staff_id_fkey", ondelete="CASCADE"
        ),
    )

    op.execute(
        "CREATE TYPE calendar_event_type AS ENUM ('renewal_deadline', "
        "'monitoring_deadline', 'custom')"
    )
    op.create_table(
        "calendar_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("staff_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("event_type", calendar_event_type, nullable=False),
        sa.Column("event_date", sa.Date(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="calendar_events_pkey"),
        sa.ForeignKeyConstraint(
            ["staff_id"],
            ["staffs.id"],
            name="calendar_events_staff_id_fkey",
            ondelete="CASCADE",
        ),
    )
    # Index the foreign key: PostgreSQL does not, and a staff delete would scan the table.
    # Creating it on a new, empty table needs no CONCURRENTLY.
    op.create_index("idx_calendar_events_staff_id", "calendar_events", ["staff_id"])

    op.create_table(
        "large_table",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="large_table_pkey"),
    )


def downgrade() -> None:
    # Children before parents, then the type once no column uses it.
    op.drop_table("large_table")
    op.drop_index("idx_calendar_events_staff_id", table_name="calendar_events")
    op.drop_table("calendar_events")
    op.execute("DROP TYPE calendar_event_type")
    op.drop_table("audit_logs")
    op.drop_table("staffs")
