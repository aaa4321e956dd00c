"""Make large_table.new_column NOT NULL (contract)

Revision ID: e3f4g5h6i7j8
Revises: d2e3f4g5h6i7
Create Date: 2026-01-21

Runbook §6.4 and §8 error 3 (NotNullViolation): a plain ``SET NOT NULL`` scans the whole
table while holding ACCESS EXCLUSIVE, blocking every read and write for the duration. Instead:
  1. ADD CONSTRAINT ... CHECK (new_column IS NOT NULL) NOT VALID   brief lock, no scan
  2. VALIDATE CONSTRAINT                     scans under SHARE UPDATE EXCLUSIVE: traffic goes on
  3. ALTER COLUMN SET NOT NULL               PostgreSQL 12+ trusts the valid check: no scan
  4. DROP CONSTRAINT                         redundant now
Each step commits on its own (autocommit block) so no step keeps a previous step's lock.
If rows are still NULL, step 2 fails and names the constraint; run the backfill again.
runbook checks that first (``requires_backfills``) and refuses the revision with one line.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e3f4g5h6i7j8"
down_revision: str | Sequence[str] | None = "d2e3f4g5h6i7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECK = "large_table_new_column_not_null"

# runbook: the backfill d2e3f4g5h6i7 declares must have finished, and no row may still match
# its WHERE (new_column IS NULL), before this revision runs (GitLab's "ensure finished").
requires_backfills = ["d2e3f4g5h6i7"]

verify = f"""
SELECT a.attnotnull
   AND NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = '{CHECK}')
FROM pg_attribute a
WHERE a.attrelid = 'large_table'::regclass AND a.attname = 'new_column' AND NOT a.attisdropped
"""


def _check_exists() -> bool:
    # A retry after a failure in step 2 or 3 finds the constraint already there.
    if op.get_context().as_sql:
        return False
    found = op.get_bind().execute(
        sa.text(
            "SELECT 1 FROM pg_constraint "
            "WHERE conname = :name AND conrelid = 'large_table'::regclass"
        ),
        {"name": CHECK},
    )
    return found.first() is not None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        if not _check_exists():
            op.execute(
                f"ALTER TABLE large_table ADD CONSTRAINT {CHECK} "
                "CHECK (new_column IS NOT NULL) NOT VALID"
            )
        op.execute(f"ALTER TABLE large_table VALIDATE CONSTRAINT {CHECK}")
        op.execute("ALTER TABLE large_table ALTER COLUMN new_column SET NOT NULL")
        op.execute(f"ALTER TABLE large_table DROP CONSTRAINT {CHECK}")


def downgrade() -> None:
    # Dropping NOT NULL is metadata only; the check constraint is already gone at this revision.
    op.alter_column("large_table", "new_column", nullable=True)
