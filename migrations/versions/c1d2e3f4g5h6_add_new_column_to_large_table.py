"""Add large_table.new_column (expand)

Revision ID: c1d2e3f4g5h6
Revises: b0c1d2e3f4g5
Create Date: 2026-01-20

Runbook §6.4 done as expand / backfill / contract, one revision each, so that no step holds
a lock on a large table for longer than a moment:
  c1d2e3f4g5h6  add the column NULL, without default: metadata only, no table rewrite
  d2e3f4g5h6i7  backfill it in short batches
  e3f4g5h6i7j8  make it NOT NULL without a long ACCESS EXCLUSIVE scan
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c1d2e3f4g5h6"
down_revision: str | Sequence[str] | None = "b0c1d2e3f4g5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

verify = """
SELECT EXISTS (
    SELECT 1 FROM pg_attribute
    WHERE attrelid = 'large_table'::regclass AND attname = 'new_column' AND NOT attisdropped
)
"""


def upgrade() -> None:
    # Nullable and without a default: instant whatever the table size. The application
    # deployed with this revision should already write new_column for new rows.
    op.add_column("large_table", sa.Column("new_column", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("large_table", "new_column")
