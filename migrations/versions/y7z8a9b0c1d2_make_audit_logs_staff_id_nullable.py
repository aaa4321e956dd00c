"""Make audit_logs.staff_id nullable

Revision ID: y7z8a9b0c1d2
Revises: x6y7z8a9b0c1
Create Date: 2026-01-12

Runbook §7.2 (20260112_140334_make_audit_logs_staff_id_nullable.sql): audit logs must survive
the deletion of the staff who wrote them, so the foreign key becomes ON DELETE SET NULL.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "y7z8a9b0c1d2"
down_revision: str | Sequence[str] | None = "x6y7z8a9b0c1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

verify = """
SELECT NOT a.attnotnull
   AND EXISTS (
           SELECT 1 FROM pg_constraint c
           WHERE c.conname = 'audit_logs_staff_id_fkey'
             AND c.conrelid = 'audit_logs'::regclass
             AND c.contype = 'f'
             AND c.confdeltype = 'n'
             AND c.convalidated
       )
FROM pg_attribute a
WHERE a.attrelid = 'audit_logs'::regclass AND a.attname = 'staff_id' AND NOT a.attisdropped
"""

FK = "audit_logs_staff_id_fkey"


def _replace_fk(ondelete: str) -> None:
    # Same name, new rule. Dropping and adding in one transaction leaves no moment without
    # the constraint; NOT VALID skips the full-table check while ACCESS EXCLUSIVE is held.
    op.execute(f"ALTER TABLE audit_logs DROP CONSTRAINT IF EXISTS {FK}")
    op.execute(
        f"ALTER TABLE audit_logs ADD CONSTRAINT {FK} FOREIGN KEY (staff_id) "
        f"REFERENCES staffs(id) ON DELETE {ondelete} NOT VALID"
    )


def _validate_fk() -> None:
    # Committed first (autocommit), then validated: VALIDATE CONSTRAINT only takes SHARE
    # UPDATE EXCLUSIVE, so reads and writes on audit_logs continue during the scan.
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE audit_logs VALIDATE CONSTRAINT {FK}")


def upgrade() -> None:
    op.alter_column("audit_logs", "staff_id", nullable=True)  # metadata only, no scan
    _replace_fk("SET NULL")
    _validate_fk()


def downgrade() -> None:
    """Restore NOT NULL and ON DELETE CASCADE.

    Fails if a staff was deleted since the upgrade (their audit logs now have staff_id NULL).
    The runbook's manual rollback deletes those rows; this one refuses instead, because they
    are exactly the audit history the upgrade was made to keep. Assign them to a system staff
    (UPDATE audit_logs SET staff_id = ... WHERE staff_id IS NULL) or restore from backup.
    """
    if not op.get_context().as_sql:  # offline SQL: SET NOT NULL below fails the same way
        orphaned = (
            op.get_bind()
            .execute(sa.text("SELECT count(*) FROM audit_logs WHERE staff_id IS NULL"))
            .scalar_one()
        )
        if orphaned:
            raise RuntimeError(
                f"Cannot restore audit_logs.staff_id NOT NULL: {orphaned} audit log row(s) have "
                "staff_id NULL (their staff was deleted). Refusing to delete audit history: "
                "assign them to a system staff or restore from backup, then retry."
            )
    _replace_fk("CASCADE")
    op.alter_column("audit_logs", "staff_id", nullable=False)
    _validate_fk()
