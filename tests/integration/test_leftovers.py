"""What a killed worker leaves behind is removed, and nothing a live run uses is touched.

Each test starts its own worker as a user does (the installed `runbook worker`, on a queue
and runbook.toml of its own) against the shared Postgres, and kills it with SIGKILL: its
pool process alone (Celery delivers the run again at once), or the whole worker (nothing
runs until a new worker's reconciler sends the run again). Where the kill lands is held
open by a gate: a session with a name of the test's own that the slow step waits for, on a
scratch database only (a revision's upgrade, or an index built by pg_restore), so the kill
always lands mid-rehearsal or mid-trial-restore. Only names this test made are looked at:
the scratch databases named for its own target databases, and its own backup_dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from jobs.backups.leftovers import database_tag
from jobs.pg.db import RUN_LOCK_KEY
from tests.integration.chaos_support import wait_for
from tests.integration.conftest import ADMIN_URL, Config, Databases, admin_exec, db_url, query
from tests.projects import Rev, write_project

pytestmark = pytest.mark.integration

RUNBOOK = Path(sys.executable).with_name("runbook")  # the installed console script
DEADLINE_S = 120


def gate_loop(gate: str) -> str:
    """PL/pgSQL that waits, on a scratch database only, while a session named ``gate`` is
    connected (two minutes at most)."""
    return (
        "IF starts_with(current_database(), 'runbook_scratch_') THEN "
        "FOR i IN 1..2400 LOOP PERFORM pg_stat_clear_snapshot(); "
        "EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_stat_activity "
        f"WHERE application_name = '{gate}'); "
        "PERFORM pg_sleep(0.05); END LOOP; END IF;"
    )


class Gate:
    """Holds the slow step while open: a session named for this test."""

    def __init__(self) -> None:
        self.name = f"leftovers-gate-{uuid.uuid4().hex[:8]}"
        self.conn: Any = None

    def hold(self) -> None:
        self.conn = psycopg2.connect(ADMIN_URL, application_name=self.name)

    def release(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class UserWorker:
    """`runbook worker` as a user starts it (its own queue and runbook.toml)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log_path = env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **extra: str) -> UserWorker:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(RUNBOOK), "worker", "-c", "1", "-n", f"leftovers-{uuid.uuid4().hex[:6]}@%h"],
                env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1", **extra},
                cwd=self.log_path.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for("the worker to be ready", lambda: "ready." in self.log(), 60, self.log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill_pool(self) -> None:
        """SIGKILL the pool processes only; the main process lives and delivers again."""
        assert self.proc is not None
        # `runbook worker` runs Celery as its child (worker/supervise.py): its pool is below.
        (celery,) = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        children = subprocess.run(
            ["pgrep", "-P", celery], capture_output=True, text=True
        ).stdout.split()
        assert children, self.log()
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the whole worker: main process, pool, and the tools they run."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def removals(self, what: str) -> list[str]:
        """The worker's log lines saying it removed ``what``."""
        return [line for line in self.log().splitlines() if f"removed {what} left by" in line]


class World:
    """A queue, a runbook.toml and targets of this test's own."""

    def __init__(self, tmp: Path, databases: Databases) -> None:
        self.tmp, self.databases = tmp, databases
        self.config = Config(tmp / "runbook.toml")
        self.env = {
            "RUNBOOK_CONFIG": str(self.config.path),
            "RUNBOOK_QUEUE": f"runbook-leftovers-{uuid.uuid4().hex[:8]}",
        }
        self.workers: list[UserWorker] = []
        self.dbnames: list[str] = []

    def target(self, revisions: list[Rev], **options: object) -> tuple[str, str]:
        dbname = self.databases.create()
        self.dbnames.append(dbname)
        name = f"lo_{dbname}"
        options.setdefault("backup_dir", str(self.tmp / f"backups-{name}"))
        ini = write_project(self.tmp / f"project-{name}", revisions)
        self.config.add(name, url=db_url(dbname), alembic_ini=str(ini), **options)
        return name, dbname

    def worker(self, **extra: str) -> UserWorker:
        made = UserWorker(self.env, self.tmp / f"worker-{len(self.workers) + 1}.log")
        self.workers.append(made)
        return made.start(**extra)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(RUNBOOK), *args],
            env={**os.environ, **self.env},
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def enqueue(self, *args: str) -> str:
        done = self.cli(*args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    def run(self, dbname: str, run_id: str) -> dict[str, Any]:
        [(state, error, deliveries)] = query(
            dbname, f"SELECT state, error, deliveries FROM runbook.runs WHERE id = '{run_id}'"
        )
        return {"state": state, "error": error, "deliveries": deliveries}

    def finish(self, dbname: str, run_id: str) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            found = self.run(dbname, run_id)
            return found if found["state"] not in ("enqueued", "running") else None

        return wait_for(f"run {run_id} to end", ended, DEADLINE_S, self.logs)

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.log()[-5000:]}" for w in self.workers)

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        for dbname in self.dbnames:  # whatever a failed test left under our names
            for name in scratch_of(dbname):
                admin_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def world(services: None, databases: Databases, tmp_path: Path) -> Iterator[World]:
    assert RUNBOOK.exists(), f"no installed console script at {RUNBOOK}"
    made = World(tmp_path, databases)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def gate() -> Iterator[Gate]:
    made = Gate()
    try:
        yield made
    finally:
        made.release()


