"""Real services for integration tests: Postgres, Redis and a real Celery worker process.

A missing service skips these tests locally and fails them under CI (CI=true). Each test
gets databases of its own; the worker re-reads the shared runbook.toml on every task, so a
test adds its targets to that file and the running worker sees them.
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
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import pytest
import redis as redis_lib

from tests.projects import Rev as _Rev

REPO = Path(__file__).resolve().parents[2]
ADMIN_URL = os.environ.get(
    "RUNBOOK_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# A Redis database per test process (pytest-xdist's gw0, gw1 …: 10, 11 …, 15 at most): a
# Flower started by one process lists the tasks whose events reach its broker, and the other
# process's tasks would crowd its Tasks page (15 rows); queues are per process already.
_PROCESS = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
REDIS_URL = os.environ.get("RUNBOOK_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{10 + _PROCESS % 6}")
SESSION = uuid.uuid4().hex[:8]
# The console script pip installed next to this interpreter ([project.scripts]).
RUNBOOK = str(Path(sys.executable).parent / "runbook")
QUEUE = f"runbook-test-{SESSION}"

# The test process and the worker share these, set before worker.app is first imported.
os.environ["CELERY_BROKER_URL"] = REDIS_URL
os.environ["CELERY_RESULT_BACKEND"] = REDIS_URL
os.environ["RUNBOOK_QUEUE"] = QUEUE


def under_ci() -> bool:
    """Whether this is CI, as CI systems say it (CI=true, CI=1, CI=yes)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def missing(what: str) -> None:
    """Skip for lack of ``what`` locally; under CI a missing thing is a failure."""
    if under_ci():
        pytest.fail(f"{what} (CI is set: integration tests must run)", pytrace=False)
    pytest.skip(what)


def _pg_ok() -> str | None:
    try:
        psycopg2.connect(ADMIN_URL, connect_timeout=3).close()
        return None
    except psycopg2.Error:
        return (
            f"PostgreSQL is not reachable at {ADMIN_URL}; start it (e.g. `docker compose up -d "
            "postgres redis`)"
        )


def _redis_ok() -> str | None:
    try:
        redis_lib.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
        return None
    except redis_lib.RedisError:
        return (
            f"Redis is not reachable at {REDIS_URL}; start it (e.g. `docker compose up -d redis`)"
        )


@pytest.fixture(scope="session")
def services() -> None:
    for problem in (_pg_ok(), _redis_ok()):
        if problem:
            missing(problem)


def admin_exec(sql: str, dbname: str = "postgres") -> None:
    conn = psycopg2.connect(ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def db_url(dbname: str, user: str = "postgres", password: str | None = None) -> str:
    host = ADMIN_URL.split("@", 1)[1].rsplit("/", 1)[0]
    auth = f"{user}:{password}" if password else user
    return f"postgresql://{auth}@{host}/{dbname}"


class Databases:
    """Creates scratch databases and drops them when the test ends."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def create(self, template: str | None = None, owner: str | None = None) -> str:
        name = f"rb_{SESSION}_{uuid.uuid4().hex[:8]}"
        extra = f" TEMPLATE {template}" if template else ""
        extra += f" OWNER {owner}" if owner else ""
        admin_exec(f"CREATE DATABASE {name}{extra}")
        self.created.append(name)
        return name

    def drop_all(self) -> None:
        for name in self.created:
            admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def databases(services: None) -> Iterator[Databases]:
    dbs = Databases()
    yield dbs
    dbs.drop_all()


class Config:
    """The runbook.toml shared by the test process and the worker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.targets: dict[str, dict[str, object]] = {}
        self.groups: dict[str, dict[str, object]] = {}
        self.control: dict[str, object] | None = None
        self.write()

    def add(self, name: str, **options: object) -> str:
        self.targets[name] = options
        self.write()
        return name

    def add_group(self, name: str, **options: object) -> str:
        """A [groups.NAME] (tests/integration/fleet_support.py makes its members)."""
        self.groups[name] = options
        self.write()
        return name

    def write(self) -> None:
        lines = []
        tables = [(f"targets.{n}", o) for n, o in self.targets.items()]
        tables += [(f"groups.{n}", o) for n, o in self.groups.items()]
        if self.control is not None:
            tables.append(("control", self.control))
        for table, options in tables:
            lines.append(f"[{table}]")
            for key, value in options.items():
                if isinstance(value, bool):
                    lines.append(f"{key} = {'true' if value else 'false'}")
                elif isinstance(value, list):
                    lines.append(f"{key} = {json.dumps(value)}")
                elif isinstance(value, int | float):
                    lines.append(f"{key} = {value}")
                else:
                    lines.append(f"{key} = {json.dumps(str(value))}")
            lines.append("")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines))
        tmp.replace(self.path)


