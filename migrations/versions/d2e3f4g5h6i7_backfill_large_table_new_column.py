"""Backfill large_table.new_column in batches

Revision ID: d2e3f4g5h6i7
Revises: c1d2e3f4g5h6
Create Date: 2026-01-20

Runbook §6.4, with its loop's flaws fixed:
* batches are walked by primary key (keyset: ``id > last ORDER BY id LIMIT n``), never by
  OFFSET or by re-scanning ``WHERE new_column IS NULL`` from the start, so each batch costs
  the same however far the backfill has got;
* each batch commits on its own (autocommit block), so row locks are held for one batch
  only and a crash keeps the batches already done; re-running resumes cheaply, since rows
  already filled are skipped;
* no unbounded single UPDATE of the whole table.
That loop is what plain ``alembic upgrade`` runs. runbook reads ``backfills`` below instead:
it skips the loop and runs the same UPDATE as a resumable, checkpointed backfill on its
workers, right after this upgrade and before this revision's verify.
"""

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d2e3f4g5h6i7"
down_revision: str | Sequence[str] | None = "c1d2e3f4g5h6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

verify = "SELECT NOT EXISTS (SELECT 1 FROM large_table WHERE new_column IS NULL)"

BATCH_SIZE = 1000
LOG_EVERY = 50  # batches

# Module-level data plain Alembic ignores: runbook's declared backfill, the same UPDATE as
# the loop below (jobs/sqlguard.py checks it; the key walks the table in batches).
backfills = [
    {
        "table": "large_table",
        "set": "new_column = 'default_value'",
        "where": "new_column IS NULL",
        "key": "id",
        "batch_size": BATCH_SIZE,
        "slices": 1,
    }
]

# Under the "alembic" logger so the CLI's alembic.ini logging shows progress.
log = logging.getLogger("alembic.runbook.backfill")

# The upper id of the next batch: the BATCH_SIZE-th id after `last`, via the primary key.
NEXT_UPPER = sa.text(
    "SELECT max(id) FROM "
    "(SELECT id FROM large_table WHERE id > :last ORDER BY id LIMIT :batch_size) AS batch"
)
UPDATE_BATCH = sa.text(
    "UPDATE large_table SET new_column = 'default_value' "
    "WHERE id > :last AND id <= :upper AND new_column IS NULL"
)

# Offline (--sql) there is no database to loop against, so the same keyset loop is rendered
# as a DO block. It runs outside a transaction block (autocommit), so it may COMMIT after
# every batch like the online version (PostgreSQL 11+; do not run the script with psql -1).
OFFLINE_LOOP = f"""
DO $$
DECLARE
    last_id bigint := (SELECT min(id) - 1 FROM large_table);
    upper_id bigint;
BEGIN
    LOOP
        SELECT max(id) INTO upper_id
        FROM (SELECT id FROM large_table WHERE id > last_id ORDER BY id LIMIT {BATCH_SIZE}) AS b;
        EXIT WHEN upper_id IS NULL;
        UPDATE large_table SET new_column = 'default_value'
        WHERE id > last_id AND id <= upper_id AND new_column IS NULL;
        COMMIT;
        last_id := upper_id;
    END LOOP;
END
$$
"""


def _runbook_runs_the_backfill() -> bool:
    """True when runbook drives this migration: it runs ``backfills`` itself."""
    config = op.get_context().config
    return config is not None and bool(config.attributes.get("runbook_runs_declared_backfills"))


def upgrade() -> None:
    if _runbook_runs_the_backfill():
        return
    context = op.get_context()
    with context.autocommit_block():
        if context.as_sql:
            op.execute(OFFLINE_LOOP)
            return

        bind = op.get_bind()
        first = bind.execute(sa.text("SELECT min(id) FROM large_table")).scalar()
        if first is None:
            return
        last, batches, updated = first - 1, 0, 0
        while True:
            upper = bind.execute(NEXT_UPPER, {"last": last, "batch_size": BATCH_SIZE}).scalar()
            if upper is None:
                break
            # Each statement commits by itself here: one short transaction per batch.
            updated += bind.execute(UPDATE_BATCH, {"last": last, "upper": upper}).rowcount
            last, batches = upper, batches + 1
            if batches % LOG_EVERY == 0:
                log.info(
                    "backfill large_table: %d batches, %d rows, last id %d", batches, updated, last
                )
        log.info("backfill large_table done: %d batches, %d rows updated", batches, updated)


def downgrade() -> None:
    # Nothing to undo: this revision only writes data into a column that c1d2e3f4g5h6 added
    # and whose downgrade drops. Setting the values back to NULL would be a full-table write
    # for nothing, and would also erase values the application wrote meanwhile.
    pass