def scratch_of(dbname: str, run_id: str = "") -> list[str]:
    """Scratch databases on the server named for ``dbname`` (and ``run_id``)."""
    prefix = f"runbook_scratch_{database_tag(dbname)}_{run_id}"
    rows = query(
        "postgres", f"SELECT datname FROM pg_database WHERE starts_with(datname, '{prefix}')"
    )
    return sorted(str(r[0]) for r in rows)


def active_in(scratch_prefix: str, marker: str) -> list[str]:
    """Scratch databases named ``scratch_prefix``… in which a statement holding ``marker``
    runs (waits at the gate)."""
    rows = query(
        "postgres",
        "SELECT DISTINCT datname FROM pg_stat_activity WHERE starts_with(datname, "
        f"'{scratch_prefix}') AND state = 'active' AND query LIKE '%{marker}%'",
    )
    return sorted(str(r[0]) for r in rows)


def run_lock_held(dbname: str) -> bool:
    """Whether a session holds the database's run lock (jobs/pg/db.py's RUN_LOCK_KEY)."""
    rows = query(
        "postgres",
        "SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        f"WHERE d.datname = '{dbname}' AND l.locktype = 'advisory' "
        f"AND l.classid::bigint = {RUN_LOCK_KEY >> 32} "
        f"AND l.objid::bigint = {RUN_LOCK_KEY & 0xFFFFFFFF}",
    )
    return bool(rows)


def gated_revision(gate: Gate) -> Rev:
    """A revision whose upgrade waits at the gate on a scratch copy (a rehearsal)."""
    body = gate_loop(gate.name)
    return Rev("g1", f'op.execute("DO $$ BEGIN {body} END $$")', "op.execute('SELECT 1')")


PLAIN = Rev("p1", "op.execute('CREATE TABLE p (id int)')", "op.execute('DROP TABLE p')")


def doctor(world: World, name: str) -> dict[str, list[dict[str, str]]]:
    """`runbook doctor --json` findings by code."""
    done = world.cli("doctor", "--target", name, "--json")
    assert done.returncode in (0, 1), done.stderr
    by_code: dict[str, list[dict[str, str]]] = {}
    for found in json.loads(done.stdout):
        by_code.setdefault(found["code"], []).append(found)
    return by_code


def test_a_rehearsal_whose_pool_process_is_killed_leaves_a_scratch_database_the_next_delivery_removes(
    world: World, gate: Gate
) -> None:
    name, dbname = world.target([gated_revision(gate), PLAIN])
    worker = world.worker(RUNBOOK_RECONCILE_S="0")  # no reconciler: the next delivery cleans
    gate.hold()
    run_id = world.enqueue("rehearse", "--target", name)
    ours = f"runbook_scratch_{database_tag(dbname)}_{run_id}_d"
    [killed] = wait_for(
        "the rehearsal at the gate", lambda: active_in(ours, gate.name), 90, world.logs
    )
    assert killed.startswith(f"{ours}1_r"), killed  # the rehearsal copy of delivery 1
    worker.kill_pool()
    gate.release()

    run = world.finish(dbname, run_id)
    assert run["state"] == "succeeded" and run["deliveries"] == 2, (run, world.logs())
    # The second delivery removed the first one's copy before making its own, said so once,
    # and dropped its own copy at the end: nothing of this run is left.
    lines = worker.removals(f"scratch database {killed}")
    assert len(lines) == 1 and "delivered again since (delivery 2)" in lines[0], world.logs()
    assert "ForkPoolWorker" in lines[0]
    assert scratch_of(dbname) == []
    assert not list(Path(world.tmp).glob("backups-*/*.partial"))


