"""The reference Alembic project (alembic.ini + migrations/) against a real PostgreSQL.

Self-contained: every test creates and drops its own database. The history is driven with
the plain ``alembic`` CLI, exactly as a user without runbook would, plus one in-process test
of the connection hand-over that runbook relies on.
"""

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from psycopg2.extensions import connection as PgConnection

from tests.integration.conftest import missing

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

HISTORY = [
    "w5x6y7z8a9b0",
    "x6y7z8a9b0c1",
    "y7z8a9b0c1d2",
    "z8a9b0c1d2e3",
    "a9b0c1d2e3f4",
    "b0c1d2e3f4g5",
    "c1d2e3f4g5h6",
    "d2e3f4g5h6i7",
    "e3f4g5h6i7j8",
]
INITIAL, ENUM_REV, HEAD = HISTORY[0], HISTORY[1], HISTORY[-1]
LARGE_ROWS = 2500  # 3 batches of 1000, the last one partial
STAFFS = 4  # rows seed() puts in staffs


def _load(path: Path, name: str) -> ModuleType:
    # By path: migrations/ is an Alembic directory, not an installed package.
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seed = _load(REPO / "migrations" / "seed.py", "_reference_seed").seed


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(Config(str(REPO / "alembic.ini")))


@pytest.fixture(scope="module")
def admin() -> Iterator[PgConnection]:
    try:
        conn = psycopg2.connect(ADMIN_URL, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        missing(f"PostgreSQL unreachable at {ADMIN_URL}: {exc}")
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def database(admin: PgConnection) -> Iterator[str]:
    """A fresh, empty database; its plain postgresql:// URL."""
    name = f"rb_ref_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(database: str) -> Iterator[PgConnection]:
    """An autocommit psycopg2 connection to the fresh database."""
    conn = psycopg2.connect(database)
    conn.autocommit = True
    yield conn
    conn.close()


def alembic(url: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The plain alembic CLI, from the repository root, with DATABASE_URL as users set it."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if url is not None:
        env["DATABASE_URL"] = url
    result = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and result.returncode != 0:
        pytest.fail(f"alembic {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def one(conn: PgConnection, sql: str, params: tuple[object, ...] | None = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    assert row is not None, sql
    return row[0]


def count(conn: PgConnection, table: str, where: str = "true") -> int:
    return int(one(conn, f"SELECT count(*) FROM {table} WHERE {where}"))


def current(conn: PgConnection) -> str:
    return str(one(conn, "SELECT version_num FROM alembic_version"))


def seed_initial(url: str) -> int:
    """Seed at the initial revision, with gaps in large_table's ids; the rows left."""
    conn = psycopg2.connect(url)
    try:
        with conn:  # commits
            seed(conn, large_rows=LARGE_ROWS)
            with conn.cursor() as cur:
                # Gaps, as real tables have: the keyset walk must not depend on dense ids.
                cur.execute("DELETE FROM large_table WHERE id % 7 = 0")
                cur.execute("SELECT count(*) FROM large_table")
                row = cur.fetchone()
        assert row is not None
        return int(row[0])
    finally:
        conn.close()


def fk_rule(conn: PgConnection, name: str) -> str:
    # confdeltype: c = CASCADE, n = SET NULL
    return str(one(conn, "SELECT confdeltype FROM pg_constraint WHERE conname = %s", (name,)))


def not_null(conn: PgConnection, table: str, column: str) -> bool:
    return bool(
        one(
            conn,
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s",
            (table, column),
        )
    )


def column_exists(conn: PgConnection, table: str, column: str) -> bool:
    return bool(
        one(
            conn,
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns "
            "WHERE table_name = %s AND column_name = %s)",
            (table, column),
        )
    )


def rolled_back(conn: PgConnection, check: Callable[[PgConnection], None]) -> None:
    """Run a behavioural check in a transaction that is always rolled back."""
    conn.autocommit = False
    try:
        check(conn)
    finally:
        conn.rollback()
        conn.autocommit = True


# --- history, no database ----------------------------------------------------------------


def test_history_is_the_runbooks_revisions_in_order() -> None:
    scripts = _scripts()
    assert [rev.revision for rev in reversed(list(scripts.walk_revisions()))] == HISTORY
    assert scripts.get_heads() == [HEAD]


def test_every_revision_declares_a_verify_and_only_the_enum_one_is_irreversible() -> None:
    scripts = _scripts()
    for revision in HISTORY:
        module = scripts.get_revision(revision).module
        assert isinstance(getattr(module, "verify", None), str), revision
        assert "select" in module.verify.lower(), revision
        assert hasattr(module, "irreversible") == (revision == ENUM_REV), revision
    assert "backup" in scripts.get_revision(ENUM_REV).module.irreversible


def test_offline_sql_renders_the_whole_history_without_a_database() -> None:
    result = alembic(None, "upgrade", "head", "--sql")
    sql = result.stdout
    for expected in [
        "CREATE TYPE calendar_event_type AS ENUM",
        "ALTER TYPE calendar_event_type ADD VALUE IF NOT EXISTS 'next_plan_start_date'",
        "SET event_type = 'next_plan_start_date'",
        "ON DELETE SET NULL NOT VALID",
        "VALIDATE CONSTRAINT audit_logs_staff_id_fkey",
        "CREATE TABLE push_subscriptions",
        "email_threshold_days",
        "ADD COLUMN new_column TEXT",
        "DO $$",
        "CHECK (new_column IS NOT NULL) NOT VALID",
        "ALTER COLUMN new_column SET NOT NULL",
        f"version_num='{HEAD}'",
    ]:
        assert expected in sql, expected
    assert " OFFSET " not in sql.upper()


# --- the plain CLI against a database ----------------------------------------------------


def test_upgrade_verify_and_downgrade_with_the_plain_cli(database: str, db: PgConnection) -> None:
    scripts = _scripts()
    alembic(database, "upgrade", INITIAL)
    large_rows = seed_initial(database)
    assert count(db, "calendar_events", "event_type = 'monitoring_deadline'") == STAFFS

    # One revision at a time, each verify true right after its upgrade (runbook's contract).
    assert one(db, scripts.get_revision(INITIAL).module.verify) is True
    for revision in HISTORY[1:]:
        alembic(database, "upgrade", revision)
        assert current(db) == revision
        assert one(db, scripts.get_revision(revision).module.verify) is True, revision

    # §5.2: the enum value exists and every monitoring deadline moved to it.
    labels = one(
        db,
        "SELECT array_agg(enumlabel::text ORDER BY enumsortorder) FROM pg_enum "
        "WHERE enumtypid = 'calendar_event_type'::regtype",
    )
    assert labels == ["renewal_deadline", "monitoring_deadline", "custom", "next_plan_start_date"]
    assert count(db, "calendar_events", "event_type::text = 'monitoring_deadline'") == 0
    assert count(db, "calendar_events", "event_type = 'next_plan_start_date'") == STAFFS

    # §7.2: staff_id nullable, and deleting a staff keeps their audit logs.
    assert not not_null(db, "audit_logs", "staff_id")
    assert fk_rule(db, "audit_logs_staff_id_fkey") == "n"

    def staff_delete_keeps_audit_logs(conn: PgConnection) -> None:
        staff_id = one(conn, "SELECT staff_id FROM audit_logs LIMIT 1")
        logs = count(conn, "audit_logs", f"staff_id = '{staff_id}'")
        one(conn, "DELETE FROM staffs WHERE id = %s RETURNING id", (staff_id,))
        assert count(conn, "audit_logs", "staff_id IS NULL") == logs > 0

    rolled_back(db, staff_delete_keeps_audit_logs)

    # §7.1: push_subscriptions with its cascading FK, unique endpoint and index.
    assert fk_rule(db, "push_subscriptions_staff_id_fkey") == "c"
    assert count(db, "pg_constraint", "conname = 'push_subscriptions_endpoint_key'") == 1
    assert one(db, "SELECT to_regclass('idx_push_subscriptions_staff_id') IS NOT NULL") is True

    def endpoint_is_unique(conn: PgConnection) -> None:
        insert = (
            "INSERT INTO push_subscriptions (staff_id, endpoint, p256dh_key, auth_key) "
            "SELECT id, 'https://push.example/1', 'k', 'a' FROM staffs LIMIT 1"
        )
        with conn.cursor() as cur:
            cur.execute(insert)
            with pytest.raises(psycopg2.errors.UniqueViolation):
                cur.execute(insert)

    rolled_back(db, endpoint_is_unique)

    # §7.3: thresholds in every staff's preferences and in the default for new staffs.
    kept_and_extended = (
        "(notification_preferences->>'email_threshold_days')::int = 30 "
        "AND (notification_preferences->>'push_threshold_days')::int = 10 "
        "AND (notification_preferences->>'in_app_notification')::boolean"
    )
    assert count(db, "staffs", kept_and_extended) == STAFFS

    def default_has_thresholds(conn: PgConnection) -> None:
        prefs = one(
            conn,
            "INSERT INTO staffs (name, email) VALUES ('New', 'new@example.com') "
            "RETURNING notification_preferences",
        )
        assert prefs == {
            "in_app_notification": True,
            "email_notification": True,
            "system_notification": False,
            "email_threshold_days": 30,
            "push_threshold_days": 10,
        }

    rolled_back(db, default_has_thresholds)

    # §6.4: every row backfilled, the column NOT NULL, the helper check constraint gone.
    assert not_null(db, "large_table", "new_column")
    assert count(db, "large_table", "new_column = 'default_value'") == large_rows
    assert count(db, "pg_constraint", "conname = 'large_table_new_column_not_null'") == 0

    # The revisions add up to migrations/models.py (no drift).
    alembic(database, "check")

    # Downgrade down to the enum revision: every step is reversible, data kept where it can be.
    alembic(database, "downgrade", ENUM_REV)
    assert current(db) == ENUM_REV
    assert one(db, "SELECT to_regclass('push_subscriptions') IS NULL") is True
    assert not column_exists(db, "staffs", "notification_preferences")
    assert not column_exists(db, "large_table", "new_column")
    assert not_null(db, "audit_logs", "staff_id")
    assert fk_rule(db, "audit_logs_staff_id_fkey") == "c"
    assert count(db, "audit_logs") == 2 * STAFFS
    assert count(db, "large_table") == large_rows

    # The enum revision cannot be downgraded: it says so, and nothing changes.
    result = alembic(database, "downgrade", INITIAL, check=False)
    assert result.returncode != 0
    assert "NotImplementedError" in result.stderr
    assert "Cannot remove ENUM value 'next_plan_start_date'" in result.stderr
    assert current(db) == ENUM_REV


def test_nullable_staff_id_downgrade_refuses_to_delete_audit_history(
    database: str, db: PgConnection
) -> None:
    alembic(database, "upgrade", INITIAL)
    seed_initial(database)
    alembic(database, "upgrade", "y7z8a9b0c1d2")
    with db.cursor() as cur:
        cur.execute("DELETE FROM staffs WHERE email = 'ken.tanaka@example.com'")
    orphaned = count(db, "audit_logs", "staff_id IS NULL")
    assert orphaned == 2

    result = alembic(database, "downgrade", ENUM_REV, check=False)
    assert result.returncode != 0
    assert re.search(r"2 audit log row\(s\) have staff_id NULL", result.stderr), result.stderr
    assert current(db) == "y7z8a9b0c1d2"
    assert count(db, "audit_logs", "staff_id IS NULL") == orphaned


def test_offline_sql_applies_with_psql(database: str, db: PgConnection) -> None:
    psql = shutil.which("psql")
    if psql is None:
        missing("psql not installed")

    def apply(revisions: str) -> None:
        sql = alembic(None, "upgrade", revisions, "--sql").stdout
        subprocess.run(
            [psql, "-q", "-v", "ON_ERROR_STOP=1", "-d", database],
            input=sql,
            text=True,
            capture_output=True,
            check=True,
            timeout=120,
        )

    apply(INITIAL)
    large_rows = seed_initial(database)
    apply(f"{INITIAL}:head")  # the DO-block backfill commits per batch outside BEGIN/COMMIT
    assert current(db) == HEAD
    assert not_null(db, "large_table", "new_column")
    assert count(db, "large_table", "new_column = 'default_value'") == large_rows


def test_env_uses_a_connection_handed_over_by_runbook(database: str) -> None:
    """runbook's way in: its own connection, outside a transaction, its own session settings."""
    engine = sa.create_engine(database.replace("postgresql://", "postgresql+psycopg2://"))
    app_logger = logging.getLogger("runbook.test.app")
    root_handlers = list(logging.getLogger().handlers)
    config = Config(str(REPO / "alembic.ini"))
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET lock_timeout = '1500ms'")
            conn.commit()  # hand it over outside a transaction, as runbook does
            config.attributes["connection"] = conn

            command.upgrade(config, INITIAL)
            seed(conn, large_rows=LARGE_ROWS)
            conn.commit()
            command.upgrade(config, "head")  # autocommit blocks included

            assert not conn.in_transaction()
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "1500ms"
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == HEAD
            nulls = "SELECT count(*) FROM large_table WHERE new_column IS NULL"
            assert conn.exec_driver_sql(nulls).scalar() == 0
            conn.rollback()
    finally:
        engine.dispose()
    # env.py left the host's logging alone.
    assert not app_logger.disabled
    assert logging.getLogger().handlers == root_handlers
