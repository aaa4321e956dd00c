"""The backfill engine on real PostgreSQL: every row exactly once, whatever happens.

Each test has its own database. The table has ``counter int DEFAULT 0`` and the backfill's
SET is ``counter = counter + 1, new_column = 'v'``: a row updated twice would show 2.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from jobs import errors
from jobs import states as jobs_states
from jobs.backfill import control, dryrun, walk
from jobs.backfill import create as backfill_create
from jobs.backfill import keys as backfill_keys
from jobs.backfill.spec import Spec
from jobs.config import normalize_url
from jobs.errors import IllegalTransition
from jobs.ledger import backfills, records, schema, slices
from tests.integration.conftest import REPO, Databases, db_url, query

pytestmark = pytest.mark.integration

SET = "counter = counter + 1, new_column = 'v'"
TABLE = """
CREATE TABLE items (
    id {key_type} PRIMARY KEY,
    counter int NOT NULL DEFAULT 0,
    flag int NOT NULL DEFAULT 0,
    new_column text,
    CONSTRAINT at_most_one CHECK (counter + flag < 2)
);
"""
# A fixed batch size (min = max) makes the batch boundaries predictable.
FIXED = {"batch_size": 100, "min_batch": 100, "max_batch": 100}


@pytest.fixture
def dbname(databases: Databases) -> str:
    return databases.create()


@pytest.fixture
def engine(dbname: str) -> Iterator[Engine]:
    eng = create_engine(normalize_url(db_url(dbname)).sqlalchemy_url(), poolclass=NullPool)
    with eng.connect() as conn:
        schema.ensure(conn)
    yield eng
    eng.dispose()


def make_items(dbname: str, rows: int, key_type: str = "int", keys: str = "i") -> None:
    """The items table with ``rows`` rows whose key is ``keys`` (an expression of i)."""
    query(dbname, TABLE.format(key_type=key_type))
    if rows:
        query(dbname, f"INSERT INTO items (id) SELECT {keys} FROM generate_series(1, {rows}) i")
    query(dbname, "ANALYZE items")


def spec(**overrides: Any) -> Spec:
    return Spec(**{"table": "items", "key": "id", "set_sql": SET, **overrides})


def create(engine: Engine, s: Spec) -> str:
    with engine.connect() as conn:
        return backfill_create.create(conn, "test", s)


def claim(engine: Engine, backfill_id: str, *, resume: bool = False) -> int:
    """Start (or resume) a one-slice backfill; its slice's generation."""
    with engine.connect() as conn:
        [(number, generation)] = control.start(conn, backfill_id, resume=resume)
    assert number == 0
    return generation


def the_slice(engine: Engine, backfill_id: str) -> records.Slice:
    with engine.connect() as conn:
        [piece] = backfills.list_slices(conn, backfill_id)
    return piece


def get(engine: Engine, backfill_id: str) -> records.Backfill:
    with engine.connect() as conn:
        return control.get(conn, backfill_id)


def batches(engine: Engine, backfill_id: str) -> list[records.BackfillBatch]:
    with engine.connect() as conn:
        return backfills.list_batches(conn, backfill_id)


def run_to_end(engine: Engine, backfill_id: str, generation: int, **kwargs: Any) -> str:
    """Slices until the backfill stops; the outcome of the last one."""
    kwargs.setdefault("budget_s", 0.5)
    while (outcome := walk.run_slice(engine, backfill_id, generation, **kwargs)) == (walk.CONTINUE):
        pass
    return outcome


def counters(dbname: str) -> dict[int, int]:
    """How many rows have each counter value."""
    return dict(query(dbname, "SELECT counter, count(*) FROM items GROUP BY counter"))


def assert_every_row_once(dbname: str, engine: Engine, backfill_id: str, rows: int) -> None:
    """Succeeded; each row updated exactly once; the batches tile the key range."""
    bf = get(engine, backfill_id)
    assert bf.state == jobs_states.SUCCEEDED, bf.error
    assert counters(dbname) == {1: rows}
    assert query(dbname, "SELECT count(*) FROM items WHERE new_column = 'v'") == [(rows,)]
    done = batches(engine, backfill_id)
    assert sum(b.rows for b in done) == rows == bf.rows_done
    assert [b.lo for b in done] == [None] + [b.hi for b in done[:-1]]
    assert done[-1].hi == bf.upper_key == the_slice(engine, backfill_id).cursor


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- walking every key type ---------------------------------------------------------------------

KEYS = {
    "int with gaps": ("int", "i * 7 + (i % 3)"),
    "bigint": ("bigint", "5000000000 + i * 13"),
    "uuid": ("uuid", "gen_random_uuid()"),
    # md5 text sorts differently in Python and in the collation; mixed case on purpose.
    "text": ("text", "CASE WHEN i % 2 = 0 THEN upper(md5(i::text)) ELSE md5(i::text) END"),
    "varchar": ("varchar(40)", "'k-' || i"),
    # ICU orders case and punctuation unlike bytes: only PostgreSQL may compare keys.
    "text, ICU collation": (
        'text COLLATE "en-x-icu"',
        "CASE WHEN i % 3 = 0 THEN upper(md5(i::text)) ELSE '-' || md5(i::text) END",
    ),
}


