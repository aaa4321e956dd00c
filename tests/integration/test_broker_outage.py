"""Broker outages: Redis stopped and started again empty, frozen (SIGSTOP: sockets stay open,
nothing answers) and flapping, under a backfill and an apply whose revision is mid-DDL.

One `runbook worker`, started as a user starts it (the console script, default lease and
reconciler timing), serves the whole module against a Redis of the module's own (no
persistence: a restart loses every message). After each fault every run and backfill that
was in flight must finish by itself, exactly once, on that same worker: no resume, no
restart by hand. While the broker is away `apply` and `backfill` exit 2 with one line naming
it and record nothing, and `status` answers from the ledger.

The 120 s outage and the 60 s SIGSTOP take minutes: they run only when selected,
`pytest -m long_outage tests/integration/test_broker_outage.py`. The module prints how long
after the broker came back each run and backfill finished.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.chaos_support import PrivateRedis, wait_for
from tests.integration.conftest import SESSION, Config, Databases, db_url, query
from tests.projects import Rev, write_project

pytestmark = pytest.mark.integration

ROWS = 3000  # backfill rows; each costs ~3 ms (slow_one) so the walk outlasts the fault
DEADLINE_S = 240  # for a run or backfill to finish once the broker is back (busy machine)
QUEUE = f"runbook-outage-{SESSION}"
RESTART_LINE = "starting it again"  # worker/supervise.py's line when Celery died


def runbook_script() -> str:
    """The installed console script, as a user runs it."""
    beside = Path(sys.executable).parent / "runbook"
    found = str(beside) if beside.exists() else shutil.which("runbook")
    assert found, "no `runbook` console script installed (make install)"
    return found


@dataclass
class Finished:
    fault: str
    held_s: float
    run_s: float | None = None  # seconds after the broker came back until the run ended
    backfill_s: float | None = None
    notes: list[str] = field(default_factory=list)


class World:
    """The module's Redis, runbook.toml, databases and the one `runbook worker`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.redis = PrivateRedis(root)
        self.config = Config(root / "runbook.toml")
        self.databases = Databases()
        self.results: list[Finished] = []
        self.log_path = root / "worker.log"
        self.worker: subprocess.Popen[bytes] | None = None

    def env(self, queue: str = QUEUE) -> dict[str, str]:
        env = {
            **os.environ,
            "RUNBOOK_CONFIG": str(self.config.path),
            "CELERY_BROKER_URL": self.redis.url,
            "CELERY_RESULT_BACKEND": self.redis.url,
            "RUNBOOK_QUEUE": queue,
            "PYTHONUNBUFFERED": "1",
        }
        for knob in ("RUNBOOK_RECONCILE_S", "RUNBOOK_LEASE_S"):  # the defaults a user gets
            env.pop(knob, None)
        return env

    def start_worker(
        self, log_path: Path | None = None, queue: str = QUEUE
    ) -> subprocess.Popen[bytes]:
        path = log_path or self.log_path
        with path.open("ab") as log:
            proc = subprocess.Popen(
                [runbook_script(), "worker", "-c", "3"],
                cwd=self.root,
                env=self.env(queue),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for("the worker to be ready", lambda: "ready." in path.read_text(), 90, path.read_text)
        return proc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, queue: str = QUEUE) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [runbook_script(), *args],
            cwd=self.root,
            env=self.env(queue),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def target(self, revisions: list[Rev], *, items: bool = False) -> tuple[str, str]:
        """A new database (with the backfill's table when ``items``) and its target."""
        dbname = self.databases.create()
        if items:
            query(
                dbname,
                f"""
                CREATE TABLE items (id int PRIMARY KEY, counter int NOT NULL DEFAULT 0);
                INSERT INTO items (id) SELECT g * 3 FROM generate_series(1, {ROWS}) g;
                CREATE FUNCTION slow_one() RETURNS int LANGUAGE sql
                    AS 'SELECT 1 FROM pg_sleep(0.003)';
                ANALYZE items;
                """,
            )
        name = f"o_{dbname}"
        ini = write_project(self.root / f"project-{uuid.uuid4().hex[:6]}", revisions)
        self.config.add(name, url=db_url(dbname), alembic_ini=str(ini), backup=False)
        return name, dbname

    def stop(self) -> None:
        if self.worker is not None:
            stop_worker(self.worker)
        if self.redis.proc is not None and self.redis.proc.poll() is None:
            self.redis.proc.send_signal(signal.SIGCONT)  # a test may end with it stopped
        self.redis.stop()
        self.databases.drop_all()


