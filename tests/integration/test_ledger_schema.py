"""The ledger's migrations (jobs/ledger/migrations/) add up to the schema its code expects: on
a fresh database every named query of jobs/ledger/queries/ prepares and plans, every column
the ledger's dataclasses read exists, and a ledger upgraded from an older version ends up the
same as a fresh one."""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Collection, Iterator
from typing import Any

import psycopg2
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from jobs.config import normalize_url
from jobs.ledger import schema, sql
from jobs.ledger.backfills import BACKFILL_FIELDS, Backfill, BackfillBatch, Slice
from jobs.ledger.backups import Backup
from jobs.ledger.records import SLICE_ESTIMATE_FIELDS
from jobs.ledger.runs import Run, Step
from tests.integration.conftest import admin_exec, db_url, schema_dump

pytestmark = pytest.mark.integration

# SQLAlchemy text()'s bind parameter: ":name", not "::" nor "\:".
BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")

# What the callers put in each {fragment} (jobs/ledger/slices.py open_batch, record_batch).
FRAGMENT_SAMPLES = {
    "columns": "set_config(:bf_name_0, :bf_value_0, true) AS bf_col_0, (SELECT 1) AS bf_col_1, ",
    "blocked": "(SELECT count(*) FROM pg_stat_activity)",
}

# The binds nothing around them types (a CASE of two binds): the server would take them for
# text, where psycopg2 sends the caller's Python ints as integer literals. The others are
# left for the server to infer ("unknown").
BIND_TYPES = {"shrunk": "integer", "next": "integer"}

# Statements PREPARE takes; the others (CREATE ... IF NOT EXISTS, LISTEN) are run instead,
# and BEGIN / COMMIT (riding along with a batch's statements) are left to the transaction.
PREPARABLE = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")

# What each dataclass reads: its table, and the fields that are not columns of it.
DATACLASS_TABLES = [
    (Run, "runs", {"steps"}),
    (Step, "steps", set()),
    (Backup, "backups", set()),
    (Backfill, "backfills", {"rows_done", "throttled_ms", "skipped"}),  # summed over slices
    (Slice, "backfill_slices", set()),
    (BackfillBatch, "backfill_batches", set()),
]


def field_names(cls: Any, leave_out: Collection[str] = ()) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in leave_out]


# The result columns of the queries read into a dataclass.
READ_INTO = {
    "get_run": field_names(Run, {"steps"}),
    "list_runs": field_names(Run, {"steps"}),
    "run_steps": field_names(Step),
    "get_backup": field_names(Backup),
    "list_backups": field_names(Backup),
    "get_backfill": field_names(Backfill),
    "list_backfills": field_names(Backfill),
    "read_backfill": sorted(BACKFILL_FIELDS),
    "lock_backfill_for_state": sorted(BACKFILL_FIELDS),
    "list_slices": field_names(Slice),
    # The walk's slice reads leave out the marks only progress reads.
    "lock_slice": field_names(Slice, SLICE_ESTIMATE_FIELDS),
    "list_batches": field_names(BackfillBatch),
    "open_batch": ["bf_col_0", "bf_col_1"]
    + [f"s_{name}" for name in field_names(Slice, SLICE_ESTIMATE_FIELDS)]
    + sorted(BACKFILL_FIELDS),
}


