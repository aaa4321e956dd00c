"""Chaos-test support: services a test owns and may kill, and the module's summary.

Each chaos test gets a :class:`Stage`: a private PostgreSQL (conftest's PrivatePostgres, plus
restart), a private Redis without persistence (killing it loses every message, like ours),
its own runbook.toml naming one target, and worker processes bound to that Redis with a
short lease and a fast reconciler. Workers are killed as a whole (main process and pool, one
SIGKILL to the process group) and replaced by new ones, as after a host dies.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import psycopg2
import redis as redis_lib

from jobs import api
from jobs.config import Settings, load_settings
from tests.integration.conftest import (
    QUEUE,
    REPO,
    Config,
    PrivatePostgres,
    Worker,
    missing,
    runbook_cli,
)
from tests.projects import Rev, write_project

T = TypeVar("T")

LEASE_S = 3  # RUNBOOK_LEASE_S of the chaos workers
RECONCILE_S = 1  # RUNBOOK_RECONCILE_S of the chaos workers
POLL_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TimedOut(Exception):
    """Raised when something a chaos test waits for does not happen by its deadline."""


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, explain: Any = "") -> T:
    """Poll ``probe`` until it returns something truthy; TimedOut naming ``what`` at the
    deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() >= deadline:
            detail = explain() if callable(explain) else explain
            raise TimedOut(f"timed out after {timeout_s:.0f}s waiting for {what}\n{detail}")
        time.sleep(POLL_S)


class PrivateRedis:
    """A redis-server of a test's own on a free port, with no persistence: a SIGKILL loses
    every queued message, and ``start`` brings it back, empty, on the same port."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            missing("no redis-server binary to start a private Redis")
        self.binary = str(binary)
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2)

    def start(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
            try:
                return bool(self.client().ping())
            except redis_lib.RedisError:
                return False

        wait_for(f"redis-server on port {self.port}", up, 20)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; everything it held is gone."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def queued(self) -> list[tuple[str, list[Any]]]:
        """The task messages waiting in the queue: (task name, arguments)."""
        found = []
        for raw in self.client().lrange(QUEUE, 0, -1):
            message = json.loads(raw)
            args = json.loads(base64.b64decode(message["body"]))[0]
            found.append((str(message["headers"]["task"]), list(args)))
        return found

    def messages(self) -> int:
        """Task messages it holds: queued, or delivered and not yet acknowledged."""
        client = self.client()
        return int(client.llen(QUEUE)) + int(client.hlen("unacked"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


class ChaosPostgres(PrivatePostgres):
    """conftest's private PostgreSQL, which a test may also restart under a running worker.

    initdb costs seconds on a busy machine: the first instance of a process is made by
    PrivatePostgres itself and, stopped, becomes the template every instance starts from as
    a copy of its own (its own data directory, port and socket directory).
    """

    _template: ClassVar[PrivatePostgres | None] = None

    def __init__(self, port: int) -> None:  # the template ran PrivatePostgres.__init__
        template = self.template()
        self.bin, self.port = template.bin, port
        self.root = Path(tempfile.mkdtemp(prefix="rb-chaos-pg-", dir="/tmp"))
        self.root.chmod(0o755)
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        subprocess.run(["cp", "-a", str(template.data), str(self.data)], check=True)
        options = f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1"
        self.pg_ctl("-w", "-o", options, "start")

    @classmethod
    def template(cls) -> PrivatePostgres:
        if cls._template is None:
            made = PrivatePostgres(free_port())
            made._as_pg(str(made.bin / "pg_ctl"), "-D", str(made.data), "-m", "fast", "-w", "stop")
            cls._template = made
        return cls._template

    @classmethod
    def discard_template(cls) -> None:
        if cls._template is not None:
            cls._template.stop()
            cls._template = None

    def pg_ctl(self, *args: str) -> None:
        # -l keeps the server's output off our pipe (else the call waits for the server).
        self._as_pg(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), *args
        )

    def restart(self) -> None:
        """pg_ctl restart -m fast: every session is terminated, running transactions abort."""
        self.pg_ctl("-m", "fast", "-w", "restart")

    def connect(self, dbname: str) -> Any:
        """An autocommit superuser session over the socket directory (trusted)."""
        conn = psycopg2.connect(
            host=str(self.root), port=self.port, user="postgres", dbname=dbname, connect_timeout=3
        )
        conn.autocommit = True
        return conn

    def app_database(self) -> tuple[str, str]:
        """A role with a password (CREATEDB: backups are verified in a scratch database) and
        a database it owns; (url, database)."""
        password = secrets.token_hex(8)
        self.admin(f"CREATE ROLE chaos LOGIN CREATEDB PASSWORD '{password}'")
        self.admin("CREATE DATABASE app OWNER chaos")
        return f"postgresql://chaos:{password}@127.0.0.1:{self.port}/app", "app"


@dataclass
class Entry:
    """One fault's line in the summary."""

    fault: str
    injected: int = 0
    runs: int = 0
    finished: int = 0
    rows: int | None = None  # backfill rows checked; None: the fault's run has no backfill
    lost: int = 0
    twice: int = 0
    end: str = "-"
    seconds: float = 0.0
    passed: bool = False
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def rows_cell(self, value: int) -> str:
        return "n/a" if self.rows is None else f"{value} of {self.rows}"