@pytest.fixture(scope="session")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    path = tmp_path_factory.mktemp("config") / "runbook.toml"
    os.environ["RUNBOOK_CONFIG"] = str(path)
    return Config(path)


@pytest.fixture(scope="module")
def control_db(config: Config) -> Iterator[str]:
    """A control database for the test module, named in the shared runbook.toml while the
    module runs (rollouts, tests/integration/fleet_support.py): the other modules' tests see
    no [control], as a user without fleets has none."""
    name = f"rb_{SESSION}_control_{uuid.uuid4().hex[:6]}"
    admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin_exec(f"CREATE DATABASE {name}")
    config.control = {"url": db_url(name)}
    config.write()
    yield name
    config.control = None
    config.write()
    admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Worker:
    def __init__(self, config: Config, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, concurrency: int = 2, **env_overrides: str) -> None:
        """Start the worker. The shared one runs no reconciler (RUNBOOK_RECONCILE_S=0): tests
        that leave a run hanging on purpose decide themselves when it is sent again; tests of
        the reconciler start their own worker with it on."""
        env = {
            **os.environ,
            "RUNBOOK_CONFIG": str(self.config.path),
            "PYTHONUNBUFFERED": "1",
            "RUNBOOK_RECONCILE_S": "0",
            **env_overrides,
        }
        self.log = self.log_path.open("ab")
        # As a user starts it: the installed command, its queue from RUNBOOK_QUEUE and its
        # default log level; Celery's own options pass through.
        self.proc = subprocess.Popen(
            [
                RUNBOOK,
                "worker",
                "-c",
                str(concurrency),
                "--pool",
                "prefork",
                "-n",
                f"test-{SESSION}-{uuid.uuid4().hex[:4]}@%h",
            ],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_text()[-3000:]}")
            if "ready." in self.log_text():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker did not become ready:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def celery_pid(self) -> int:
        """The Celery main process that `runbook worker` (worker/supervise.py) runs."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        (pid,) = out.stdout.split()
        return int(pid)

    def pool_pids(self) -> list[str]:
        """Celery's pool processes: what a deploy's or the OOM killer's SIGKILL hits."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.celery_pid())], capture_output=True, text=True
        )
        return out.stdout.split()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def worker(
    services: None, config: Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    w = Worker(config, tmp_path_factory.mktemp("worker") / "worker.log")
    w.start()
    yield w
    w.stop()
    redis_lib.Redis.from_url(REDIS_URL).delete(QUEUE)


def project_target(
    config: Config, databases: Databases, tmp_path: Path, revisions: list[Any], **options: object
) -> tuple[str, str]:
    """A new database and a target for it running a project of ``revisions``; (name, db)."""
    from tests.projects import write_project

    dbname = databases.create()
    name = f"t_{dbname}"
    options.setdefault("backup_dir", str(tmp_path / "backups"))
    config.add(
        name,
        url=db_url(dbname),
        alembic_ini=str(write_project(tmp_path / "p", revisions)),
        **options,
    )
    return name, dbname


# Waits for a row in `gate` (0.05 s a look, 2400 looks at most), then goes on.
GATED: list[Any] = [
    _Rev(
        "g1",
        'op.execute("DO $$ BEGIN FOR i IN 1..2400 LOOP EXIT WHEN EXISTS (SELECT 1 FROM gate); '
        'PERFORM pg_sleep(0.05); END LOOP; END $$")\n'
        "op.execute('CREATE TABLE gated (id int PRIMARY KEY)')",
        "op.execute('DROP TABLE gated')",
    ),
]


def gated_target(
    config: Config, databases: Databases, tmp_path: Path, **options: object
) -> tuple[str, str]:
    """A target whose run waits in its upgrade until ``open_gate``; (name, database)."""
    name, dbname = project_target(config, databases, tmp_path, GATED, backup=False, **options)
    query(dbname, "CREATE TABLE gate (opened_at timestamptz NOT NULL DEFAULT now())")
    return name, dbname


def open_gate(dbname: str) -> None:
    query(dbname, "INSERT INTO gate DEFAULT VALUES")


def until(what: str, check: Any, timeout_s: float) -> Any:
    """Poll ``check`` until it returns something true; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out ({timeout_s:.0f}s) waiting for {what}")
        time.sleep(0.1)


def upgrade_running(run_id: str, target: str) -> bool:
    from jobs import api

    steps = api.status(run_id, target)["steps"]
    return any(s["kind"] == "upgrade" and s["state"] == "running" for s in steps)


def query(dbname: str, sql: str) -> list[tuple[Any, ...]]:
    """Run one statement in ``dbname`` (committed); its rows, if it returns any."""
    conn = psycopg2.connect(db_url(dbname))
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.commit()
        conn.close()


def reference_copy(tmp_path: Path, extra: str | None = None) -> Path:
    """A copy of the reference project (alembic.ini, migrations/), plus an ``extra`` revision
    file when given; the copy's alembic.ini."""
    root = tmp_path / "app"
    shutil.copytree(
        REPO / "migrations", root / "migrations", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "alembic.ini", root / "alembic.ini")
    if extra:
        (root / "migrations" / "versions" / "extra_revision.py").write_text(extra)
    return root / "alembic.ini"


def seeded_reference_db(databases: Databases, ini: Path, large_rows: int = 2000) -> str:
    """A new database at the reference history's first revision (plain alembic CLI), seeded."""
    from migrations.seed import seed

    dbname = databases.create()
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "w5x6y7z8a9b0"],
        env={"DATABASE_URL": db_url(dbname), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )
    conn = psycopg2.connect(db_url(dbname))
    with conn:
        seed(conn, large_rows=large_rows)
    conn.close()
    return dbname