@pytest.fixture(scope="module")
def world(
    services: None, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[World]:
    made = World(tmp_path_factory.mktemp("outage"))
    try:
        made.worker = made.start_worker()
        yield made
    finally:
        made.stop()
        report(made, request)


def report(world: World, request: pytest.FixtureRequest) -> None:
    lines = [
        "| fault | broker away (s) | run finished after (s) | backfill finished after (s) |",
        "|---|---:|---:|---:|",
    ]
    for r in world.results:
        run = "-" if r.run_s is None else f"{r.run_s:.1f}"
        bf = "-" if r.backfill_s is None else f"{r.backfill_s:.1f}"
        lines.append(f"| {r.fault} | {r.held_s:.0f} | {run} | {bf} |")
    restarts = world.log().count(RESTART_LINE) if world.log_path.exists() else 0
    lines.append(f"Celery restarted by `runbook worker` during the faults: {restarts} times.")
    text = "\n\nbroker outages (seconds after the broker came back):\n" + "\n".join(lines) + "\n"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():
        print(text)


@pytest.fixture
def long_selected(request: pytest.FixtureRequest) -> None:
    if "long_outage" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a minutes-long outage: run with `-m long_outage`")


# -- the work in flight ---------------------------------------------------------------------


def slow_ddl(seconds: float) -> list[Rev]:
    """A revision whose DDL holds its transaction ``seconds``, then one more."""
    return [
        Rev(
            "a1",
            "op.execute('CREATE TABLE slow (id int PRIMARY KEY)')\n"
            f"op.execute('SELECT pg_sleep({seconds:.0f})')",
            "op.execute('DROP TABLE slow')",
        ),
        Rev(
            "a2",
            "op.execute('CREATE TABLE after_all (id int)')",
            "op.execute('DROP TABLE after_all')",
        ),
    ]


@dataclass
class InFlight:
    run_target: str
    run_db: str
    run_id: str
    bf_target: str
    bf_db: str
    backfill_id: str


def ddl_in_flight(world: World, run_db: str) -> None:
    wait_for(
        "a1's DDL in flight",
        lambda: query(
            run_db,
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'active' AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()",
        ),
        90,
        world.log,
    )


def run_finished(world: World, run_db: str, run_id: str) -> float:
    """When (monotonic) the run was seen finished."""
    wait_for(
        f"run {run_id} to finish",
        lambda: query(
            run_db, f"SELECT 1 FROM runbook.runs WHERE id = '{run_id}' AND finished_at IS NOT NULL"
        ),
        DEADLINE_S,
        lambda: world.log()[-6000:],
    )
    return time.monotonic()


def check_run(world: World, run_db: str, run_id: str) -> None:
    """The run succeeded, each step once, a1's DDL done by the delivery that was in it."""
    [(state, error)] = query(run_db, f"SELECT state, error FROM runbook.runs WHERE id = '{run_id}'")
    assert (state, error) == ("succeeded", None), world.log()[-6000:]
    steps = query(
        run_db,
        f"SELECT kind, revision, state, attempts FROM runbook.steps WHERE run_id = "
        f"'{run_id}' AND kind IN ('upgrade', 'verify') ORDER BY id",
    )
    assert steps == [
        ("upgrade", "a1", "succeeded", 1),
        ("verify", "a1", "succeeded", 1),
        ("upgrade", "a2", "succeeded", 1),
        ("verify", "a2", "succeeded", 1),
    ]
    assert query(run_db, "SELECT version_num FROM alembic_version") == [("a2",)]


def start_work(world: World, ddl_s: float) -> InFlight:
    """An apply whose first revision is in its DDL, and a backfill walking, both mid-way."""
    run_target, run_db = world.target(slow_ddl(ddl_s))
    bf_target, bf_db = world.target([], items=True)
    started = world.cli("apply", "--target", run_target)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    started = world.cli(
        "backfill", "--target", bf_target, "--table", "items",
        "--set", "counter = counter + slow_one()", "--batch-size", "50", "--slices", "2",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    backfill_id = started.stdout.strip().split()[0]
    ddl_in_flight(world, run_db)

    def walking() -> bool:
        [(state, done)] = query(
            bf_db,
            "SELECT b.state, coalesce(sum(s.rows_done), 0) FROM runbook.backfills b "
            "LEFT JOIN runbook.backfill_slices s ON s.backfill_id = b.id "
            f"WHERE b.id = '{backfill_id}' GROUP BY b.state",
        )
        assert state == "running", f"backfill {state} before the fault\n{world.log()[-3000:]}"
        return 0 < done < ROWS // 2

    wait_for("the backfill walking", walking, 90, world.log)
    return InFlight(run_target, run_db, run_id, bf_target, bf_db, backfill_id)


def finish(world: World, work: InFlight, result: Finished, back_at: float) -> None:
    """Wait for both to end by themselves; record when; check each was done exactly once."""
    run_s = bf_s = None
    deadline = time.monotonic() + DEADLINE_S
    while run_s is None or bf_s is None:
        assert time.monotonic() < deadline, (
            f"not finished {DEADLINE_S}s after the broker came back: run "
            f"{query(work.run_db, f'SELECT state FROM runbook.runs WHERE id = {work.run_id!r}')}"
            f", backfill {query(work.bf_db, 'SELECT state FROM runbook.backfills')}"
            f"\n{world.log()[-6000:]}"
        )
        if run_s is None and query(
            work.run_db, f"SELECT 1 FROM runbook.runs WHERE id = '{work.run_id}' AND finished_at "
            "IS NOT NULL"
        ):  # fmt: skip
            run_s = time.monotonic() - back_at
        if bf_s is None and query(
            work.bf_db, f"SELECT 1 FROM runbook.backfills WHERE id = '{work.backfill_id}' "
            "AND state IN ('succeeded', 'errored', 'cancelled', 'paused')"
        ):  # fmt: skip
            bf_s = time.monotonic() - back_at
        time.sleep(0.25)
    result.run_s, result.backfill_s = run_s, bf_s
    world.results.append(result)
    assert world.worker is not None and world.worker.poll() is None, "runbook worker exited"

    check_run(world, work.run_db, work.run_id)

    # The backfill: succeeded, every row updated exactly once, the batches say so too.
    [(bf_state,)] = query(
        work.bf_db, f"SELECT state FROM runbook.backfills WHERE id = '{work.backfill_id}'"
    )
    assert bf_state == "succeeded", world.log()[-6000:]
    assert query(
        work.bf_db,
        "SELECT count(*), count(*) FILTER (WHERE counter = 0), "
        "count(*) FILTER (WHERE counter > 1) FROM items",
    ) == [(ROWS, 0, 0)]
    assert query(
        work.bf_db,
        f"SELECT sum(rows) FROM runbook.backfill_batches WHERE backfill_id = '{work.backfill_id}'",
    ) == [(ROWS,)]
    assert "Unrecoverable error" not in world.log(), world.log()[-6000:]


def refused_while_away(world: World, work: InFlight) -> None:
    """apply and backfill: exit 2, one line naming the broker, nothing recorded; status
    answers from the ledger."""
    probe_target, probe_db = world.target(slow_ddl(0), items=True)
    for args in (
        ("apply", "--target", probe_target),
        ("backfill", "--target", probe_target, "--table", "items", "--set", "counter = 1"),
    ):
        done = world.cli(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"broker at {world.redis.url}" in lines[0], done.stderr
        assert "Traceback" not in done.stderr + done.stdout
    assert query(
        probe_db,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'runbook' "
        "AND table_name IN ('runs', 'backfills')",
    ) in ([(0,)], [(2,)])
    if query(probe_db, "SELECT to_regclass('runbook.runs') IS NOT NULL") == [(True,)]:
        assert query(probe_db, "SELECT count(*) FROM runbook.runs") == [(0,)]
        assert query(probe_db, "SELECT count(*) FROM runbook.backfills") == [(0,)]
    assert query(probe_db, "SELECT max(counter) FROM items") == [(0,)]
    for ident in (work.run_id, work.backfill_id):
        shown = world.cli("status", ident)
        assert shown.returncode == 0 and "running" in shown.stdout, shown.stderr


# -- the faults -----------------------------------------------------------------------------


def killed_for(world: World, seconds: float, probe: bool = False) -> None:
    work = start_work(world, ddl_s=seconds + 8)  # the DDL outlasts the outage
    away = time.monotonic()
    world.redis.kill()  # SIGKILL: no save; everything it held is gone
    if probe:
        refused_while_away(world, work)
    time.sleep(max(0.0, seconds - (time.monotonic() - away)))
    world.redis.start()  # empty
    back = time.monotonic()
    finish(world, work, Finished("Redis killed, started again empty", back - away), back)


def test_broker_away_5s(world: World) -> None:
    killed_for(world, 5)


def test_broker_away_30s_refuses_new_work_and_status_answers(world: World) -> None:
    killed_for(world, 30, probe=True)


def test_broker_away_5s_under_a_lone_apply(world: World) -> None:
    """Only a run's task in flight: the recipe of kombu's crash (its late ack, or its
    restore of the unacked message, through a closed channel; worker/app.py)."""
    run_target, run_db = world.target(slow_ddl(13))
    started = world.cli("apply", "--target", run_target)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    ddl_in_flight(world, run_db)
    away = time.monotonic()
    world.redis.kill()
    time.sleep(5)
    world.redis.start()
    back = time.monotonic()
    result = Finished("Redis killed, started again empty (a lone apply)", back - away)
    result.run_s = run_finished(world, run_db, run_id) - back
    world.results.append(result)
    check_run(world, run_db, run_id)
    assert "Unrecoverable error" not in world.log(), world.log()[-6000:]


def test_broker_flapping(world: World) -> None:
    """Five restarts 2-3 s apart, each one empty."""
    rng = random.Random(SESSION)
    work = start_work(world, ddl_s=25)
    away = time.monotonic()
    for _ in range(5):
        world.redis.kill()
        time.sleep(rng.uniform(2, 3))
        world.redis.start()
    back = time.monotonic()
    finish(world, work, Finished("Redis flapping (5 restarts 2-3 s apart)", back - away), back)


@pytest.mark.long_outage
def test_broker_away_120s(world: World, long_selected: None) -> None:
    killed_for(world, 120)


@pytest.mark.long_outage
def test_broker_frozen_60s(world: World, long_selected: None) -> None:
    """SIGSTOP: connections stay open and nothing answers (a half-open broker); messages
    survive, as after a network partition."""
    work = start_work(world, ddl_s=68)
    assert world.redis.proc is not None
    away = time.monotonic()
    world.redis.proc.send_signal(signal.SIGSTOP)
    time.sleep(60)
    world.redis.proc.send_signal(signal.SIGCONT)
    back = time.monotonic()
    finish(world, work, Finished("Redis frozen (SIGSTOP, then SIGCONT)", back - away), back)


def stop_worker(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM to `runbook worker` alone (it passes it on); then whatever is left of its
    process group goes. Its exit code, None when it had to be killed."""
    code = None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = proc.wait(60)
    with contextlib.suppress(ProcessLookupError):  # e.g. the pool of a Celery killed by a test
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return code


def test_runbook_worker_starts_celery_again_when_it_dies(world: World) -> None:
    """Whatever kills Celery's main process (not a stop request), `runbook worker` starts it
    again with one log line, and the new one serves; SIGTERM stops both, no restart."""
    log_path = world.root / "supervised.log"
    queue = f"{QUEUE}-supervised"
    proc = world.start_worker(log_path, queue=queue)
    try:
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGKILL)  # Celery's main process only
        wait_for(
            "Celery started again",
            lambda: log_path.read_text().count("ready.") == 2,
            90,
            log_path.read_text,
        )
        lines = [line for line in log_path.read_text().splitlines() if RESTART_LINE in line]
        assert len(lines) == 1 and "SIGKILL" in lines[0], lines
        # The new Celery consumes: an apply on this worker's own queue succeeds.
        name, dbname = world.target(slow_ddl(0))
        done = world.cli("apply", "--target", name, "--wait", queue=queue)
        assert done.returncode == 0, (done.stdout, done.stderr, log_path.read_text()[-4000:])
        assert query(dbname, "SELECT version_num FROM alembic_version") == [("a2",)]
        assert stop_worker(proc) == 0
        assert log_path.read_text().count(RESTART_LINE) == 1
    finally:
        stop_worker(proc)