class Summary:
    """The chaos module's results, one line per fault; printed and written when it ends."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.seed = int(os.environ.get("RUNBOOK_CHAOS_SEED") or secrets.randbits(32))

    def add(self, fault: str) -> Entry:
        entry = Entry(fault)
        self.entries.append(entry)
        return entry

    def table(self) -> str:
        lines = [
            "| fault | times injected | runs finished | end state | rows lost "
            "| rows applied twice | seconds |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        for e in self.entries:
            end = e.end if e.passed else f"FAILED ({e.end})"
            lines.append(
                f"| {e.fault} | {e.injected} | {e.finished}/{e.runs} | {end} "
                f"| {e.rows_cell(e.lost)} | {e.rows_cell(e.twice)} | {e.seconds:.0f} |"
            )
        lines.append("")
        for e in self.entries:
            lines += [f"- {e.fault}: {note}" for note in e.notes]
        lines.append(
            f"Lease {LEASE_S} s, reconciler every {RECONCILE_S} s; random kill points seed "
            f"{self.seed} (RUNBOOK_CHAOS_SEED={self.seed} repeats them)."
        )
        return "\n".join(lines)

    def write(self) -> Path:
        path = Path(
            os.environ.get("RUNBOOK_CHAOS_SUMMARY")
            or Path(tempfile.gettempdir()) / "runbook-chaos-summary.md"
        )
        path.write_text(self.table() + "\n")
        return path


class Stage:
    """One chaos test's world: private Postgres and Redis, a target, workers to kill."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.name = "chaos"
        self.workers: list[Worker] = []
        self._lock = threading.Lock()
        self.redis = PrivateRedis(tmp_path)
        try:
            self.pg = ChaosPostgres(free_port())
        except BaseException:  # a skip (no server binaries) included: leave nothing running
            self.redis.stop()
            raise
        try:
            self.url, self.dbname = self.pg.app_database()
        except BaseException:
            self.close()
            raise
        self.config = Config(tmp_path / "runbook.toml")

    # -- setup ---------------------------------------------------------------------------

    def target(self, revisions: list[Rev], **options: object) -> None:
        options.setdefault("backup_dir", str(self.tmp / "backups"))
        ini = write_project(self.tmp / "project", revisions)
        self.config.add(self.name, url=self.url, alembic_ini=str(ini), **options)

    @property
    def env(self) -> dict[str, str]:
        """What points a process at this stage: its config and its Redis."""
        return {
            "RUNBOOK_CONFIG": str(self.config.path),
            "CELERY_BROKER_URL": self.redis.url,
            "CELERY_RESULT_BACKEND": self.redis.url,
        }

    @property
    def settings(self) -> Settings:
        return load_settings(self.config.path)

    # -- workers -------------------------------------------------------------------------

    def start_worker(self, concurrency: int = 2) -> Worker:
        return self._started(concurrency)

    def start_workers(self, count: int, concurrency: int = 1) -> list[Worker]:
        """Start ``count`` workers at once (each waits to be ready in a thread of its own)."""
        with ThreadPoolExecutor(count) as pool:
            started = [pool.submit(self._started, concurrency) for _ in range(count)]
            return [f.result() for f in started]

    def _started(self, concurrency: int) -> Worker:
        with self._lock:
            worker = Worker(self.config, self.tmp / f"worker-{len(self.workers) + 1}.log")
            self.workers.append(worker)
        worker.start(
            concurrency,
            **self.env,
            RUNBOOK_LEASE_S=str(LEASE_S),
            RUNBOOK_RECONCILE_S=str(RECONCILE_S),
        )
        return worker

    def kill_workers(self) -> None:
        """SIGKILL every live worker's whole process group: main process, pool, and the
        pg_dump / psql they started. Nothing gets to clean up, ack or record."""
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait(10)
                worker.proc = None

    def logs(self, tail: int | None = 4000) -> str:
        """The workers' logs (the last ``tail`` characters of each; None: whole)."""
        return "\n".join(
            f"--- {w.log_path.name}\n{w.log_text()[-tail if tail else 0 :]}" for w in self.workers
        )

    def close(self) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait(10)
        self.redis.stop()
        self.pg.stop()

    # -- the CLI and the ledger ----------------------------------------------------------

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return runbook_cli(*args, env=self.env, timeout=120)

    def apply(self) -> str:
        """Enqueue an apply to head as a user would (the CLI); the run id."""
        done = self.cli("apply", "--target", self.name)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def send_task(self, task: str, *args: object) -> None:
        """Send a task message as runbook does, on this stage's Redis (a duplicate delivery).

        From a process of its own: Celery reads CELERY_BROKER_URL from the environment before
        any broker given in code, and this test process's points at the shared test Redis.
        """
        code = (
            "import json, sys\n"
            "from worker.app import app\n"
            "app.send_task(sys.argv[1], args=json.loads(sys.argv[2]), queue=sys.argv[3])\n"
        )
        subprocess.run(
            [sys.executable, "-c", code, task, json.dumps(list(args)), QUEUE],
            cwd=REPO,
            env={**os.environ, **self.env},
            check=True,
            capture_output=True,
            timeout=60,
        )

    def tools_running(self, *names: str) -> bool:
        """Whether a worker's process group runs one of the programs ``names`` right now."""
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                found = subprocess.run(
                    ["pgrep", "-g", str(worker.proc.pid), "-x", "|".join(names)],
                    capture_output=True,
                )
                if found.returncode == 0:
                    return True
        return False

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        """Rows of one statement in the app database (as superuser; autocommit)."""
        conn = self.pg.connect(self.dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def probe(self, statement: str) -> list[tuple[Any, ...]] | None:
        """Like sql(), but None while the database is away (restarting)."""
        try:
            return self.sql(statement)
        except psycopg2.OperationalError:
            return None

    def step(self, kind: str, revision: str | None, state: str = "running") -> bool:
        rows = self.probe(
            f"SELECT 1 FROM runbook.steps WHERE kind = '{kind}' "
            f"AND revision = '{revision or ''}' AND state = '{state}'"
        )
        return bool(rows)

    def session(self, where: str) -> bool:
        """Whether some other active session of the app database matches ``where``
        (pg_stat_activity columns)."""
        rows = self.probe(
            "SELECT 1 FROM pg_stat_activity WHERE datname = 'app' AND state = 'active' "
            f"AND pid <> pg_backend_pid() AND ({where})"
        )
        return bool(rows)

    def scratch_databases(self) -> list[str]:
        """The scratch databases backups are verified in that exist right now."""
        rows = self.probe("SELECT datname FROM pg_database WHERE datname LIKE 'runbook_scratch_%'")
        return [str(r[0]) for r in rows or []]

    def rows_done(self, backfill_id: str) -> tuple[str, int] | None:
        rows = self.probe(
            "SELECT b.state, coalesce(sum(s.rows_done), 0) FROM runbook.backfills b "
            "LEFT JOIN runbook.backfill_slices s ON s.backfill_id = b.id "
            f"WHERE b.id = '{backfill_id}' GROUP BY b.state"
        )
        return (str(rows[0][0]), int(rows[0][1])) if rows else None

    def backfill_of(self, run_id: str) -> str:
        def found() -> str | None:
            rows = self.probe(f"SELECT id FROM runbook.backfills WHERE run_id = '{run_id}'")
            return str(rows[0][0]) if rows else None

        return wait_for(f"run {run_id}'s backfill", found, 60, self.logs)

    def finish(self, run_id: str, timeout_s: float = 120) -> dict[str, Any]:
        """Wait (polling the ledger, through restarts) for the run to end; its record."""

        def ended() -> bool:
            rows = self.probe(
                f"SELECT finished_at IS NOT NULL FROM runbook.runs WHERE id = '{run_id}'"
            )
            return bool(rows and rows[0][0])

        wait_for(f"run {run_id} to end", ended, timeout_s, lambda: self.explain(run_id))
        return api.status(run_id, self.name, settings=self.settings)

    def explain(self, run_id: str) -> str:
        """The run, its steps and the workers' logs, for a failure message."""
        try:
            run = api.status(run_id, self.name, settings=self.settings)
            record = json.dumps(
                {
                    **{k: run[k] for k in ("state", "error", "deliveries", "current_revision")},
                    "steps": [
                        (s["kind"], s["revision"], s["state"], s["attempts"], s["error"])
                        for s in run["steps"]
                    ],
                },
                indent=1,
                default=str,
            )
        except Exception as exc:  # the explanation must not hide the failure
            record = f"(ledger unreadable: {exc})"
        try:
            lease = self.sql(
                f"SELECT heartbeat_at, heartbeat_by, unfinished, updated_at, now() "
                f"FROM runbook.runs WHERE id = '{run_id}'"
            )
            slices = self.sql(
                "SELECT backfill_id, slice, state, generation, cursor, rows_done, unfinished, "
                "updated_at FROM runbook.backfill_slices ORDER BY 1, 2"
            )
        except psycopg2.Error as exc:
            lease, slices = [], [(f"unreadable: {exc}",)]
        return f"run: {record}\nlease: {lease}\nslices: {slices}\n{self.logs()}"

    def counters(self, table: str) -> tuple[int, int, int]:
        """(rows, rows never updated, rows updated more than once) of a counter table."""
        [(rows, lost, twice)] = self.sql(
            f"SELECT count(*), count(*) FILTER (WHERE counter = 0), "
            f"count(*) FILTER (WHERE counter > 1) FROM {table}"
        )
        return int(rows), int(lost), int(twice)

    def batch_rows(self, backfill_id: str) -> int:
        [(total,)] = self.sql(
            "SELECT coalesce(sum(rows), 0) FROM runbook.backfill_batches "
            f"WHERE backfill_id = '{backfill_id}'"
        )
        return int(total)