def schema_dump(dbname: str, *, with_ledger: bool = False) -> str:
    """pg_dump --schema-only of a database, without the lines that differ on every call."""
    cmd = ["pg_dump", "--schema-only", "-d", db_url(dbname)]
    if not with_ledger:
        cmd.append("--exclude-schema=runbook")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # pg_dump 15.14+ brackets its output with \\restrict lines holding a random key.
    skip = ("--", "\\restrict", "\\unrestrict")
    return "\n".join(line for line in out.splitlines() if not line.startswith(skip))


def runbook_cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    prefix: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the installed `runbook` command as a user would (under ``prefix``, e.g. setpriv)."""
    return subprocess.run(
        [*(prefix or []), RUNBOOK, *args],
        cwd=REPO,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class PrivatePostgres:
    """A PostgreSQL instance of a test's own, with password (scram) authentication.

    The shared server trusts every local login, so wrong-password and secret-leak tests need
    their own. initdb refuses root, so the cluster runs as the postgres OS user.
    """

    def __init__(self, port: int) -> None:
        import glob
        import shutil
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins or not shutil.which("runuser"):
            missing("no PostgreSQL server binaries to start a private instance")
        self.bin = Path(bins[-1])
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="rb-pg-", dir="/tmp"))
        self.root.chmod(0o755)
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self._as_pg(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
        )
        self._as_pg(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-o",
            f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1",
            "start",
        )

    def _as_pg(self, *cmd: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd],
            check=True,
            capture_output=True,
            cwd=self.root,
        )

    def admin(self, sql: str, dbname: str = "postgres") -> None:
        conn = psycopg2.connect(host=str(self.root), port=self.port, user="postgres", dbname=dbname)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def stop(self) -> None:
        import shutil

        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def private_pg(services: None) -> Iterator[PrivatePostgres]:
    import socket

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg = PrivatePostgres(port)
    yield pg
    pg.stop()


# -- Flower ------------------------------------------------------------------------------------

T = TypeVar("T")

# Flower's own login, not the database's.
FLOWER_USER = "runbook"
FLOWER_PASSWORD = "flower-" + secrets.token_hex(6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Flower:
    """``celery flower`` as an operator starts it, against the test worker's Redis.

    Flower knows tasks only from Celery's events, and only those sent after it subscribed.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """How this Flower is started: plain `celery flower`, not persistent."""
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            # A celery option: after `flower` it would be dropped with a warning.
            f"--broker={REDIS_URL}",
            "flower",
            "--address=127.0.0.1",
            f"--port={self.port}",
            f"--basic-auth={FLOWER_USER}:{FLOWER_PASSWORD}",
            "--persistent=False",
            f"--db={self.log_path.with_name('flower-state')}",  # unused while not persistent
        ]

    def start(self, timeout_s: float = 30, **env_extra: str) -> None:
        # FLOWER_* variables of the machine would change Flower's options (auth among them).
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
        env.update(PYTHONUNBUFFERED="1", **env_extra)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        self.until("Flower to answer HTTP", lambda: self.get("/healthcheck")[0] == 200, deadline)
        self.until("Flower to receive events", self._probe_events, deadline)

    def _probe_events(self) -> bool:
        """Events are Redis pub/sub: only those sent after Flower subscribed reach it. A
        made-up task-sent event that Flower then knows proves it is listening."""
        from worker.app import app

        probe = f"flower-probe-{SESSION}"
        with app.events.default_dispatcher(hostname=f"probe-{SESSION}@test") as dispatcher:
            dispatcher.send("task-sent", uuid=probe, name="runbook.test_probe")
        time.sleep(0.1)
        return self.get(f"/api/task/info/{probe}")[0] == 200

    def get(self, path: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
        """(status, body) of a GET; with Flower's credentials unless ``auth`` says others.
        A connection refused is status 0."""
        user, password = auth or (FLOWER_USER, FLOWER_PASSWORD)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if user:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (ConnectionError, urllib.error.URLError):
            return 0, ""

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        if status != 200:
            pytest.fail(f"GET {path}: HTTP {status} {body[:500]}\n{self.report()}")
        return json.loads(body)

    def until(self, what: str, check: Callable[[], T | None], deadline: float) -> T:
        """Poll ``check`` until it returns something true; fail with Flower's log at the
        deadline or when Flower has exited."""
        while True:
            value = check()
            if value:
                return value
            if self.proc is None or self.proc.poll() is not None:
                pytest.fail(f"Flower exited while waiting for {what}\n{self.report()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{self.report()}")
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def report(self) -> str:
        return f"--- Flower log ({self.log_path}) ---\n{self.log_text()[-4000:]}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


@pytest.fixture
def flower(worker: Worker, tmp_path: Path) -> Iterator[Flower]:
    """A Flower process of the test's own, listening to the session worker's events."""
    f = Flower(tmp_path / "flower.log")
    try:
        f.start()
        yield f
    finally:
        f.stop()
        # pytest shows a teardown's output only when the test failed.
        print(f.report())
        print(f"--- worker log (tail) ---\n{worker.log_text()[-3000:]}")


def json_strings(value: Any) -> Iterator[str]:
    """Every key and string value in decoded JSON, at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from json_strings(v)