@pytest.mark.parametrize("kind", list(KEYS))
def test_every_row_is_updated_exactly_once_for_each_key_type(
    kind: str, dbname: str, engine: Engine
) -> None:
    key_type, keys = KEYS[kind]
    make_items(dbname, 1500, key_type, keys)
    bf_id = create(engine, spec(batch_size=90, min_batch=20, max_batch=300))
    bf = get(engine, bf_id)
    assert (bf.state, bf.rows_total_estimate, bf.estimate_kind) == ("enqueued", 1500, "counted")
    assert (
        bf.upper_key
        == query(dbname, "SELECT CAST(i.id AS text) FROM items i ORDER BY i.id DESC LIMIT 1")[0][0]
    )

    assert run_to_end(engine, bf_id, claim(engine, bf_id)) == "succeeded"

    assert_every_row_once(dbname, engine, bf_id, 1500)
    assert len(batches(engine, bf_id)) > 5


def test_an_empty_table_succeeds_at_once(dbname: str, engine: Engine) -> None:
    make_items(dbname, 0)
    bf_id = create(engine, spec())
    bf = get(engine, bf_id)
    assert (bf.state, bf.rows_done, bf.upper_key, bf.rows_total_estimate) == (
        "succeeded",
        0,
        None,
        0,
    )
    assert bf.finished_at is not None and batches(engine, bf_id) == []
    with pytest.raises(IllegalTransition, match="is succeeded"):
        claim(engine, bf_id)


def test_a_predicate_the_set_leaves_true_still_ends(dbname: str, engine: Engine) -> None:
    make_items(dbname, 800)
    bf_id = create(engine, spec(where_sql="counter >= 0", batch_size=100, min_batch=50))
    assert run_to_end(engine, bf_id, claim(engine, bf_id)) == "succeeded"
    assert_every_row_once(dbname, engine, bf_id, 800)


def test_the_predicate_limits_the_rows_and_the_estimate(dbname: str, engine: Engine) -> None:
    make_items(dbname, 1000)
    query(dbname, "UPDATE items SET new_column = 'old' WHERE id % 4 = 0")
    bf_id = create(
        engine, spec(set_sql="new_column = 'x:y%z'", where_sql="new_column IS NULL", **FIXED)
    )
    assert (get(engine, bf_id).rows_total_estimate, get(engine, bf_id).estimate_kind) == (
        750,
        "counted",
    )
    assert run_to_end(engine, bf_id, claim(engine, bf_id)) == "succeeded"
    assert sorted(query(dbname, "SELECT new_column, count(*) FROM items GROUP BY 1")) == [
        ("old", 250),
        ("x:y%z", 750),
    ]
    assert get(engine, bf_id).rows_done == 750


# -- errors -------------------------------------------------------------------------------------


def test_a_permanent_error_stops_before_the_failing_range_and_resume_finishes(
    dbname: str, engine: Engine
) -> None:
    make_items(dbname, 3000)
    query(dbname, "UPDATE items SET flag = 1 WHERE id BETWEEN 1234 AND 1236")
    bf_id = create(engine, spec(**FIXED))

    assert run_to_end(engine, bf_id, claim(engine, bf_id)) == "errored"

    bf = get(engine, bf_id)
    assert bf.error_range == {"slice": 0, "lo": "1200", "hi": "1300"}
    assert the_slice(engine, bf_id).cursor == "1200"
    assert bf.error is not None and "CheckViolation" in bf.error and "\n" not in bf.error
    assert "(1200, 1300]" in bf.error
    # Nothing of the failing batch (nor after it) was updated; everything before it once.
    assert query(dbname, "SELECT min(id), max(id) FROM items WHERE counter = 1") == [(1, 1200)]
    assert counters(dbname) == {1: 1200, 0: 1800}
    # A start or a reconciler's takeover does not restart an errored backfill; resume does.
    with pytest.raises(IllegalTransition, match="is errored"):
        claim(engine, bf_id)

    query(dbname, "UPDATE items SET flag = 0")
    assert run_to_end(engine, bf_id, claim(engine, bf_id, resume=True)) == "succeeded"

    assert_every_row_once(dbname, engine, bf_id, 3000)
    bf = get(engine, bf_id)
    assert bf.error is None and bf.error_range is None


def hold_row_lock(dbname: str, key: int) -> psycopg2.extensions.connection:
    """A session holding a row lock on items ``key`` until it is closed."""
    conn = psycopg2.connect(db_url(dbname))
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM items WHERE id = %s FOR UPDATE", (key,))
    return conn


