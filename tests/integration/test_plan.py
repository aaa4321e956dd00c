"""Plans against a real database: every pending revision, its findings, its tables' sizes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

from jobs.config import Target, normalize_url
from jobs.insight import plan
from jobs.pg import db
from jobs.project.runtime import Project
from tests.integration.conftest import REPO, Databases, db_url, query
from tests.projects import Rev, write_project

pytestmark = pytest.mark.integration

REVISIONS = [
    Rev(
        "p1_base",
        """
        op.execute("CREATE TYPE order_status AS ENUM ('new', 'paid')")
        op.execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
        op.execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, note text, "
            "status order_status NOT NULL DEFAULT 'new')"
        )
        op.execute("CREATE TABLE empty_never_analyzed (id int)")
        """,
        "op.execute('DROP TABLE orders, customers, empty_never_analyzed; DROP TYPE order_status')",
        message="base tables",
    ),
    Rev(
        "p2_index",
        "op.create_index('ix_orders_customer', 'orders', ['customer_id'])",
        "op.drop_index('ix_orders_customer', 'orders')",
        message="index orders by customer",
    ),
    Rev(
        "p3_not_null",
        "op.alter_column('orders', 'note', existing_type=sa.Text(), nullable=False)",
        "op.alter_column('orders', 'note', existing_type=sa.Text(), nullable=True)",
        message="orders.note not null",
    ),
    Rev(
        "p4_fk",
        "op.create_foreign_key('orders_customer_fk', 'orders', 'customers', ['customer_id'], ['id'])",
        "op.drop_constraint('orders_customer_fk', 'orders', type_='foreignkey')",
        message="orders reference customers",
    ),
    Rev(
        "p5_enum",
        """
        with op.get_context().autocommit_block():
            op.execute("ALTER TYPE order_status ADD VALUE IF NOT EXISTS 'shipped'")
        """,
        "raise NotImplementedError('PostgreSQL cannot drop an enum value')",
        message="orders can be shipped",
    ),
    Rev(
        "p6_reads",
        """
        if op.get_bind().execute(sa.text('SELECT count(*) FROM orders')).scalar():
            op.execute("UPDATE orders SET note = upper(note)")
        """,
        message="shout notes when there are orders",
    ),
    Rev(
        "p7_new_table",
        """
        op.execute("CREATE TABLE shipments (id int PRIMARY KEY, order_id bigint REFERENCES orders (id))")
        op.execute("CREATE INDEX ix_shipments_order ON shipments (order_id)")
        """,
        "op.execute('DROP TABLE shipments')",
        message="shipments",
    ),
]
PENDING = [r.id for r in REVISIONS[1:]]


def make_target(dbname: str, ini: Path, **options: object) -> Target:
    return Target(
        name=f"plan_{dbname}",
        url=normalize_url(db_url(dbname)),
        alembic_ini=ini,
        backup_dir=ini.parent / "backups",
        **options,  # type: ignore[arg-type]
    )


def execute(dbname: str, *statements: str) -> None:
    conn = psycopg2.connect(db_url(dbname))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql)
    finally:
        conn.close()


def build(target: Target, to: str | None = None) -> dict:
    project = Project(target)
    try:
        with db.connect(target) as conn:
            return plan.build_plan(target, project, conn, to)
    finally:
        project.close()


def entry(doc: dict, rev: str) -> dict:
    return next(e for e in doc["revisions"] if e["id"] == rev)


def rules(e: dict) -> set[str]:
    return {f["rule"] for f in e["lint"]}


def finding(e: dict, rule: str) -> dict:
    return next(f for f in e["lint"] if f["rule"] == rule)


@pytest.fixture
def at_base(databases: Databases, tmp_path: Path) -> Target:
    """A database at p1_base with 3000 orders and 50 customers, analyzed."""
    dbname = databases.create()
    target = make_target(dbname, write_project(tmp_path / "proj", REVISIONS))
    project = Project(target)
    try:
        project.upgrade_one(project.revision("p1_base"))
    finally:
        project.close()
    execute(
        dbname,
        "INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 50) g",
        "INSERT INTO orders SELECT g, 1 + g % 50, 'note ' || g FROM generate_series(1, 3000) g",
        "ANALYZE customers",
        "ANALYZE orders",
    )
    return target


def test_plan_lists_every_pending_revision_with_its_findings(at_base: Target) -> None:
    doc = build(at_base)
    assert doc["target"] == at_base.name
    assert doc["current"] == "p1_base" and doc["to"] == "p7_new_table"
    assert [e["id"] for e in doc["revisions"]] == ["p1_base", *PENDING]
    assert [e["status"] for e in doc["revisions"]] == ["current"] + ["pending"] * len(PENDING)
    current = doc["revisions"][0]
    assert current["message"] == "base tables" and "sql" not in current
    assert current["sha256"] == Project(at_base).revision("p1_base").sha256
    assert current["path"].endswith("p1_base.py")

    index = entry(doc, "p2_index")
    f = finding(index, "require-concurrent-index-creation")
    assert f["statement"] == "CREATE INDEX ix_orders_customer ON orders (customer_id)"
    assert f["level"] == "error"
    assert "CREATE INDEX ix_orders_customer" in index["sql"]
    assert index["outside_transaction"] is False
    assert index["irreversible"] is None
    assert index["render_error"] is None and index["backfills"] == []

    not_null = entry(doc, "p3_not_null")
    assert finding(not_null, "adding-not-nullable-field")["statement"] == (
        "ALTER TABLE orders ALTER COLUMN note SET NOT NULL"
    )

    fk = entry(doc, "p4_fk")
    assert {"adding-foreign-key-constraint", "constraint-missing-not-valid"} <= rules(fk)
    assert finding(fk, "adding-foreign-key-constraint")["statement"].startswith(
        "ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY(customer_id) "
        "REFERENCES customers (id)"
    )
    assert [t["name"] for t in fk["tables"]] == ["orders", "customers"]

    enum = entry(doc, "p5_enum")
    assert enum["outside_transaction"] is True
    assert enum["irreversible"] == "its downgrade() raises NotImplementedError"
    assert finding(enum, "ban-add-enum-value")["statement"] == (
        "ALTER TYPE order_status ADD VALUE IF NOT EXISTS 'shipped'"
    )

    # Each finding sits with its own revision, and Alembic's bookkeeping is never linted.
    assert "require-concurrent-index-creation" not in rules(not_null) | rules(fk) | rules(enum)
    assert "adding-foreign-key-constraint" not in rules(index) | rules(not_null)
    every = [f for e in doc["revisions"][1:] for f in e["lint"]]
    assert not [f for f in every if "alembic_version" in f["statement"]]
    assert "require-lock-timeout" not in {f["rule"] for f in every}
    assert doc["lint_errors"] == sum(f["level"] == "error" for f in every) >= 4

    json.dumps(doc)  # the plan is plain JSON


def test_a_revision_that_reads_the_database_is_shown_with_its_render_error(
    at_base: Target,
) -> None:
    reads = entry(build(at_base), "p6_reads")
    assert reads["status"] == "pending"
    assert reads["sql"] is None
    assert reads["render_error"].startswith("cannot render the upgrade of p6_reads offline (")
    assert "\n" not in reads["render_error"]
    assert reads["lint"] == [] and reads["tables"] == []
    assert reads["outside_transaction"] is None
    assert reads["irreversible"] == "its downgrade() does nothing"


def test_tables_carry_live_sizes_and_estimated_rows(at_base: Target) -> None:
    doc = build(at_base)
    orders = entry(doc, "p2_index")["tables"]
    assert len(orders) == 1
    assert orders[0]["name"] == "orders" and orders[0]["exists"] is True
    assert orders[0]["estimated_rows"] == 3000
    assert orders[0]["size_bytes"] > 100_000  # heap + primary key of 3000 rows

    fk_tables = {t["name"]: t for t in entry(doc, "p4_fk")["tables"]}
    assert fk_tables["customers"]["estimated_rows"] == 50

    new = {t["name"]: t for t in entry(doc, "p7_new_table")["tables"]}
    assert new["shipments"] == {
        "name": "shipments",
        "exists": False,
        "size_bytes": None,
        "estimated_rows": None,
    }
    assert new["orders"]["exists"] is True
    assert "alembic_version" not in new

    # Nothing was changed, and no transaction was left open on the target.
    assert build(at_base)["current"] == "p1_base"


def test_a_locked_table_leaves_its_size_unknown_instead_of_waiting(at_base: Target) -> None:
    target = make_target(at_base.url.database or "", at_base.alembic_ini, lock_timeout_ms=200)
    holder = psycopg2.connect(db_url(at_base.url.database or ""))
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        (orders,) = entry(build(target, to="p2_index"), "p2_index")["tables"]
        # It gave up at its lock_timeout (200 ms) instead of queueing behind the holder for as
        # long as it holds (the whole test): a bound far below that, far above 200 ms.
        assert time.monotonic() - started < 5
        # ... and left no session of its own holding a transaction open.
        idle = query(
            at_base.url.database or "",
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'runbook%' AND state LIKE 'idle in transaction%'",
        )
        assert idle == [(0,)]
    finally:
        holder.rollback()
        holder.close()
    assert orders == {
        "name": "orders",
        "exists": True,
        "size_bytes": None,
        "estimated_rows": 3000,
    }


def test_a_table_never_analyzed_has_no_row_estimate(databases: Databases, tmp_path: Path) -> None:
    touch = Rev("p2_touch", "op.execute('ALTER TABLE empty_never_analyzed ADD COLUMN c text')")
    dbname = databases.create()
    target = make_target(dbname, write_project(tmp_path / "proj", [REVISIONS[0], touch]))
    project = Project(target)
    try:
        project.upgrade_one(project.revision("p1_base"))
    finally:
        project.close()
    (table,) = entry(build(target), "p2_touch")["tables"]
    assert table["exists"] is True and table["estimated_rows"] is None
    assert table["size_bytes"] == 0


def test_plan_up_to_a_revision_and_the_statement_timeout_rule(
    databases: Databases, tmp_path: Path
) -> None:
    dbname = databases.create()
    ini = write_project(tmp_path / "proj", REVISIONS)
    plain = build(make_target(dbname, ini), to="p3_not_null")
    assert plain["current"] is None and plain["to"] == "p3_not_null"
    assert [e["id"] for e in plain["revisions"]] == ["p1_base", "p2_index", "p3_not_null"]
    assert "require-statement-timeout" in rules(entry(plain, "p2_index"))
    # From base, Alembic renders CREATE TABLE alembic_version: never linted, never a table.
    first = entry(plain, "p1_base")
    assert "alembic_version" in first["sql"]
    assert [t["name"] for t in first["tables"]] == [
        "customers",
        "orders",
        "empty_never_analyzed",
    ]
    assert not [f for f in first["lint"] if "alembic_version" in f["statement"]]

    timed = build(make_target(dbname, ini, statement_timeout_ms=60_000), to="p3_not_null")
    assert "require-statement-timeout" not in rules(entry(timed, "p2_index"))


def alembic(dbname: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), *args],
        cwd=REPO,
        env={"DATABASE_URL": db_url(dbname), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def test_reference_history_plan(databases: Databases, tmp_path: Path) -> None:
    dbname = databases.create()
    done = alembic(dbname, "upgrade", "w5x6y7z8a9b0")
    assert done.returncode == 0, done.stderr
    doc = build(make_target(dbname, REPO / "alembic.ini"))
    assert doc["current"] == "w5x6y7z8a9b0"
    assert [e["id"] for e in doc["revisions"]][:2] == ["w5x6y7z8a9b0", "x6y7z8a9b0c1"]
    assert all(e["render_error"] is None for e in doc["revisions"][1:])

    enum = entry(doc, "x6y7z8a9b0c1")
    assert enum["outside_transaction"] is True
    assert enum["irreversible"] == "PostgreSQL cannot remove an ENUM value; restore from backup"
    assert finding(enum, "ban-add-enum-value")["statement"] == (
        "ALTER TYPE calendar_event_type ADD VALUE IF NOT EXISTS 'next_plan_start_date'"
    )
    assert [t["name"] for t in enum["tables"]] == ["calendar_events"]

    # The backfill revision's inline loop is plain Alembic's: runbook runs its declared
    # backfill instead, so the SQL shown has no loop and the backfill's table is listed.
    backfill = entry(doc, "d2e3f4g5h6i7")
    assert backfill["outside_transaction"] is False and "DO $$" not in backfill["sql"]
    assert [t["name"] for t in backfill["tables"]] == ["large_table"]
    assert [b["table"] for b in backfill["backfills"]] == ["large_table"]
    assert entry(doc, "e3f4g5h6i7j8")["requires_backfills"] == ["d2e3f4g5h6i7"]

    push = {t["name"]: t for t in entry(doc, "z8a9b0c1d2e3")["tables"]}
    assert push["push_subscriptions"]["exists"] is False and push["staffs"]["exists"] is True
    assert entry(doc, "c1d2e3f4g5h6")["outside_transaction"] is False