def ensured(dbname: str) -> None:
    engine = create_engine(normalize_url(db_url(dbname)).sqlalchemy_url(), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            schema.ensure(conn)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def ledger(services: None) -> Iterator[str]:
    """A fresh database holding only the ledger, as ensure() creates it."""
    name = f"rb_ledger_schema_{uuid.uuid4().hex[:8]}"
    admin_exec(f"CREATE DATABASE {name}")
    try:
        ensured(name)
        yield name
    finally:
        admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def cursor(ledger: str) -> Iterator[Any]:
    """A cursor in a transaction that is rolled back."""
    conn = psycopg2.connect(db_url(ledger))
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.rollback()
        conn.close()


def statements(name: str) -> list[str]:
    """The statements of a named query, its fragments filled as its caller fills them."""
    body = sql.query_text(name).format(**FRAGMENT_SAMPLES)
    return [s.strip() for s in body.split(";") if s.strip() not in ("", "BEGIN", "COMMIT")]


def prepare(cur: Any, statement: str, label: str) -> int:
    """PREPARE the statement as ``label``, its binds numbered; how many binds it has."""
    numbers: dict[str, int] = {}

    def numbered(match: re.Match[str]) -> str:
        return f"${numbers.setdefault(match.group(1), len(numbers) + 1)}"

    body = BIND.sub(numbered, statement)
    types = ", ".join(BIND_TYPES.get(bind, "unknown") for bind in numbers)
    cur.execute(f"PREPARE {label}" + (f" ({types})" if types else "") + f" AS {body}")
    return len(numbers)


@pytest.mark.parametrize("name", sorted(sql.all_queries()))
def test_every_named_query_prepares_and_plans_against_the_migrated_ledger(
    cursor: Any, name: str
) -> None:
    for number, statement in enumerate(statements(name)):
        if not statement.upper().startswith(PREPARABLE):
            cursor.execute(statement)
            continue
        label = f"q_{name}_{number}"
        nulls = ", ".join(["NULL"] * prepare(cursor, statement, label))
        # EXPLAIN plans with the parameters typed as PREPARE inferred them, runs nothing.
        cursor.execute(f"EXPLAIN EXECUTE {label}" + (f"({nulls})" if nulls else ""))
        assert cursor.fetchall(), name


@pytest.mark.parametrize("name", sorted(READ_INTO))
def test_the_queries_read_into_dataclasses_return_their_fields(cursor: Any, name: str) -> None:
    (statement,) = statements(name)
    nulls = ", ".join(["NULL"] * prepare(cursor, statement, "read"))
    cursor.execute("EXECUTE read" + (f"({nulls})" if nulls else ""))
    assert sorted(c.name for c in cursor.description) == sorted(READ_INTO[name])


def test_a_started_step_returns_a_step() -> None:
    returning = sql.query_text("start_step").rsplit("RETURNING", 1)[1]
    assert [c.strip() for c in returning.split(",")] == field_names(Step)


@pytest.mark.parametrize("cls, table, leave_out", DATACLASS_TABLES)
def test_every_column_a_dataclass_reads_exists(
    cursor: Any, cls: Any, table: str, leave_out: set[str]
) -> None:
    cursor.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s",
        (schema.SCHEMA, table),
    )
    columns = {c for (c,) in cursor.fetchall()}
    assert set(field_names(cls, leave_out)) - columns == set()


def test_a_ledger_at_the_last_version_is_left_as_it_is(ledger: str) -> None:
    before = schema_dump(ledger, with_ledger=True)
    ensured(ledger)
    assert schema_dump(ledger, with_ledger=True) == before
    conn = psycopg2.connect(db_url(ledger))
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT version FROM {schema.SCHEMA}.ledger_version ORDER BY version")
            versions = [v for (v,) in cur.fetchall()]
    finally:
        conn.close()
    assert versions == list(range(1, len(schema.migrations()) + 1))