def test_a_lock_timeout_is_retried_until_the_lock_is_free(dbname: str, engine: Engine) -> None:
    make_items(dbname, 500)
    blocker = hold_row_lock(dbname, 5)
    bf_id = create(engine, spec(lock_timeout_ms=100, **FIXED))
    generation = claim(engine, bf_id)
    # Released 0.6 s after the walk starts (not after the lock was taken: creating and
    # claiming can take that long on a loaded machine, and the first attempt would pass).
    threading.Timer(0.6, blocker.close).start()

    outcome = run_to_end(engine, bf_id, generation, max_attempts=10, backoff_s=0.05)

    assert outcome == "succeeded"
    assert batches(engine, bf_id)[0].attempt > 1
    assert_every_row_once(dbname, engine, bf_id, 500)


def test_a_lock_never_released_errors_after_the_attempts(dbname: str, engine: Engine) -> None:
    make_items(dbname, 500)
    blocker = hold_row_lock(dbname, 150)
    try:
        bf_id = create(engine, spec(lock_timeout_ms=50, **FIXED))
        generation = claim(engine, bf_id)
        outcome = run_to_end(engine, bf_id, generation, max_attempts=3, backoff_s=0.01)
        bf = get(engine, bf_id)
        assert outcome == "errored" and bf.state == "errored"
        assert bf.error_range == {"slice": 0, "lo": "100", "hi": "200"}
        assert the_slice(engine, bf_id).cursor == "100"
        assert bf.error is not None and "after 3 attempts" in bf.error
        assert "LockNotAvailable" in bf.error
    finally:
        blocker.close()
    assert run_to_end(engine, bf_id, claim(engine, bf_id, resume=True)) == "succeeded"
    assert_every_row_once(dbname, engine, bf_id, 500)


def test_a_statement_timeout_halves_the_batch_and_retries(dbname: str, engine: Engine) -> None:
    make_items(dbname, 300)
    slow = SET.replace("counter + 1", "counter + 1 + 0 * (pg_sleep(0.002) IS NULL)::int")
    bf_id = create(
        engine,
        spec(
            set_sql=slow,
            batch_size=200,
            min_batch=10,
            max_batch=200,
            target_batch_ms=40,
            statement_timeout_ms=150,
        ),
    )

    outcome = run_to_end(engine, bf_id, claim(engine, bf_id), backoff_s=0.01)

    assert outcome == "succeeded"
    first = batches(engine, bf_id)[0]
    assert first.attempt >= 2 and first.batch_size <= 100  # 200 rows take ~400 ms > 150 ms
    assert_every_row_once(dbname, engine, bf_id, 300)


# -- concurrency, crashes, fencing --------------------------------------------------------------


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    """Start ``fn`` in a thread; its result (or exception) lands in the returned list."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(fn(*args, **kwargs))
        except BaseException as exc:  # surfaced by the test's assertions
            out.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, out


def test_a_zombie_generation_cannot_commit_a_batch(dbname: str, engine: Engine) -> None:
    make_items(dbname, 2000)
    bf_id = create(engine, spec(sleep_ms=20, **FIXED))
    old = claim(engine, bf_id)
    zombie, zombie_out = in_thread(walk.run_slice, engine, bf_id, old, budget_s=60)
    wait_for(lambda: len(batches(engine, bf_id)) >= 3)

    new = claim(engine, bf_id)  # a resume / reconciler takes over while the zombie still runs
    current, current_out = in_thread(run_to_end, engine, bf_id, new, budget_s=0.3)
    zombie.join(60)
    current.join(60)

    assert zombie_out == ["fenced"] and current_out == ["succeeded"]
    assert_every_row_once(dbname, engine, bf_id, 2000)
    done = batches(engine, bf_id)
    generations = [b.generation for b in done]
    # The zombie's batches all committed before the first batch of the new generation.
    assert generations == sorted(generations) and set(generations) == {old, new}
    assert max(counters(dbname)) == 1


def test_duplicate_workers_of_one_generation_never_apply_a_batch_twice(
    dbname: str, engine: Engine
) -> None:
    make_items(dbname, 3000)
    bf_id = create(engine, spec(batch_size=50, min_batch=50, max_batch=50))
    generation = claim(engine, bf_id)  # a redelivered message runs beside the original
    workers = [in_thread(run_to_end, engine, bf_id, generation, budget_s=0.2) for _ in range(3)]
    for thread, _ in workers:
        thread.join(120)

    # The one that finds the range walked settles the backfill; the others just stop.
    assert sorted(out[0] for _, out in workers) == ["stopped", "stopped", "succeeded"]
    assert_every_row_once(dbname, engine, bf_id, 3000)


def test_handoff_fences_a_redelivered_copy_of_the_finished_slice(
    dbname: str, engine: Engine
) -> None:
    make_items(dbname, 500)
    bf_id = create(engine, spec(**FIXED))
    generation = claim(engine, bf_id)
    assert walk.run_slice(engine, bf_id, generation, budget_s=0) == "continue"
    with engine.connect() as conn:
        nxt = slices.handoff(conn, bf_id, 0, generation)
        assert nxt == generation + 1
        assert slices.handoff(conn, bf_id, 0, generation) is None
    assert walk.run_slice(engine, bf_id, generation) == "fenced"
    assert run_to_end(engine, bf_id, nxt) == "succeeded"
    assert_every_row_once(dbname, engine, bf_id, 500)


def test_a_connection_killed_mid_batch_is_retried_on_a_new_one(dbname: str, engine: Engine) -> None:
    make_items(dbname, 500)
    slow = SET.replace(
        "counter + 1",
        "counter + 1 + 0 * (CASE WHEN id % 100 = 50 THEN pg_sleep(0.2) IS NULL ELSE false END)::int",
    )
    bf_id = create(engine, spec(set_sql=slow, target_batch_ms=10_000, **FIXED))
    generation = claim(engine, bf_id)
    killed: list[Any] = []

    def kill_one_update() -> None:
        deadline = time.monotonic() + 20
        while not killed and time.monotonic() < deadline:
            killed.extend(
                query(
                    dbname,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'UPDATE public.items%' "
                    "AND state = 'active'",
                )
            )
            time.sleep(0.02)

    killer, _ = in_thread(kill_one_update)
    outcome = run_to_end(engine, bf_id, generation, backoff_s=0.01)
    killer.join(30)

    assert killed == [(True,)] and outcome == "succeeded"
    assert max(b.attempt for b in batches(engine, bf_id)) == 2
    assert_every_row_once(dbname, engine, bf_id, 500)


SLICE = """
import sys
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool
from jobs.backfill import walk
from jobs.config import normalize_url
url, backfill_id, generation = sys.argv[1], sys.argv[2], int(sys.argv[3])
walk.run_slice(create_engine(normalize_url(url).sqlalchemy_url(), poolclass=NullPool), backfill_id,
               generation, budget_s=120)
