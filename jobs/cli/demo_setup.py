"""What ``runbook demo`` sets up: the scratch database, the reference app's initial schema and
seed rows, a runbook.toml, and a worker of its own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from jobs import dispatch
from jobs.config import DEFAULT_QUEUE, normalize_url, redact
from jobs.errors import BrokerUnavailable, DemoError, DemoSetupError, RunbookError
from jobs.pg.url import PgURL

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_DB = "runbook_demo"
DEFAULT_ROWS = 20_000
INITIAL_REVISION = "w5x6y7z8a9b0"  # the reference history's first revision
TARGET = "demo"
START_HINT = "start them with `docker compose up -d postgres redis`"
_DB_NAME = re.compile(r"^runbook_demo[a-z0-9_]{0,50}$")


# -- configuration ---------------------------------------------------------------------------


def admin_url() -> PgURL:
    raw = os.environ.get("RUNBOOK_DEMO_ADMIN_URL") or DEFAULT_ADMIN_URL
    try:
        return normalize_url(raw, "RUNBOOK_DEMO_ADMIN_URL")
    except RunbookError as exc:
        raise DemoSetupError(str(exc)) from None


def db_name() -> str:
    name = os.environ.get("RUNBOOK_DEMO_DB") or DEFAULT_DB
    if not _DB_NAME.match(name):
        raise DemoSetupError(
            f"RUNBOOK_DEMO_DB={name!r}: the demo drops and recreates this database, so its "
            "name must start with runbook_demo (lower-case letters, digits, '_')"
        )
    return name


def env_number(var: str, default: float, minimum: float) -> float:
    raw = os.environ.get(var)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise DemoSetupError(f"{var}={raw!r}: expected a number >= {minimum:g}")
    return value


def reference_alembic_ini() -> Path:
    """The reference project's alembic.ini: next to the jobs package (a checkout or an
    editable install), else in the working directory (the compose image's /app)."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "alembic.ini",
        Path.cwd() / "alembic.ini",
    ):
        if candidate.is_file():
            return candidate
    raise DemoSetupError(
        "the reference project's alembic.ini was not found next to the jobs package nor in "
        "the current directory; run the demo from runbook's checkout"
    )


def demo_backup_dir() -> Path:
    base = os.environ.get("RUNBOOK_BACKUP_DIR")
    return (Path(base) if base else Path("backups")).absolute() / "demo"


def _psycopg2_dsn(url: PgURL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def where_is(url: PgURL) -> str:
    return f"{url.host or 'localhost'}:{url.port or 5432}"


# -- services --------------------------------------------------------------------------------


def postgres_problem(admin: PgURL) -> str | None:
    import psycopg2

    try:
        psycopg2.connect(_psycopg2_dsn(admin), connect_timeout=3).close()
    except psycopg2.Error as exc:
        text = str(exc).strip()
        low = text.lower()
        down = ("could not connect", "connection refused", "timeout", "translate host")
        if any(s in low for s in down):
            return f"PostgreSQL is not reachable at {where_is(admin)} (RUNBOOK_DEMO_ADMIN_URL)"
        first = redact(text.splitlines()[0] if text else type(exc).__name__)
        raise DemoSetupError(
            f"PostgreSQL at {where_is(admin)} refused the demo's connection ({first}); check the "
            "user, password and database in RUNBOOK_DEMO_ADMIN_URL"
        ) from None
    return None


def broker_problem(broker: str) -> str | None:
    broker_queue = dispatch.connect(broker, DEFAULT_QUEUE)
    try:
        broker_queue.check_broker()
    except BrokerUnavailable:
        return (
            f"the broker (Redis) is not reachable at {broker_queue.safe_url()} (CELERY_BROKER_URL)"
        )
    return None


# -- the scratch database --------------------------------------------------------------------


def recreate_database(admin: PgURL, name: str) -> None:
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(_psycopg2_dsn(admin), connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            cur.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(name), sql.Literal("runbook demo scratch database")
                )
            )
    except psycopg2.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DemoError(f"cannot recreate database {name}: {redact(first)}") from None
    finally:
        conn.close()


def migrate_to_initial(alembic_ini: Path, url: PgURL) -> Path:
    """Bring the scratch database to the first revision; the project's script directory."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    cfg = Config(str(alembic_ini))
    rendered = url.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False  # keep alembic.ini's logging out of the demo
    try:
        command.upgrade(cfg, INITIAL_REVISION)
    except CommandError as exc:
        raise DemoError(
            f"{alembic_ini}: alembic upgrade {INITIAL_REVISION} failed: {exc}"
        ) from None
    return Path(ScriptDirectory.from_config(cfg).dir)


def seed_large_table(script_dir: Path, url: PgURL, rows: int) -> None:
    import psycopg2

    path = script_dir / "seed.py"
    spec = importlib.util.spec_from_file_location("_runbook_demo_seed", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise DemoError(f"{path} not found; the reference project's seed data is missing")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    conn = psycopg2.connect(_psycopg2_dsn(url), connect_timeout=5)
    try:
        module.seed(conn, large_rows=rows)
        conn.commit()
    finally:
        conn.close()


def large_table_counts(url: PgURL) -> tuple[int, int] | None:
    import psycopg2

    try:
        conn = psycopg2.connect(_psycopg2_dsn(url), connect_timeout=5)
    except psycopg2.Error:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*), count(new_column) FROM large_table")
            row = cur.fetchone()
            return (int(row[0]), int(row[1])) if row else None
    except psycopg2.Error:
        return None
    finally:
        conn.close()


def write_config(path: Path, url: PgURL, alembic_ini: Path, backup_dir: Path) -> None:
    lines = [
        f"[targets.{TARGET}]",
        f"url = {json.dumps(url.render_as_string(hide_password=False))}",
        f"alembic_ini = {json.dumps(str(alembic_ini))}",
        f"backup_dir = {json.dumps(str(backup_dir))}",
        "",
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the URL
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


# -- the worker ------------------------------------------------------------------------------


class DemoWorker:
    """A real worker subprocess on the demo's own queue (``dispatcher``'s)."""

    def __init__(self, workdir: Path, dispatcher: dispatch.Dispatcher, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.dispatcher = dispatcher
        self.env = env
        self.nodename = f"runbook-demo-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.log_path = workdir / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        args = self.dispatcher.worker_command(
            [
                "-c",
                "1",
                "-n",
                self.nodename,
                "--without-mingle",
                "--without-gossip",
                "--loglevel",
                "WARNING",
            ]
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                args,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one, Ctrl-C aside
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(
                    f"the worker exited at start (code {self.proc.returncode}); its log ends "
                    f"with:\n{self.log_tail()}"
                )
            if self.dispatcher.ping_worker(self.nodename, 0.5):
                return
        raise DemoError(
            f"the worker did not answer a ping within {timeout_s:.0f}s; its log ends with:\n"
            f"{self.log_tail()}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return redact("\n".join(text.strip().splitlines()[-lines:]))

    def stop(self) -> None:
        """SIGTERM to the worker's process group (warm shutdown), SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            proc.wait(10)
