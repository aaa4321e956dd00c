"""What a backfill batch costs in round trips, and the ledger's word when a backfill stops.

bench/bench_backfill.py times these; here the counts themselves are held (no timing): a
batch after the first is three round trips (open: BEGIN, timeouts, slice lock, backfill row
and the bound; the UPDATE; close: blocked check, batch row, cursor and COMMIT), the driver
in autocommit meanwhile so that it sends no BEGIN or COMMIT of its own, and every
state change of a backfill is announced on the ledger's channel with the backfill's id,
which is what wakes `runbook backfill --wait` when it ends.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.pool import NullPool

from jobs.backfill import control, create, walk
from jobs.backfill.spec import Spec
from jobs.config import normalize_url
from jobs.ledger import notify, schema
from tests.integration.conftest import Databases, db_url, query

pytestmark = pytest.mark.integration

ROWS = 3000
BATCH = 100  # fixed (min = max): ROWS / BATCH batches


@pytest.fixture
def dbname(databases: Databases) -> str:
    name = databases.create()
    query(name, "CREATE TABLE items (id int PRIMARY KEY, counter int NOT NULL DEFAULT 0)")
    query(name, f"INSERT INTO items (id) SELECT i * 3 FROM generate_series(1, {ROWS}) i")
    query(name, "ANALYZE items")
    return name


@pytest.fixture
def engine(dbname: str) -> Iterator[Engine]:
    eng = create_engine(normalize_url(db_url(dbname)).sqlalchemy_url(), poolclass=NullPool)
    with eng.connect() as conn:
        schema.ensure(conn)
    yield eng
    eng.dispose()


def start(engine: Engine) -> tuple[str, int]:
    spec = Spec(
        table="items",
        key="id",
        set_sql="counter = counter + 1",
        batch_size=BATCH,
        min_batch=BATCH,
        max_batch=BATCH,
    )
    with engine.connect() as conn:
        backfill_id = create.create(conn, "test", spec)
        [(_, generation)] = control.start(conn, backfill_id)
    return backfill_id, generation


def test_a_batch_after_the_first_is_three_round_trips(engine: Engine, dbname: str) -> None:
    backfill_id, generation = start(engine)
    log: list[tuple[str, str]] = []  # ("execute", sql) or ("commit", "")
    driver_autocommit: list[bool] = []  # at each UPDATE: psycopg2 adds no BEGIN nor COMMIT

    @event.listens_for(engine, "before_cursor_execute")
    def executed(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        log.append(("execute", sql))
        if sql.startswith("UPDATE public.items"):
            driver_autocommit.append(cursor.connection.autocommit)

    @event.listens_for(engine, "commit")
    def committed(conn: Any) -> None:
        log.append(("commit", ""))

    assert walk.run_slice(engine, backfill_id, generation, budget_s=120) == "succeeded"
    assert query(dbname, "SELECT count(*) FILTER (WHERE counter <> 1) FROM items") == [(0,)]

    updates = [i for i, (kind, sql) in enumerate(log) if sql.startswith("UPDATE public.items")]
    assert len(updates) == ROWS // BATCH
    assert driver_autocommit == [True] * len(updates)
    for before, after in zip(updates, updates[1:], strict=False):
        between = [
            (kind, sql)
            for kind, sql in log[before + 1 : after]
            # The checks on a clock, not per batch: the database's signals once a second, the
            # replicas' view every throttle_check (250 ms: a walk that long under the other
            # test process's load has one between two batches).
            if "oldest_xact_s" not in sql and "replay_lag" not in sql
        ]
        # The "commit" is SQLAlchemy's bookkeeping: in autocommit the driver sends nothing.
        kinds = [kind for kind, _ in between]
        assert kinds == ["execute", "commit", "execute"], between
        close, opened = between[0][1], between[2][1]
        assert "INSERT INTO runbook.backfill_batches" in close and "pg_blocking_pids" in close
        assert "; COMMIT;" in close
        assert opened.startswith("BEGIN; ") and "FOR UPDATE OF s" in opened
        assert "OFFSET" in opened  # the bound rides along


def test_every_state_change_of_a_backfill_is_announced_with_its_id(
    engine: Engine, dbname: str
) -> None:
    backfill_id, generation = start(engine)  # enqueued -> running: announced too
    listener = psycopg2.connect(db_url(dbname))
    listener.autocommit = True
    try:
        with listener.cursor() as cur:
            cur.execute(f"LISTEN {notify.CHANNEL}")
        seen: list[str] = []

        def drain() -> list[str]:
            while select.select([listener], [], [], 0.5)[0]:
                listener.poll()
                seen.extend(n.payload for n in listener.notifies)
                listener.notifies.clear()
            return seen

        with engine.connect() as conn:
            assert control.pause(conn, backfill_id) == "pausing"
        assert drain().count(backfill_id) == 1
        assert walk.run_slice(engine, backfill_id, generation) == "paused"
        assert drain().count(backfill_id) == 2  # pausing -> paused
        with engine.connect() as conn:
            [(_, generation)] = control.start(conn, backfill_id, resume=True)
        assert drain().count(backfill_id) == 3
        assert walk.run_slice(engine, backfill_id, generation, budget_s=120) == "succeeded"
        assert drain().count(backfill_id) == 4
    finally:
        listener.close()


def test_dense_integer_keys_are_stepped_without_the_bounds_index_scan(
    databases: Databases,
) -> None:
    """Keys 1..1500, a gap of a million, 1,000,001..1,001,500: after the first batches the
    bound of a dense stretch is stepped by arithmetic (no OFFSET scan in the opening
    statement), the gap costs one stepped batch that updates nothing and one bound from the
    index, and every row is updated exactly once."""
    name = databases.create()
    query(name, "CREATE TABLE items (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0)")
    query(
        name,
        "INSERT INTO items (id) SELECT g FROM generate_series(1, 1500) g "
        "UNION ALL SELECT 1000000 + g FROM generate_series(1, 1500) g",
    )
    eng = create_engine(normalize_url(db_url(name)).sqlalchemy_url(), poolclass=NullPool)
    try:
        with eng.connect() as conn:
            schema.ensure(conn)
        backfill_id, generation = start(eng)
        opened: list[str] = []

        @event.listens_for(eng, "before_cursor_execute")
        def executed(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
            if sql.startswith("BEGIN; "):
                opened.append(sql)

        assert walk.run_slice(eng, backfill_id, generation, budget_s=120) == "succeeded"
    finally:
        eng.dispose()
    assert query(name, "SELECT count(*) FILTER (WHERE counter <> 1), count(*) FROM items") == [
        (0, 3000)
    ]
    batches = query(
        name,
        f"SELECT lo, hi, rows FROM runbook.backfill_batches WHERE backfill_id = '{backfill_id}'",
    )
    # 30 full batches, the one stepped into the gap, and none crawling across it.
    assert len(batches) == 31, batches
    assert sum(1 for _, _, rows in batches if rows == 0) == 1, batches
    with_offset = sum(1 for sql in opened if "OFFSET" in sql)
    assert with_offset <= 3, opened  # the second batch's, and the one after the gap