"""


def test_a_worker_killed_mid_slice_loses_and_repeats_nothing(dbname: str, engine: Engine) -> None:
    make_items(dbname, 2000)
    # Each batch sleeps ~40 ms inside its UPDATE, so the kill most likely lands mid-batch.
    slow = SET.replace(
        "counter + 1",
        "counter + 1 + 0 * (CASE WHEN id % 100 = 50 THEN pg_sleep(0.04) IS NULL ELSE false END)::int",
    )
    bf_id = create(engine, spec(set_sql=slow, target_batch_ms=10_000, **FIXED))
    generation = claim(engine, bf_id)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLICE, db_url(dbname), bf_id, str(generation)], cwd=REPO
    )
    try:
        wait_for(lambda: len(batches(engine, bf_id)) >= 4)
        time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(batches(engine, bf_id))
    assert 4 <= killed_at < 20

    assert run_to_end(engine, bf_id, claim(engine, bf_id)) == "succeeded"

    assert_every_row_once(dbname, engine, bf_id, 2000)


# -- pause and cancel ---------------------------------------------------------------------------


def test_pause_takes_effect_before_the_next_batch_and_resume_finishes(
    dbname: str, engine: Engine
) -> None:
    make_items(dbname, 2000)
    bf_id = create(engine, spec(sleep_ms=20, **FIXED))
    worker, out = in_thread(walk.run_slice, engine, bf_id, claim(engine, bf_id), budget_s=60)
    wait_for(lambda: len(batches(engine, bf_id)) >= 2)

    with engine.connect() as conn:
        assert control.pause(conn, bf_id) == "pausing"
    # The pause does not wait for the batch in flight (its lock on the backfill row lets the
    # batch's record through): that one batch may commit after it, and no other.
    at_pause = len(batches(engine, bf_id))
    worker.join(30)

    assert out == ["paused"] and get(engine, bf_id).state == "paused"
    paused_at = len(batches(engine, bf_id))
    assert paused_at in {at_pause, at_pause + 1} and paused_at < 20
    with engine.connect() as conn:
        assert control.pause(conn, bf_id) == "paused"  # asking again changes nothing
    # A redelivered start does not undo the pause; the operator's resume does.
    with pytest.raises(IllegalTransition, match="is paused"):
        claim(engine, bf_id)
    assert run_to_end(engine, bf_id, claim(engine, bf_id, resume=True)) == "succeeded"
    assert_every_row_once(dbname, engine, bf_id, 2000)
    assert get(engine, bf_id).throttled_ms == 20 * len(batches(engine, bf_id))


def test_a_pause_asked_before_any_worker_parks_it_at_the_first_slice(
    dbname: str, engine: Engine
) -> None:
    make_items(dbname, 300)
    bf_id = create(engine, spec(**FIXED))
    with engine.connect() as conn:
        assert control.pause(conn, bf_id) == "pausing"
    generation = claim(engine, bf_id)  # the queued start task
    assert get(engine, bf_id).state == "pausing"
    assert walk.run_slice(engine, bf_id, generation) == "paused"
    assert batches(engine, bf_id) == [] and counters(dbname) == {0: 300}


def test_cancel_stops_the_batches_for_good(dbname: str, engine: Engine) -> None:
    make_items(dbname, 2000)
    bf_id = create(engine, spec(sleep_ms=20, **FIXED))
    worker, out = in_thread(walk.run_slice, engine, bf_id, claim(engine, bf_id), budget_s=60)
    wait_for(lambda: len(batches(engine, bf_id)) >= 2)

    with engine.connect() as conn:
        assert control.cancel(conn, bf_id) == "cancelling"
    asked_at = len(batches(engine, bf_id))
    worker.join(30)

    bf = get(engine, bf_id)
    assert out == ["cancelled"] and bf.state == "cancelled" and bf.finished_at is not None
    at_cancel = len(batches(engine, bf_id))
    assert at_cancel in {asked_at, asked_at + 1}  # the batch in flight, as in the pause test
    done = at_cancel * 100
    assert counters(dbname) == {1: done, 0: 2000 - done} and the_slice(engine, bf_id).cursor == str(
        done
    )
    with pytest.raises(IllegalTransition, match="is cancelled"):
        claim(engine, bf_id, resume=True)
    # A late copy of the slice's task finds it stopped and does nothing.
    assert walk.run_slice(engine, bf_id, the_slice(engine, bf_id).generation) == "stopped"
    assert len(batches(engine, bf_id)) == at_cancel


def test_cancel_without_a_worker_needs_none(dbname: str, engine: Engine) -> None:
    make_items(dbname, 300)
    bf_id = create(engine, spec(**FIXED))
    with engine.connect() as conn:
        assert control.cancel(conn, bf_id) == "cancelled"
        with pytest.raises(IllegalTransition, match="is cancelled"):
            control.pause(conn, bf_id)
    with pytest.raises(IllegalTransition):
        claim(engine, bf_id)


# -- adaptive batch size ------------------------------------------------------------------------


def test_the_batch_grows_on_fast_batches(dbname: str, engine: Engine) -> None:
    make_items(dbname, 6000)
    bf_id = create(engine, spec(batch_size=50, min_batch=10, max_batch=2000, target_batch_ms=500))
    assert run_to_end(engine, bf_id, claim(engine, bf_id), budget_s=5) == "succeeded"

    done = batches(engine, bf_id)
    sizes = [b.batch_size for b in done]
    for before, after in zip(done, done[1:], strict=False):
        if before.duration_ms < 400:  # well under the target: grow by exactly x1.2
            assert after.batch_size == min(2000, math.floor(before.batch_size * 1.2))
    assert sizes[0] == 50 and sizes[-1] > 500
    assert_every_row_once(dbname, engine, bf_id, 6000)


def test_the_batch_shrinks_at_once_on_a_slow_batch(dbname: str, engine: Engine) -> None:
    make_items(dbname, 400)
    slow = SET.replace("counter + 1", "counter + 1 + 0 * (pg_sleep(0.001) IS NULL)::int")
    bf_id = create(
        engine,
        spec(set_sql=slow, batch_size=200, min_batch=5, max_batch=1000, target_batch_ms=20),
    )
    assert run_to_end(engine, bf_id, claim(engine, bf_id), budget_s=5) == "succeeded"

    first, second = batches(engine, bf_id)[:2]
    assert first.batch_size == 200 and first.duration_ms >= 200  # 200 rows x 1 ms
    assert second.batch_size <= 200 * 20 / first.duration_ms + 1  # straight to the target
    assert_every_row_once(dbname, engine, bf_id, 400)


# -- refusing what cannot work ------------------------------------------------------------------

KEYLESS = """
CREATE TABLE dup (id int NOT NULL, name text);
CREATE TABLE composite (a int, b int, PRIMARY KEY (a, b));
CREATE TABLE nullable_unique (id int UNIQUE, code int PRIMARY KEY);
CREATE TABLE stamped (at timestamptz PRIMARY KEY, n int);
CREATE TABLE by_expression (email text NOT NULL, n int);
CREATE UNIQUE INDEX ON by_expression (lower(email));
CREATE TABLE partial (id int NOT NULL, n int);
CREATE UNIQUE INDEX ON partial (id) WHERE id > 0;
CREATE TABLE good (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, code uuid NOT NULL UNIQUE,
                   n int);
