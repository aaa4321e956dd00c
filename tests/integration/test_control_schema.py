"""The control database's migrations (jobs/fleet/migrations/) add up to what its code expects:
on a fresh database every named query of jobs/fleet/queries.sql prepares and plans, and the
records it reads into have exactly the tables' columns."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from jobs.config import normalize_url
from jobs.fleet import store
from tests.integration.conftest import admin_exec, db_url
from tests.integration.test_ledger_schema import BIND

pytestmark = pytest.mark.integration

# Binds that only a CASE or a comparison with another bind would type.
BIND_TYPES = {"settled": "boolean", "forward": "boolean", "from_known": "boolean"}


@pytest.fixture(scope="module")
def control(services: None) -> Iterator[str]:
    name = f"rb_control_schema_{uuid.uuid4().hex[:8]}"
    admin_exec(f"CREATE DATABASE {name}")
    engine = create_engine(normalize_url(db_url(name)).sqlalchemy_url(), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            store.ensure(conn)
            store.ensure(conn)  # a second time changes nothing
            assert store.exists(conn)
        yield name
    finally:
        engine.dispose()
        admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def cursor(control: str) -> Iterator[Any]:
    conn = psycopg2.connect(db_url(control))
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.rollback()
        conn.close()


@pytest.mark.parametrize("name", sorted(store._queries()))
def test_every_named_query_prepares_and_plans(cursor: Any, name: str) -> None:
    numbers: dict[str, int] = {}
    body = BIND.sub(
        lambda m: f"${numbers.setdefault(m.group(1), len(numbers) + 1)}", store._queries()[name]
    )
    if not body.upper().startswith(("SELECT", "INSERT", "UPDATE", "DELETE")):
        cursor.execute(body.replace("$1", "1"))
        return
    types = ", ".join(BIND_TYPES.get(bind, "unknown") for bind in numbers)
    cursor.execute("PREPARE q" + (f" ({types})" if types else "") + f" AS {body}")
    nulls = ", ".join(["NULL"] * len(numbers))
    cursor.execute("EXPLAIN EXECUTE q" + (f"({nulls})" if nulls else ""))
    assert cursor.fetchall(), name


@pytest.mark.parametrize(
    ("cls", "table"), [(store.Rollout, "rollouts"), (store.MemberRow, "members")]
)
def test_the_records_read_every_column(cursor: Any, cls: Any, table: str) -> None:
    cursor.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'runbook_control' AND table_name = %s",
        (table,),
    )
    assert sorted(r[0] for r in cursor.fetchall()) == sorted(
        f.name for f in dataclasses.fields(cls)
    )


def test_a_halt_comes_to_rest_only_when_its_members_in_flight_have_ended(control: str) -> None:
    """A watcher (`rollout --wait`) ends at settled_at: a rollout halted with members still
    running must not show it until they ended (jobs/fleet/advance.py check_budget, settle)."""
    from jobs.fleet import advance

    engine = create_engine(normalize_url(db_url(control)).sqlalchemy_url(), poolclass=NullPool)
    rollout_id = f"r{uuid.uuid4().hex[:15]}"
    try:
        with engine.connect() as conn:
            store.insert_rollout(
                conn,
                id=rollout_id,
                group_name="g",
                to_revision="f3",
                canary=0,
                parallel=3,
                max_failures=0,
                strict=False,
            )
            rows = [
                {"ordinal": i, "target": f"m{i}", "canary": False, "error": None} for i in range(3)
            ]
            store.insert_members(conn, rollout_id, rows)
            r = store.get_rollout(conn, rollout_id)
            assert r is not None
            store.set_state(conn, r, "running")
            first, second, third = store.page(conn, rollout_id, 10)
            store.end_member(conn, first, "failed", error="upgrade f3 failed")
            for m in (second, third):
                store.claim(conn, m, "running")
            advance.check_budget(conn, r, flying=2)
            halted = store.get_rollout(conn, rollout_id)
            assert halted is not None and halted.state == "halted"
            assert halted.settled_at is None  # two members still run
            for m in (second, third):
                store.end_member(conn, m, "succeeded")
            advance.settle(conn, r, flying=0)
            rested = store.get_rollout(conn, rollout_id)
            assert rested is not None and rested.settled_at is not None
    finally:
        engine.dispose()