def test_a_worker_killed_mid_backup_leaves_a_scratch_database_and_a_partial_dump_that_doctor_lists_and_the_reconciler_removes(
    world: World, gate: Gate
) -> None:
    name, dbname = world.target([PLAIN])
    # An index pg_restore builds through the gate: the trial restore of the backup waits.
    query(
        dbname,
        "CREATE TABLE gated (id int); INSERT INTO gated VALUES (1), (2);"
        "CREATE FUNCTION gate(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS "
        f"$$ BEGIN {gate_loop(gate.name)} RETURN x; END $$;"
        "CREATE INDEX gated_gate ON gated (gate(id));",
    )
    first = world.worker(RUNBOOK_RECONCILE_S="0")
    gate.hold()
    run_id = world.enqueue("apply", "--target", name)
    ours = f"runbook_scratch_{database_tag(dbname)}_{run_id}_d1_v"
    [scratch] = wait_for(
        "the trial restore at the gate", lambda: active_in(ours, "gated_gate"), 90, world.logs
    )
    backups = Path(world.config.targets[name]["backup_dir"])  # type: ignore[arg-type]
    [partial] = list(backups.glob(f"*-{run_id}.dump.d1.partial"))
    first.kill()  # pool, main process and pg_restore: nobody is left to clean up
    gate.release()
    wait_for("the dead worker's run lock to go", lambda: not run_lock_held(dbname), 30)

    # Before any cleanup the doctor lists both, each with how to fix it.
    found = doctor(world, name)
    [left_db] = found["leftover_scratch"]
    assert scratch in left_db["message"] and "no worker holds the run lock" in left_db["message"]
    assert f'DROP DATABASE "{scratch}" WITH (FORCE)' in left_db["fix"]
    [left_file] = found["leftover_dump"]
    assert str(partial) in left_file["message"] and f"rm {partial}" in left_file["fix"]
    assert scratch_of(dbname) == [scratch] and partial.exists()

    # A new worker's reconciler removes them (one line each), then sends the run again.
    second = world.worker(RUNBOOK_RECONCILE_S="1", RUNBOOK_LEASE_S="3")
    run = world.finish(dbname, run_id)
    assert run["state"] == "succeeded", (run, world.logs())
    for what in (f"scratch database {scratch}", f"partial dump file {partial}"):
        [line] = second.removals(what)
        assert "MainProcess" in line, line  # the reconciler's thread, not the next delivery
    assert scratch_of(dbname) == [] and not partial.exists()
    # The run's second delivery made one backup, under its final name, and recorded it.
    [(path,)] = query(dbname, f"SELECT path FROM runbook.backups WHERE run_id = '{run_id}'")
    assert sorted(p.name for p in backups.iterdir()) == [Path(path).name]
    assert not {"leftover_scratch", "leftover_dump"} & set(doctor(world, name))


def test_the_reconciler_leaves_a_live_rehearsal_and_other_databases_scratch_alone(
    world: World, gate: Gate
) -> None:
    name, dbname = world.target([gated_revision(gate)])
    other, other_db = world.target([PLAIN])  # another target's database on the same server
    worker = world.worker(RUNBOOK_RECONCILE_S="1")
    ended = json.loads(world.cli("backup", "--target", name, "--wait", "--json").stdout)["id"]
    other_ended = json.loads(world.cli("backup", "--target", other, "--wait", "--json").stdout)[
        "id"
    ]
    other_options = world.config.targets.pop(other)
    world.config.write()  # this worker's configuration no longer knows the other target

    gate.hold()
    live_run = world.enqueue("rehearse", "--target", name)
    ours = f"runbook_scratch_{database_tag(dbname)}_{live_run}_d1_r"
    [live] = wait_for(
        "the rehearsal at the gate", lambda: active_in(ours, gate.name), 90, world.logs
    )
    # Leftovers of runs that have ended, made while the rehearsal is live: this target's
    # (a scratch database and a partial dump), the other target's, and one named for this
    # database but for a run its ledger does not know.
    tag, other_tag = database_tag(dbname), database_tag(other_db)
    dead = f"runbook_scratch_{tag}_{ended}_d1_v0a0a"
    foreign = f"runbook_scratch_{other_tag}_{other_ended}_d1_v0b0b"
    unknown = f"runbook_scratch_{tag}_{other_ended}_d1_v0c0c"
    for made in (dead, foreign, unknown):
        admin_exec(f'CREATE DATABASE "{made}"')
    backups = Path(world.config.targets[name]["backup_dir"])  # type: ignore[arg-type]
    partial = backups / f"{name}-20260101T000000Z-{ended}.dump.d1.partial"
    partial.write_bytes(b"PGDMP half a dump")

    def swept() -> bool:
        return dead not in scratch_of(dbname) and not partial.exists()

    wait_for("the reconciler to remove the dead run's leftovers", swept, 60, world.logs)
    assert scratch_of(dbname, live_run) == [live]  # the live rehearsal's copy is there
    assert world.run(dbname, live_run)["state"] == "running"
    assert foreign in scratch_of(other_db) and unknown in scratch_of(dbname)
    assert len(worker.removals(f"scratch database {dead}")) == 1
    assert len(worker.removals(f"partial dump file {partial}")) == 1

    gate.release()
    run = world.finish(dbname, live_run)
    assert run["state"] == "succeeded", (run, world.logs())
    assert worker.removals(f"scratch database {live}") == []  # it dropped its own copy
    assert scratch_of(dbname, live_run) == []

    # Once the worker knows the other target, that target's ledger proves its run dead.
    world.config.add(other, **other_options)
    wait_for("the other target's leftover to go", lambda: foreign not in scratch_of(other_db), 60)
    assert len(worker.removals(f"scratch database {foreign}")) == 1
    # One no ledger can prove dead stays, through a later pass (which removes a marker), and
    # the doctor says so.
    marker = f"runbook_scratch_{tag}_{ended}_d1_v0d0d"
    admin_exec(f'CREATE DATABASE "{marker}"')
    wait_for("one more reconciler pass", lambda: marker not in scratch_of(dbname), 60)
    assert unknown in scratch_of(dbname)
    [found] = doctor(world, name)["unknown_scratch"]
    assert unknown in found["message"] and f'DROP DATABASE "{unknown}"' in found["fix"]