CREATE SCHEMA "Other";
CREATE TABLE "Other"."Odd Name" ("Key" text PRIMARY KEY, n int);
CREATE VIEW a_view AS SELECT 1 AS id;
"""


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        (
            "dup",
            "id",
            "column id of table public.dup is not unique (no unique index on it alone); "
            "table public.dup has no usable key (no primary key or unique NOT NULL column",
        ),
        ("composite", "a", "column a of table public.composite is not unique"),
        (
            "nullable_unique",
            "id",
            "allows NULL, so rows with a NULL key would be skipped; "
            "choose --key code or SET NOT NULL on it first",
        ),
        ("stamped", "at", "is of type timestamp with time zone; a key must be one of"),
        ("by_expression", "email", "not unique (no unique index on it alone)"),
        ("partial", "id", "not unique (no unique index on it alone)"),
        ("good", "n", "not unique (no unique index on it alone); choose --key id or code"),
        ("good", "nope", "table public.good has no column 'nope'; choose --key id or code"),
        ("missing", "id", "table missing does not exist"),
        ("a_view", "id", "public.a_view is not a table"),
    ],
)
def test_unusable_keys_are_refused_in_one_line(
    table: str, key: str, message: str, dbname: str, engine: Engine
) -> None:
    query(dbname, KEYLESS)
    with engine.connect() as conn, pytest.raises(errors.BackfillError) as caught:
        backfill_create.create(conn, "test", Spec(table, key, "n = 1"))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with engine.connect() as conn:
        assert backfills.list_backfills(conn) == []


def test_usable_keys_are_found(dbname: str, engine: Engine) -> None:
    query(dbname, KEYLESS)
    with engine.connect() as conn:
        assert backfill_keys.inspect_key(conn, "good", "id") == "bigint"
        assert backfill_keys.inspect_key(conn, "good", "code") == "uuid"
        assert backfill_keys.inspect_key(conn, '"Other"."Odd Name"', "Key") == "text"
        assert backfill_keys.candidate_keys(conn, "good") == ["id", "code"]
        assert backfill_keys.candidate_keys(conn, "composite") == []
    query(
        dbname, 'INSERT INTO "Other"."Odd Name" SELECT \'k\' || i, 0 FROM generate_series(1, 50) i'
    )
    bf_id = create(
        engine, Spec('"Other"."Odd Name"', "Key", "n = n + 1", batch_size=7, min_batch=7)
    )
    assert get(engine, bf_id).table_name == '"Other"."Odd Name"'
    assert run_to_end(engine, bf_id, claim(engine, bf_id)) == "succeeded"
    assert query(dbname, 'SELECT n, count(*) FROM "Other"."Odd Name" GROUP BY n') == [(1, 50)]


@pytest.mark.parametrize(
    ("set_sql", "where_sql", "message"),
    [
        ("counter = counter +", None, "is not valid SQL"),
        ("nope = 1", None, "does not work on public.items: UndefinedColumn"),
        ("counter = 'x'::date", None, "does not work on public.items"),
        ("counter = 1; DROP TABLE items", None, "no FROM, RETURNING, WITH or second statement"),
        ("counter = 1 FROM pg_class", None, "no FROM, RETURNING, WITH or second statement"),
        ("counter = 1 WHERE true", None, "no FROM, RETURNING, WITH or second statement"),
        ("counter = 1 RETURNING id", None, "no FROM, RETURNING, WITH or second statement"),
        ("counter = 1", "true) OR (true", "is not valid SQL"),
        ("counter = 1", "true; DELETE FROM items", "second statement"),
        ("id = id + 1, counter = 1", None, "the SET assigns the key id"),
        ("", None, "nothing to SET"),
    ],
)
def test_a_bad_set_or_where_is_refused_before_anything_runs(
    set_sql: str, where_sql: str | None, message: str, dbname: str, engine: Engine
) -> None:
    make_items(dbname, 10)
    with engine.connect() as conn, pytest.raises(errors.BadSpec, match=message) as caught:
        backfill_create.create(conn, "test", spec(set_sql=set_sql, where_sql=where_sql))
    assert "\n" not in str(caught.value)
    assert counters(dbname) == {0: 10}


def test_a_trailing_comment_cannot_unbound_a_batch(dbname: str, engine: Engine) -> None:
    make_items(dbname, 300)
    bf_id = create(engine, spec(set_sql=SET + " -- all of it", where_sql="true -- or not", **FIXED))
    generation = claim(engine, bf_id)
    assert walk.run_slice(engine, bf_id, generation, budget_s=0) == "continue"
    assert counters(dbname) == {1: 100, 0: 200}


def test_bad_batch_settings_are_refused(engine: Engine) -> None:
    for bad in (
        spec(batch_size=10, min_batch=100),
        spec(max_batch=500),
        spec(min_batch=0, batch_size=0),
        spec(sleep_ms=-1),
        spec(lock_timeout_ms=0),
    ):
        with engine.connect() as conn, pytest.raises(errors.BadSpec):
            backfill_create.create(conn, "test", bad)


def test_unknown_backfills_are_named(engine: Engine) -> None:
    with engine.connect() as conn:
        for call in (control.get, control.start, control.pause, control.cancel):
            with pytest.raises(errors.UnknownBackfill, match="unknown backfill 'nope'"):
                call(conn, "nope")


# -- parallel slices ----------------------------------------------------------------------------


def start_all(engine: Engine, backfill_id: str, *, resume: bool = False) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        return control.start(conn, backfill_id, resume=resume)


def slices_of(engine: Engine, backfill_id: str) -> list[records.Slice]:
    with engine.connect() as conn:
        return backfills.list_slices(conn, backfill_id)


@pytest.mark.parametrize("key_type,keys", [("int", "i * 7"), ("uuid", "gen_random_uuid()")])
def test_slices_split_the_key_range_and_run_side_by_side(
    dbname: str, engine: Engine, key_type: str, keys: str
) -> None:
    make_items(dbname, 6000, key_type, keys)
    bf_id = create(engine, spec(slices=3, batch_size=200))
    pieces = slices_of(engine, bf_id)
    assert len(pieces) == 3 and pieces[0].lower_key is None
    assert [p.lower_key for p in pieces[1:]] == [p.upper_key for p in pieces[:-1]]
    assert pieces[-1].upper_key == get(engine, bf_id).upper_key
    started = start_all(engine, bf_id)
    assert [n for n, _ in started] == [0, 1, 2]
    workers = [
        in_thread(run_to_end, engine, bf_id, g, slice_no=n, budget_s=0.3) for n, g in started
    ]
    for thread, _ in workers:
        thread.join(120)
    outcomes = sorted(out[0] for _, out in workers)
    assert outcomes == ["stopped", "stopped", "succeeded"]  # the last one done settles it
    bf = get(engine, bf_id)
    assert bf.state == "succeeded" and bf.rows_done == 6000 and counters(dbname) == {1: 6000}
    per_slice = [p.rows_done for p in slices_of(engine, bf_id)]
    assert sum(per_slice) == 6000 and min(per_slice) > 1000  # quantile bounds: balanced


def test_a_pause_waits_for_every_slice_and_resume_restarts_them_all(
    dbname: str, engine: Engine
) -> None:
    make_items(dbname, 4000)
    bf_id = create(engine, spec(slices=2, sleep_ms=20, **FIXED))
    started = start_all(engine, bf_id)
    workers = [
        in_thread(walk.run_slice, engine, bf_id, g, slice_no=n, budget_s=60) for n, g in started
    ]
    wait_for(lambda: len(batches(engine, bf_id)) >= 4)
    with engine.connect() as conn:
        assert control.pause(conn, bf_id) == "pausing"
    for thread, _ in workers:
        thread.join(30)
    assert sorted(out[0] for _, out in workers) == ["paused", "stopped"]
    assert get(engine, bf_id).state == "paused"
    assert {p.state for p in slices_of(engine, bf_id)} == {"stopped"}
    resumed = start_all(engine, bf_id, resume=True)
    assert [g for _, g in resumed] == [g + 1 for _, g in started]  # the old tasks are fenced
    for n, g in resumed:
        run_to_end(engine, bf_id, g, slice_no=n)
    assert get(engine, bf_id).state == "succeeded" and counters(dbname) == {1: 4000}


def test_one_slice_failing_stops_the_others_and_resume_finishes(
    dbname: str, engine: Engine
) -> None:
    make_items(dbname, 3000)
    query(dbname, "UPDATE items SET flag = 1 WHERE id = 2900")  # counter 1 breaks the check
    bf_id = create(engine, spec(slices=2, sleep_ms=10, **FIXED))
    started = start_all(engine, bf_id)
    workers = [in_thread(run_to_end, engine, bf_id, g, slice_no=n) for n, g in started]
    for thread, _ in workers:
        thread.join(60)
    bf = get(engine, bf_id)
    assert bf.state == "errored" and bf.error_range == {"slice": 1, "lo": "2800", "hi": "2900"}
    assert "at_most_one" in (bf.error or "")
    assert sorted(out[0] for _, out in workers) == ["errored", "stopped"]
    query(dbname, "UPDATE items SET flag = 0 WHERE id = 2900")
    for n, g in start_all(engine, bf_id, resume=True):
        run_to_end(engine, bf_id, g, slice_no=n)
    assert get(engine, bf_id).state == "succeeded" and counters(dbname) == {1: 3000}


def test_fewer_slices_than_asked_when_the_table_is_tiny(dbname: str, engine: Engine) -> None:
    make_items(dbname, 2)
    bf_id = create(engine, spec(slices=8))
    assert 1 <= len(slices_of(engine, bf_id)) <= 2
    for n, g in start_all(engine, bf_id):
        run_to_end(engine, bf_id, g, slice_no=n)
    assert get(engine, bf_id).state == "succeeded" and counters(dbname) == {1: 2}


# -- isolate -------------------------------------------------------------------------------------


def test_isolate_skips_exactly_the_offending_rows(dbname: str, engine: Engine) -> None:
    make_items(dbname, 1000)
    bad = [17, 18, 530, 999]
    query(dbname, f"UPDATE items SET flag = 1 WHERE id IN ({', '.join(map(str, bad))})")
    bf_id = create(engine, spec(on_error="isolate", **FIXED))
    assert run_to_end(engine, bf_id, claim(engine, bf_id)) == "succeeded"
    with engine.connect() as conn:
        skipped = backfills.list_skipped(conn, bf_id)
    assert sorted(int(k) for k, _ in skipped) == bad
    assert all("at_most_one" in error for _, error in skipped)
    assert counters(dbname) == {1: 1000 - len(bad), 0: len(bad)}
    bf = get(engine, bf_id)
    assert bf.skipped == len(bad) and bf.rows_done == 1000 - len(bad)
    assert sum(b.skipped for b in batches(engine, bf_id)) == len(bad)


def test_isolate_still_stops_when_every_row_fails(dbname: str, engine: Engine) -> None:
    make_items(dbname, 300)
    query(dbname, "UPDATE items SET flag = 1")
    bf_id = create(engine, spec(on_error="isolate", **FIXED))
    assert run_to_end(engine, bf_id, claim(engine, bf_id)) == "errored"
    bf = get(engine, bf_id)
    assert "every row" in (bf.error or "") and counters(dbname) == {0: 300}
    with engine.connect() as conn:
        assert backfills.list_skipped(conn, bf_id) == []


# -- dry run, throttling, progress ----------------------------------------------------------------


def test_dry_run_changes_nothing_and_projects_the_time(dbname: str, engine: Engine) -> None:
    make_items(dbname, 5000)
    before = query(dbname, "SELECT count(*) FROM runbook.backfills")
    with engine.connect() as conn:
        report = dryrun.dry_run(conn, spec(where_sql="new_column IS NULL", **FIXED), batches=3)
    assert [b["keys"] for b in report["batches"]] == [100, 100, 100]
    assert [b["rows"] for b in report["batches"]] == [100, 100, 100]
    assert report["rows_to_update"] == 5000 and report["estimate"] == "counted"
    assert report["projected_s"] > 0 and report["rolled_back"] is True
    assert counters(dbname) == {0: 5000}
    assert query(dbname, "SELECT count(*) FROM runbook.backfills") == before


def test_an_old_transaction_throttles_the_backfill_until_it_ends(
    dbname: str, engine: Engine
) -> None:
    make_items(dbname, 2000)
    bf_id = create(engine, spec(max_xact_age_s=1, **FIXED))
    holder = psycopg2.connect(db_url(dbname))
    with holder.cursor() as cur:  # REPEATABLE READ keeps its snapshot: it holds the xmin horizon
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM items")
    time.sleep(1.2)
    generation = claim(engine, bf_id)
    # 0.5 s a wait: a budget of 2.5 s holds at least two, even when the first check is slow.
    assert walk.run_slice(engine, bf_id, generation, budget_s=2.5) == "continue"
    assert batches(engine, bf_id) == []  # it waited instead
    holder.rollback()
    holder.close()
    assert run_to_end(engine, bf_id, generation) == "succeeded"
    bf = get(engine, bf_id)
    assert bf.throttled_ms >= 1000 and counters(dbname) == {1: 2000}
    with engine.connect() as conn:
        reason = backfills.last_throttle(conn, bf_id)
    assert reason is not None and "holds back vacuum" in reason.throttle_reason


def test_a_batch_that_makes_the_application_wait_shrinks_the_next(
    dbname: str, engine: Engine
) -> None:
    make_items(dbname, 3000)
    # Row 150 takes 1.5 s to update: the application's write of row 120 (same batch) waits.
    query(
        dbname,
        """
        CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.id = 150 THEN PERFORM pg_sleep(1.5); END IF; RETURN NEW; END $$;
        CREATE TRIGGER slow BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION slow_row();
        """,
    )
    bf_id = create(
        engine, spec(batch_size=1000, min_batch=50, max_batch=1000, target_batch_ms=5000)
    )
    generation = claim(engine, bf_id)

    def application() -> None:
        time.sleep(0.5)  # inside the first batch
        conn = psycopg2.connect(db_url(dbname))
        with conn, conn.cursor() as cur:
            cur.execute("UPDATE items SET flag = 0 WHERE id = 120")
        conn.close()

    app, _ = in_thread(application)
    assert walk.run_slice(engine, bf_id, generation, budget_s=0) == "continue"
    app.join(10)
    first = batches(engine, bf_id)[0]
    assert first.batch_size == 1000
    assert the_slice(engine, bf_id).batch_size <= 500  # halved although the batch was fast


def test_progress_has_a_rate_and_an_eta(dbname: str, engine: Engine) -> None:
    from jobs.backfill import slices

    make_items(dbname, 3000)
    bf_id = create(engine, spec(sleep_ms=200, **FIXED))
    generation = claim(engine, bf_id)
    walk.run_slice(engine, bf_id, generation, budget_s=1.0)
    with engine.connect() as conn:
        info = slices.progress(conn, get(engine, bf_id))
    assert info["rows_done"] > 0 and info["rows_total"] == 3000 and info["estimate"] == "counted"
    assert info["rate_rows_s"] and info["eta_s"] is not None and info["throttled_s"] > 0
    # Throttled time (the 200 ms sleeps) is left out of the rate: 100-row batches in a few ms
    # each would otherwise show at most 500 rows/s.
    assert info["rate_rows_s"] > 1000
    assert info["slices"] == [
        {
            "slice": 0,
            "state": "active",
            "cursor": str(info["rows_done"]),
            "from": None,
            "to": "3000",
            "rows_done": info["rows_done"],
        }
    ]