def test_a_ledger_from_before_slices_is_upgraded_to_the_fresh_schema_keeping_its_cursor(
    ledger: str,
) -> None:
    """Version 3 (one cursor per backfill) as an older runbook left it, with a backfill
    half done: the upgrade moves its cursor onto slice 0 and ends at a fresh ledger's schema."""
    name = f"rb_ledger_v3_{uuid.uuid4().hex[:8]}"
    admin_exec(f"CREATE DATABASE {name}")
    try:
        engine = create_engine(normalize_url(db_url(name)).sqlalchemy_url(), poolclass=NullPool)
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema.SCHEMA}"))
            conn.execute(
                text(f"CREATE TABLE {schema.SCHEMA}.ledger_version (version integer NOT NULL)")
            )
            for number, ddl in enumerate(schema.migrations()[:3], start=1):
                conn.execute(text(ddl))
                conn.execute(text(f"INSERT INTO {schema.SCHEMA}.ledger_version VALUES ({number})"))
            conn.execute(
                text(
                    f"INSERT INTO {schema.SCHEMA}.backfills (id, target, table_name, key_column, "
                    "key_type, set_sql, state, generation, cursor, upper_key, batch_size, "
                    "min_batch, max_batch, target_batch_ms, sleep_ms, lock_timeout_ms, "
                    "statement_timeout_ms, rows_done) VALUES ('b1', 't', 'items', 'id', "
                    "'bigint', 'x = 1', 'paused', 4, '500', '1000', 100, 10, 1000, 200, 0, "
                    "1000, 10000, 500)"
                )
            )
        engine.dispose()
        ensured(name)
        assert schema_dump(name, with_ledger=True) == schema_dump(ledger, with_ledger=True)
        conn = psycopg2.connect(db_url(name))
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT slice, cursor, generation, state, rows_done "
                    f"FROM {schema.SCHEMA}.backfill_slices WHERE backfill_id = 'b1'"
                )
                assert cur.fetchall() == [(0, "500", 4, "active", 500)]
        finally:
            conn.close()
    finally:
        admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_status_reads_a_ledger_an_earlier_runbook_made_by_upgrading_it(tmp_path: Any) -> None:
    """A ledger one migration behind (as the runbook before the last migration left it), with a
    run and a backfill: the installed `runbook status` of each answers (its psycopg2 read
    finds a column missing, the ledger is upgraded as any write would, the read goes again)."""
    from tests.integration.conftest import runbook_cli

    name = f"rb_ledger_old_{uuid.uuid4().hex[:8]}"
    admin_exec(f"CREATE DATABASE {name}")
    try:
        engine = create_engine(normalize_url(db_url(name)).sqlalchemy_url(), poolclass=NullPool)
        behind = len(schema.migrations()) - 1
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema.SCHEMA}"))
            conn.execute(
                text(f"CREATE TABLE {schema.SCHEMA}.ledger_version (version integer NOT NULL)")
            )
            for number, ddl in enumerate(schema.migrations()[:behind], start=1):
                conn.execute(text(ddl))
                conn.execute(text(f"INSERT INTO {schema.SCHEMA}.ledger_version VALUES ({number})"))
                if number == 3:  # a backfill half done, as version 3 held it
                    conn.execute(
                        text(
                            f"INSERT INTO {schema.SCHEMA}.backfills (id, target, table_name, "
                            "key_column, key_type, set_sql, state, generation, cursor, "
                            "upper_key, batch_size, min_batch, max_batch, target_batch_ms, "
                            "sleep_ms, lock_timeout_ms, statement_timeout_ms, rows_done) VALUES "
                            "('fedcba9876543210', 'old', 'items', 'id', 'bigint', 'x = 1', "
                            "'paused', 4, '500', '1000', 100, 10, 1000, 200, 0, 1000, 10000, 500)"
                        )
                    )
            conn.execute(
                text(
                    f"INSERT INTO {schema.SCHEMA}.runs (id, target, kind, state, to_revision) "
                    "VALUES ('0123456789abcdef', 'old', 'apply', 'succeeded', 'head')"
                )
            )
        engine.dispose()
        config = tmp_path / "runbook.toml"
        config.write_text(f'[targets.old]\nurl = "{db_url(name)}"\n')
        env = {"RUNBOOK_CONFIG": str(config)}
        done = runbook_cli("status", "0123456789abcdef", "--json", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert '"succeeded"' in done.stdout and "internal error" not in done.stderr
        done = runbook_cli("status", "fedcba9876543210", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("backfill fedcba9876543210 paused: 500 "), done.stdout
        conn = psycopg2.connect(db_url(name))
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT max(version) FROM {schema.SCHEMA}.ledger_version")
                assert cur.fetchone() == (len(schema.migrations()),)
        finally:
            conn.close()
    finally:
        admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
