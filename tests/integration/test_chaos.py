"""Chaos: workers SIGKILLed as a whole, Redis killed and restarted empty, Postgres restarted,
duplicate deliveries raced by two workers — each run still reaches its end state, the
schema and data are right, every backfill row is updated exactly once and the ledger tells
the truth.

Every test owns its Postgres and Redis (tests/integration/chaos_support.py) so it may kill
them; its workers run with a 3 s lease and a reconciler every second, so a run or slice
whose worker died is sent again by the reconciler (lease expiry), not by a person. The
module ends by printing a summary table (and writing it to RUNBOOK_CHAOS_SUMMARY, else a
file in the temporary directory); RUNBOOK_CHAOS_SEED repeats a run's random kill points.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from tests.integration.chaos_support import ChaosPostgres, Entry, Stage, Summary, wait_for
from tests.projects import Rev

pytestmark = pytest.mark.integration

ROWS = 3000  # backfill rows: small, but each costs ~1 ms (slow_one) so faults land mid-walk
DEADLINE_S = 150  # for a run to end after its last fault (a busy 2-core machine)

# A revision whose DDL holds its transaction open for a while: the window for a fault.
SLOW_DDL = Rev(
    "a1",
    "op.execute('CREATE TABLE slow (id int PRIMARY KEY)')\nop.execute('SELECT pg_sleep(3)')",
    "op.execute('DROP TABLE slow')",
)
# A revision that declares a backfill of items in two slices (runbook runs it on workers).
BACKFILL = Rev(
    "b1",
    "op.execute('CREATE INDEX items_counter ON items (counter)')",
    "op.execute('DROP INDEX items_counter')",
    extra=(
        "backfills = [{'table': 'items', 'set': 'counter = counter + slow_one()', "
        "'key': 'id', 'batch_size': 100, 'slices': 2}]"
    ),
)
AFTER = Rev(
    "c1", "op.execute('CREATE TABLE after_all (id int)')", "op.execute('DROP TABLE after_all')"
)


@pytest.fixture(scope="module")
def summary(request: pytest.FixtureRequest) -> Iterator[Summary]:
    found = Summary()
    yield found
    ChaosPostgres.discard_template()
    path = found.write()
    text = f"\n\nchaos summary ({path}):\n{found.table()}\n"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():  # shown even when the tests pass
        print(text)


@pytest.fixture
def entry(summary: Summary) -> Iterator[Entry]:
    line = summary.add("?")
    yield line
    line.seconds = time.monotonic() - line.started


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[Stage]:
    world = Stage(tmp_path)
    try:
        yield world
    finally:
        world.close()


@pytest.fixture
def rng(summary: Summary, request: pytest.FixtureRequest) -> random.Random:
    """Random kill points, repeatable: the module's seed and the test's name."""
    return random.Random(f"{summary.seed}:{request.node.name}")


def app_sql(stage: Stage, sql: str) -> None:
    """Statements as the application's role (it owns what they create)."""
    conn = psycopg2.connect(stage.url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def make_items(stage: Stage, ms_per_row: int = 1) -> None:
    """The backfill's table: a counter per row, and a function costing ``ms_per_row``."""
    app_sql(
        stage,
        f"""
        CREATE TABLE items (id int PRIMARY KEY, counter int NOT NULL DEFAULT 0);
        INSERT INTO items (id) SELECT g * 7 FROM generate_series(1, {ROWS}) g;  -- gaps
        CREATE FUNCTION slow_one() RETURNS int LANGUAGE sql
            AS 'SELECT 1 FROM pg_sleep({ms_per_row / 1000})';
        ANALYZE items;
        """,
    )


def steps_of(run: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    return [(s["kind"], s["revision"], s["state"]) for s in run["steps"]]


def attempts_of(run: dict[str, Any], kind: str, revision: str | None) -> int:
    return next(
        s["attempts"] for s in run["steps"] if (s["kind"], s["revision"]) == (kind, revision)
    )


def check_backfill(
    stage: Stage, entry: Entry, backfill_id: str, run: dict[str, Any] | None = None
) -> None:
    """Every row updated exactly once, and the ledger's batches and slices say so (and the
    run's backfill step, for a backfill a revision declared)."""
    rows, lost, twice = stage.counters("items")
    entry.rows, entry.lost, entry.twice = rows, lost, twice
    explain = stage.explain(run["id"]) if run else stage.logs()
    assert (rows, lost, twice) == (ROWS, 0, 0), explain
    assert stage.batch_rows(backfill_id) == ROWS
    assert stage.sql(
        "SELECT b.state, sum(s.rows_done), bool_and(s.state = 'done') FROM runbook.backfills b "
        f"JOIN runbook.backfill_slices s ON s.backfill_id = b.id WHERE b.id = '{backfill_id}' "
        "GROUP BY b.state"
    ) == [("succeeded", ROWS, True)]
    # Batches tile each slice's key range: no gap, no overlap, whatever died in between.
    batches = stage.sql(
        "SELECT slice, lo, hi FROM runbook.backfill_batches "
        f"WHERE backfill_id = '{backfill_id}' ORDER BY slice, hi::bigint"
    )
    for number in {s for s, _, _ in batches}:
        mine = [(lo, hi) for s, lo, hi in batches if s == number]
        assert all(mine[i][1] == mine[i + 1][0] for i in range(len(mine) - 1)), mine
    if run is not None:
        step = next(s for s in run["steps"] if s["kind"] == "backfill")
        assert step["state"] == "succeeded" and step["detail"]["backfills"] == [backfill_id]


def slices_walking(stage: Stage, backfill_id: str, count: int = 2) -> list[tuple[int, int]]:
    """Once ``count`` slices have each done a batch and have far to go: [(slice, generation)]."""

    def walking() -> list[tuple[int, int]] | None:
        rows = stage.probe(
            "SELECT slice, generation FROM runbook.backfill_slices "
            f"WHERE backfill_id = '{backfill_id}' AND state = 'active' AND rows_done > 0 "
            f"AND rows_done < {ROWS // count // 2}"
        )
        return [(int(n), int(g)) for n, g in rows] if rows and len(rows) == count else None

    return wait_for(f"{count} slices walking", walking, 60, stage.logs)


def kill_mid_backfill(stage: Stage, backfill_id: str, fraction: float, what: str, act: Any) -> int:
    """Once the backfill has done ``fraction`` of its rows (and is still running), ``act``;
    the rows done then."""

    def reached() -> int | None:
        now = stage.rows_done(backfill_id)
        if now is None:
            return None
        state, done = now
        assert state in ("enqueued", "running"), f"backfill {state} before {what}"
        return done if done >= fraction * ROWS else None

    done = wait_for(f"{fraction:.0%} of the backfill", reached, 90, stage.logs)
    assert done < ROWS, f"the backfill finished before {what}"
    act()
    return done


# -- whole worker SIGKILLed ------------------------------------------------------------------


def test_worker_killed_during_the_backup(stage: Stage, entry: Entry, rng: random.Random) -> None:
    # The dump itself, or its trial restore into a scratch database.
    phase = rng.choice(["pg_dump", "trial restore"])
    entry.fault = f"worker SIGKILLed during the backup ({phase})"
    app_sql(
        stage,
        "CREATE TABLE bulk (id int PRIMARY KEY, payload text);"
        "INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, 100000) g;",
    )
    before = stage.sql("SELECT md5(string_agg(payload, ',' ORDER BY id)) FROM bulk")
    stage.target([AFTER])  # backup on, verified by a restore into a scratch database
    stage.start_worker()
    run_id = stage.apply()
    entry.runs = 1

    def in_phase() -> bool:
        if phase == "pg_dump":
            return stage.tools_running("pg_dump")
        return bool(stage.scratch_databases()) and stage.tools_running("pg_restore")

    wait_for(f"the backup's {phase}", in_phase, 60, lambda: stage.explain(run_id))
    stage.kill_workers()
    entry.injected = 1
    stage.start_worker()

    run = stage.finish(run_id, DEADLINE_S)
    entry.end = run["state"]
    assert run["state"] == "succeeded", stage.explain(run_id)
    entry.finished = 1
    assert steps_of(run) == [
        ("preflight", None, "succeeded"),
        ("backup", None, "succeeded"),
        ("upgrade", "c1", "succeeded"),
        ("verify", "c1", "succeeded"),
    ]
    assert attempts_of(run, "backup", None) == 2
    # One backup recorded for the run (the killed attempt recorded none), verified, and the
    # file on disk is the one the ledger describes.
    [(path, sha, verified)] = stage.sql(
        f"SELECT path, sha256, verified FROM runbook.backups WHERE run_id = '{run_id}'"
    )
    assert verified and run["backup"]["sha256"] == sha
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha
    assert stage.sql("SELECT version_num FROM alembic_version") == [("c1",)]
    assert stage.sql("SELECT md5(string_agg(payload, ',' ORDER BY id)) FROM bulk") == before
    # What the killed attempt left behind (nothing can clean up after a SIGKILL): noted.
    strays = sorted(p.name for p in Path(path).parent.iterdir() if str(p) != path)
    scratch = stage.scratch_databases()
    if strays:
        entry.notes.append(f"the killed attempt's partial dump stays in backup_dir: {strays}")
    if scratch:
        entry.notes.append(f"the killed attempt's scratch database stays: {scratch}")
    entry.passed = True


def test_worker_killed_during_a_revisions_ddl(stage: Stage, entry: Entry) -> None:
    entry.fault = "worker SIGKILLed during a revision's DDL"
    first = Rev("a0", "op.execute('CREATE TABLE first (id int)')", "op.execute('DROP TABLE first')")
    stage.target([first, SLOW_DDL, AFTER], backup=False, lock_timeout="500ms", lock_retries=20)
    stage.start_worker()
    run_id = stage.apply()
    entry.runs = 1
    wait_for(
        "a1's DDL in flight",
        lambda: stage.step("upgrade", "a1") and stage.session("query LIKE '%pg_sleep(3)%'"),
        60,
        lambda: stage.explain(run_id),
    )
    stage.kill_workers()
    entry.injected = 1
    stage.start_worker()

    run = stage.finish(run_id, DEADLINE_S)
    entry.end = run["state"]
    assert run["state"] == "succeeded", stage.explain(run_id)
    entry.finished = 1
    assert steps_of(run) == [
        ("preflight", None, "succeeded"),
        ("upgrade", "a0", "succeeded"),
        ("verify", "a0", "succeeded"),
        ("upgrade", "a1", "succeeded"),
        ("verify", "a1", "succeeded"),
        ("upgrade", "c1", "succeeded"),
        ("verify", "c1", "succeeded"),
    ]
    assert [s["attempts"] for s in run["steps"]] == [1, 1, 1, 2, 1, 1, 1]  # a1 went up twice
    assert run["deliveries"] == 2 and run["current_revision"] == "c1"
    assert stage.sql("SELECT version_num FROM alembic_version") == [("c1",)]
    assert stage.sql(
        "SELECT count(*) FROM pg_tables WHERE tablename IN ('first', 'slow', 'after_all')"
    ) == [(3,)]
    entry.passed = True


def test_worker_killed_again_and_again_during_a_backfill(
    stage: Stage, entry: Entry, rng: random.Random
) -> None:
    entry.fault = "worker SIGKILLed 3 times in a row during a backfill (2 slices)"
    make_items(stage)
    stage.target([BACKFILL, AFTER], backup=False)
    stage.start_worker()
    run_id = stage.apply()
    entry.runs = 1
    backfill_id = stage.backfill_of(run_id)
    points = [rng.uniform(0.1, 0.3), rng.uniform(0.4, 0.6), rng.uniform(0.7, 0.85)]
    for point in points:
        kill_mid_backfill(stage, backfill_id, point, "the kill", stage.kill_workers)
        entry.injected += 1
        stage.start_worker()

    run = stage.finish(run_id, DEADLINE_S)
    entry.end = run["state"]
    assert run["state"] == "succeeded", stage.explain(run_id)
    entry.finished = 1
    check_backfill(stage, entry, backfill_id, run)
    assert steps_of(run) == [
        ("preflight", None, "succeeded"),
        ("upgrade", "b1", "succeeded"),
        ("backfill", "b1", "succeeded"),
        ("verify", "b1", "succeeded"),
        ("upgrade", "c1", "succeeded"),
        ("verify", "c1", "succeeded"),
    ]
    assert stage.sql("SELECT version_num FROM alembic_version") == [("c1",)]
    # Lease expiry, not a person, carried it on: the reconciler took the slices over.
    assert "has no live lease: sending it again" in stage.logs(tail=None)
    entry.passed = True


def test_worker_killed_during_a_rollback(stage: Stage, entry: Entry) -> None:
    entry.fault = "worker SIGKILLed during a rollback's downgrade"
    revisions = [
        Rev(
            "r1",
            "op.execute('CREATE TABLE gone (id int)')",
            "op.execute('DROP TABLE gone')\nop.execute('SELECT pg_sleep(3)')",
        ),
        Rev("r2", "op.execute('SELECT 1/0')"),
    ]
    stage.target(revisions, backup=False, lock_timeout="500ms", lock_retries=20)
    stage.start_worker()
    run_id = stage.apply()
    entry.runs = 1
    wait_for(
        "r1's downgrade in flight",
        lambda: stage.step("downgrade", "r1") and stage.session("query LIKE '%pg_sleep(3)%'"),
        60,
        lambda: stage.explain(run_id),
    )
    stage.kill_workers()
    entry.injected = 1
    stage.start_worker()

    run = stage.finish(run_id, DEADLINE_S)
    entry.end = run["state"]
    assert run["state"] == "rolled_back", stage.explain(run_id)
    entry.finished = 1
    assert "division by zero" in run["error"]
    assert steps_of(run) == [
        ("preflight", None, "succeeded"),
        ("upgrade", "r1", "succeeded"),
        ("verify", "r1", "succeeded"),
        ("upgrade", "r2", "failed"),
        ("downgrade", "r1", "succeeded"),
    ]
    assert attempts_of(run, "downgrade", "r1") == 2
    assert run["current_revision"] is None
    assert stage.sql("SELECT to_regclass('gone'), count(*) FROM alembic_version") == [(None, 0)]
    entry.passed = True


def test_worker_killed_during_a_restore(stage: Stage, entry: Entry) -> None:
    entry.fault = "worker SIGKILLed during a restore from backup (psql mid-transaction)"
    app_sql(
        stage,
        "CREATE TABLE keep (id int PRIMARY KEY, v text NOT NULL);"
        "INSERT INTO keep SELECT g, 'v' || g FROM generate_series(1, 2000) g;"
        "CREATE TABLE bystander (id int); INSERT INTO bystander VALUES (1);",
    )
    content = "SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM keep"
    before = stage.sql(content)
    revisions = [
        Rev(
            "i1",
            'op.execute("ALTER TABLE keep ADD COLUMN extra text")\n'
            "op.execute(\"UPDATE keep SET v = 'overwritten'\")",
            extra='irreversible = "it overwrites keep.v"',
        ),
        Rev("i2", "op.execute('SELECT 1/0')"),
    ]
    stage.target(revisions)
    # An application session reading a table the run never touches: preflight ignores it,
    # the restore's drop waits for it (its lock_timeout is 30 s) — a window mid-restore.
    holder = psycopg2.connect(stage.url)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT count(*) FROM bystander")
        stage.start_worker()
        run_id = stage.apply()
        entry.runs = 1
        wait_for(
            "the restore's psql session, mid-transaction",
            lambda: (
                stage.step("restore", run_backup_id(stage, run_id))
                and stage.session("wait_event_type = 'Lock'")
            ),
            90,
            lambda: stage.explain(run_id),
        )
        stage.kill_workers()
        entry.injected = 1
    finally:
        holder.close()
    # The killed psql never sent COMMIT: nothing of the half-done restore is visible.
    extra = "SELECT count(*) FROM information_schema.columns WHERE column_name = 'extra'"
    assert stage.sql(extra) == [(1,)]
    stage.start_worker()

    run = stage.finish(run_id, DEADLINE_S)
    entry.end = run["state"]
    assert run["state"] == "restored", stage.explain(run_id)
    entry.finished = 1
    assert "division by zero" in run["error"] and "restored from backup" in run["error"]
    backup_id = run["backup"]["id"]
    assert steps_of(run) == [
        ("preflight", None, "succeeded"),
        ("backup", None, "succeeded"),
        ("upgrade", "i1", "succeeded"),
        ("verify", "i1", "succeeded"),
        ("upgrade", "i2", "failed"),
        ("downgrade", "i1", "failed"),
        ("restore", backup_id, "succeeded"),
    ]
    assert attempts_of(run, "restore", backup_id) == 2
    assert stage.sql(content) == before
    assert stage.sql("SELECT to_regclass('alembic_version'), count(*) FROM bystander") == [
        (None, 1)
    ]
    assert stage.sql(extra) == [(0,)]
    entry.passed = True


def run_backup_id(stage: Stage, run_id: str) -> str:
    rows = stage.probe(f"SELECT backup->>'id' FROM runbook.runs WHERE id = '{run_id}'")
    return str(rows[0][0]) if rows and rows[0][0] else "?"


# -- Redis killed, Postgres restarted ---------------------------------------------------------


def test_redis_killed_mid_run_loses_its_messages_and_the_run_finishes(
    stage: Stage, entry: Entry
) -> None:
    entry.fault = "Redis SIGKILLed, restarted empty: run queued, mid-DDL, slice queued"
    make_items(stage)
    stage.target([SLOW_DDL, BACKFILL, AFTER], backup=False)

    def bounce(why: str) -> None:
        held = stage.redis.messages()
        stage.redis.kill()
        stage.redis.start()  # empty: no dump, no append-only file (workers reconnect to it)
        entry.injected += 1
        entry.notes.append(f"kill {entry.injected} ({why}): {held} task messages lost")

    # 1. The run's message is lost before any worker took it.
    run_id = stage.apply()
    entry.runs = 1
    assert stage.redis.queued() == [("runbook.execute_run", [run_id, stage.name])]
    bounce("the run's message queued")
    # One pool process: while it walks one slice, the other slice's message waits in Redis.
    stage.start_worker(concurrency=1)

    # 2. Mid-revision: the delivery working on it loses its broker and goes on.
    wait_for(
        "a1's DDL in flight",
        lambda: stage.step("upgrade", "a1") and stage.session("query LIKE '%pg_sleep(3)%'"),
        60,
        lambda: stage.explain(run_id),
    )
    bounce("a delivery in a revision's DDL")
    backfill_id = stage.backfill_of(run_id)

    # 3. Mid-backfill, while a slice's only live message waits in the queue.
    def slice_message_queued() -> bool:
        current = stage.probe(
            "SELECT slice, generation FROM runbook.backfill_slices "
            f"WHERE backfill_id = '{backfill_id}' AND state = 'active'"
        )
        if not current or len(current) < 2:
            return False
        waiting = {
            (args[2], args[3])
            for task, args in stage.redis.queued()
            if task == "runbook.backfill_slice" and args[0] == backfill_id
        }
        return any((n, g) in waiting for n, g in current)

    wait_for("a live slice message waiting in Redis", slice_message_queued, 90, stage.logs)
    bounce("a live slice message queued")

    run = stage.finish(run_id, DEADLINE_S)
    entry.end = run["state"]
    assert run["state"] == "succeeded", stage.explain(run_id)
    entry.finished = 1
    check_backfill(stage, entry, backfill_id, run)
    assert all(state == "succeeded" for _, _, state in steps_of(run))
    assert attempts_of(run, "upgrade", "a1") == 1  # the delivery working through it went on
    assert stage.sql("SELECT version_num FROM alembic_version") == [("c1",)]
    entry.passed = True


def test_postgres_restarted_mid_upgrade_and_mid_backfill(
    stage: Stage, entry: Entry, rng: random.Random
) -> None:
    entry.fault = "Postgres restarted (pg_ctl restart -m fast): mid-upgrade, mid-backfill"
    make_items(stage)
    stage.target([SLOW_DDL, BACKFILL, AFTER], backup=False)
    stage.start_worker()
    run_id = stage.apply()
    entry.runs = 1

    def restart() -> None:
        stage.pg.restart()
        entry.injected += 1

    wait_for(
        "a1's DDL in flight",
        lambda: stage.step("upgrade", "a1") and stage.session("query LIKE '%pg_sleep(3)%'"),
        60,
        lambda: stage.explain(run_id),
    )
    restart()
    backfill_id = stage.backfill_of(run_id)
    kill_mid_backfill(stage, backfill_id, rng.uniform(0.2, 0.6), "the restart", restart)

    run = stage.finish(run_id, DEADLINE_S)
    entry.end = run["state"]
    assert run["state"] == "succeeded", stage.explain(run_id)
    entry.finished = 1
    check_backfill(stage, entry, backfill_id, run)
    assert all(state == "succeeded" for _, _, state in steps_of(run))
    assert attempts_of(run, "upgrade", "a1") == 2  # the aborted DDL was done again
    assert stage.sql("SELECT version_num FROM alembic_version") == [("c1",)]
    entry.passed = True


# -- duplicate delivery ---------------------------------------------------------------------


def test_two_workers_race_for_duplicated_deliveries(stage: Stage, entry: Entry) -> None:
    entry.fault = "duplicate deliveries raced by two workers: a run's task, a slice's task"
    make_items(stage, ms_per_row=2)  # one slice walks for seconds: its duplicate lands mid-walk
    stage.target([SLOW_DDL, AFTER], backup=False)
    # The run's message, and the same execute_run again (a user's resume), both queued...
    run_id = stage.apply()
    entry.runs = 1
    resumed = stage.cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    entry.injected = 1
    assert stage.redis.queued() == [("runbook.execute_run", [run_id, stage.name])] * 2
    # ... then two workers of one process each: each takes one copy, and they race.
    workers = stage.start_workers(2, concurrency=1)
    wait_for(
        "each worker to receive a copy of the run's task",
        lambda: all("Task runbook.execute_run[" in w.log_text() for w in workers),
        60,
        stage.logs,
    )
    run = stage.finish(run_id, DEADLINE_S)
    entry.end = run["state"]
    assert run["state"] == "succeeded", stage.explain(run_id)
    entry.finished = 1
    # Worked on once: one counted delivery, no step done twice.
    assert run["deliveries"] == 1
    assert [(s["kind"], s["revision"], s["attempts"]) for s in run["steps"]] == [
        ("preflight", None, 1),
        ("upgrade", "a1", 1),
        ("verify", "a1", 1),
        ("upgrade", "c1", 1),
        ("verify", "c1", 1),
    ]

    # An operator's backfill whose slice task message is sent twice: the other worker takes
    # the copy and both walk the slice as one generation until one hands it on.
    started = stage.cli(
        "backfill",
        "--target",
        stage.name,
        "--table",
        "items",
        "--set",
        "counter = counter + slow_one()",
        "--batch-size",
        "100",
    )
    assert started.returncode == 0, started.stderr
    backfill_id = started.stdout.strip()
    # The copy names the generation walking when it is sent; it overlaps the first delivery
    # when both have started as that generation before either returned (`unfinished` counts
    # the deliveries of the current generation that started and did not return: 2). A copy
    # that arrives after the hand-off proves nothing: send another for the new generation.
    overlapped = False
    [(number, generation)] = slices_walking(stage, backfill_id, 1)
    for attempt in range(3):
        if attempt:  # the generation walking now, however far (a quiet machine walks fast)
            walking = stage.probe(
                "SELECT generation FROM runbook.backfill_slices "
                f"WHERE backfill_id = '{backfill_id}' AND slice = {number} AND state = 'active'"
            )
            if not walking:
                break
            generation = int(walking[0][0])
        stage.send_task("runbook.backfill_slice", backfill_id, stage.name, number, generation)
        entry.injected += 1
        deadline = time.monotonic() + 3
        while not overlapped and time.monotonic() < deadline:
            rows = stage.probe(
                "SELECT generation, unfinished FROM runbook.backfill_slices "
                f"WHERE backfill_id = '{backfill_id}' AND slice = {number}"
            )
            overlapped = bool(rows) and (int(rows[0][0]), int(rows[0][1])) == (generation, 2)
            time.sleep(0.02)
        if overlapped:
            break
    assert overlapped, "no copy of a slice's message ran alongside the delivery it copied"
    wait_for(
        "the backfill to end",
        lambda: (stage.rows_done(backfill_id) or ("?", 0))[0] not in ("enqueued", "running"),
        DEADLINE_S,
        stage.logs,
    )
    check_backfill(stage, entry, backfill_id)
    assert ": fenced," in stage.logs(tail=None), stage.logs()  # the copy that lost stood down
    entry.passed = True


def test_a_duplicated_run_delivery_takes_its_walking_backfill_over(
    stage: Stage, entry: Entry
) -> None:
    entry.fault = "duplicate run delivery while its backfill walks (takeover vs batches)"
    make_items(stage, ms_per_row=4)  # batches of ~0.4 s: the takeover meets one in flight
    stage.target([BACKFILL, AFTER], backup=False)
    stage.start_worker(concurrency=3)  # both slices walk, and the duplicate runs at once
    run_id = stage.apply()
    entry.runs = 1
    backfill_id = stage.backfill_of(run_id)
    slices_walking(stage, backfill_id)
    # The run's delivery has handed its backfill to the slices and returned; this copy gets
    # the run lock at once and takes the backfill over (new generations) under the batches.
    resumed = stage.cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    entry.injected = 1
    run = stage.finish(run_id, DEADLINE_S)
    entry.end = run["state"]
    assert run["state"] == "succeeded", stage.explain(run_id)  # no deadlock, no rollback
    entry.finished = 1
    check_backfill(stage, entry, backfill_id, run)
    assert [(s["kind"], s["revision"], s["attempts"]) for s in run["steps"]] == [
        ("preflight", None, 1),
        ("upgrade", "b1", 1),
        ("backfill", "b1", 1),
        ("verify", "b1", 1),
        ("upgrade", "c1", 1),
        ("verify", "c1", 1),
    ]
    assert ": fenced," in stage.logs(tail=None), stage.logs()  # the taken-over tasks stood down
    entry.passed = True


def test_a_duplicate_delivery_leaves_the_working_deliverys_lease_alone(
    stage: Stage, entry: Entry
) -> None:
    entry.fault = "duplicate run delivery giving up while the first works on (lease kept)"
    long_ddl = Rev(
        "a1",
        "op.execute('CREATE TABLE slow (id int)')\nop.execute('SELECT pg_sleep(12)')",
        "op.execute('DROP TABLE slow')",
    )
    stage.target([long_ddl], backup=False)
    stage.start_workers(2, concurrency=1)
    run_id = stage.apply()
    entry.runs = 1
    in_ddl = "query LIKE '%pg_sleep(12)%'"
    wait_for("a1's DDL in flight", lambda: stage.session(in_ddl), 60, stage.logs)
    lease = f"SELECT heartbeat_by, unfinished FROM runbook.runs WHERE id = '{run_id}'"
    [(owner, unfinished)] = stage.sql(lease)
    assert owner and unfinished == 1
    # The other worker takes the copy, waits 5 s for the run lock, and gives up.
    resumed = stage.cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    entry.injected = 1
    wait_for(
        "the duplicate to give up",
        lambda: "another delivery holds the run" in stage.logs(tail=None),
        60,
        stage.logs,
    )
    after = stage.sql(lease)
    assert stage.session(in_ddl), "the first delivery ended before the duplicate gave up"
    # The working delivery's lease is untouched: its holder, counted once. (A duplicate that
    # took the lease over and cleared it on giving up made the reconciler send a live run
    # again, and, counted as unfinished, could fail it as poison.)
    assert after == [(owner, 1)], stage.explain(run_id)
    run = stage.finish(run_id, DEADLINE_S)
    entry.end = run["state"]
    assert run["state"] == "succeeded", stage.explain(run_id)
    entry.finished = 1
    assert run["deliveries"] == 1
    assert [s["attempts"] for s in run["steps"]] == [1, 1, 1]
    assert "has no live lease" not in stage.logs(tail=None)  # nothing was sent again
    entry.passed = True
