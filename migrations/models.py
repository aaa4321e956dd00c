"""The reference application's schema at head, as SQLAlchemy Core tables.

This is what the revisions in ``versions/`` must add up to: env.py hands it to Alembic as
``target_metadata`` so that ``alembic check`` / autogenerate (and runbook's drift check) can
compare a migrated database against it. Change a table here and in a new revision together.
"""

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

# Explicit constraint names (PostgreSQL's own defaults) so that revisions, this file and
# the database all agree, and a drop/recreate in a revision can name what it touches.
metadata = sa.MetaData()

# The JSONB default introduced by a9b0c1d2e3f4 and widened with thresholds by b0c1d2e3f4g5.
NOTIFICATION_PREFERENCES_DEFAULT = (
    '{"in_app_notification": true, "email_notification": true, '
    '"system_notification": false, "email_threshold_days": 30, '
    '"push_threshold_days": 10}'
)

CALENDAR_EVENT_TYPES = (
    "renewal_deadline",
    "monitoring_deadline",
    "custom",
    "next_plan_start_date",  # added by x6y7z8a9b0c1; PostgreSQL cannot remove it again
)

calendar_event_type = postgresql.ENUM(*CALENDAR_EVENT_TYPES, name="calendar_event_type")

staffs = sa.Table(
    "staffs",
    metadata,
    sa.Column(
        "id",
        postgresql.UUID(as_uuid=True),
        server_default=sa.text("gen_random_uuid()"),
        nullable=False,
    ),
    sa.Column("name", sa.Text(), nullable=False),
    sa.Column("email", sa.Text(), nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    ),
    sa.Column(
        "notification_preferences",
        postgresql.JSONB(astext_type=sa.Text()),
        server_default=sa.text(f"'{NOTIFICATION_PREFERENCES_DEFAULT}'::jsonb"),
        nullable=False,
    ),
    sa.PrimaryKeyConstraint("id", name="staffs_pkey"),
    sa.UniqueConstraint("email", name="staffs_email_key"),
)

audit_logs = sa.Table(
    "audit_logs",
    metadata,
    sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
    # Nullable since y7z8a9b0c1d2: audit history outlives the staff who made it.
    sa.Column("staff_id", postgresql.UUID(as_uuid=True), nullable=True),
    sa.Column("action", sa.Text(), nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    ),
    sa.PrimaryKeyConstraint("id", name="audit_logs_pkey"),
    sa.ForeignKeyConstraint(
        ["staff_id"], ["staffs.id"], name="audit_logs_staff_id_fkey", ondelete="SET NULL"
    ),
)

calendar_events = sa.Table(
    "calendar_events",
    metadata,
    sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column("staff_id", postgresql.UUID(as_uuid=True), nullable=False),
    sa.Column("event_type", calendar_event_type, nullable=False),
    sa.Column("event_date", sa.Date(), nullable=False),
    sa.PrimaryKeyConstraint("id", name="calendar_events_pkey"),
    sa.ForeignKeyConstraint(
        ["staff_id"], ["staffs.id"], name="calendar_events_staff_id_fkey", ondelete="CASCADE"
    ),
    # PostgreSQL does not index foreign keys by itself; staff deletes would scan the table.
    sa.Index("idx_calendar_events_staff_id", "staff_id"),
)

push_subscriptions = sa.Table(
    "push_subscriptions",
    metadata,
    sa.Column(
        "id",
        postgresql.UUID(as_uuid=True),
        server_default=sa.text("gen_random_uuid()"),
        nullable=False,
    ),
    sa.Column("staff_id", postgresql.UUID(as_uuid=True), nullable=False),
    sa.Column("endpoint", sa.Text(), nullable=False),
    sa.Column("p256dh_key", sa.Text(), nullable=False),
    sa.Column("auth_key", sa.Text(), nullable=False),
    sa.Column("user_agent", sa.Text(), nullable=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    ),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
    ),
    sa.PrimaryKeyConstraint("id", name="push_subscriptions_pkey"),
    sa.ForeignKeyConstraint(
        ["staff_id"], ["staffs.id"], name="push_subscriptions_staff_id_fkey", ondelete="CASCADE"
    ),
    sa.UniqueConstraint("endpoint", name="push_subscriptions_endpoint_key"),
    sa.Index("idx_push_subscriptions_staff_id", "staff_id"),
)

large_table = sa.Table(
    "large_table",
    metadata,
    sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column("payload", sa.Text(), nullable=False),
    # Expanded by c1d2e3f4g5h6, backfilled by d2e3f4g5h6i7, contracted by e3f4g5h6i7j8.
    sa.Column("new_column", sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint("id", name="large_table_pkey"),
)
