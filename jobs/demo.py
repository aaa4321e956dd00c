"""``runbook demo``: the whole pipeline, end to end, against a scratch database.

It (re)creates a scratch database (``RUNBOOK_DEMO_DB``, default ``runbook_demo``) on the
PostgreSQL server of ``RUNBOOK_DEMO_ADMIN_URL``, brings it to the reference history's first
revision with Alembic, seeds it, starts a real Celery worker on a queue of its own, enqueues
"bring demo to head" through :mod:`jobs.api` exactly as a user's script would, follows the
run step by step and prints a summary. The worker is stopped however the demo ends; the
scratch database is left in place to be looked at.

Environment:

* ``RUNBOOK_DEMO_ADMIN_URL``: a maintenance database of the server the scratch database is
  created on (default ``postgresql://postgres@127.0.0.1:5432/postgres``);
* ``CELERY_BROKER_URL``: the broker (default ``redis://127.0.0.1:6379/0``);
* ``RUNBOOK_DEMO_DB``: the scratch database's name; it must start with ``runbook_demo``,
  since the demo drops and recreates it;
* ``RUNBOOK_DEMO_ROWS``: rows seeded into large_table (default 20000);
* ``RUNBOOK_DEMO_TIMEOUT``: seconds the run may take (default 600);
* ``RUNBOOK_BACKUP_DIR``: when set, backups go to its ``demo/`` (else ``./backups/demo``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.markup import escape
from sqlalchemy.engine import URL

from jobs.config import DEFAULT_BROKER, Settings, load_settings, normalize_url, redact
from jobs.errors import RunbookError
from jobs.states import SUCCEEDED, TERMINAL

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_DB = "runbook_demo"
DEFAULT_ROWS = 20_000
DEFAULT_TIMEOUT_S = 600.0
INITIAL_REVISION = "w5x6y7z8a9b0"  # the reference history's first revision
TARGET = "demo"
START_HINT = "start them with `docker compose up -d postgres redis`"
_DB_NAME = re.compile(r"^runbook_demo[a-z0-9_]{0,50}$")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

STATE_STYLE = {
    "succeeded": "green",
    "running": "yellow",
    "enqueued": "cyan",
    "failed": "bold red",
    "rolling_back": "magenta",
    "rolled_back": "magenta",
    "restored": "magenta",
    "skipped": "dim",
}


class DemoError(RunbookError):
    """Raised when the demo cannot go on; one line for the operator."""

    exit_code = 1


class DemoSetupError(DemoError):
    """Raised when the demo's input (environment, files) is unusable; nothing was changed."""

    exit_code = 2


# -- configuration ---------------------------------------------------------------------------


def _admin_url() -> URL:
    raw = os.environ.get("RUNBOOK_DEMO_ADMIN_URL") or DEFAULT_ADMIN_URL
    try:
        return normalize_url(raw, "RUNBOOK_DEMO_ADMIN_URL")
    except RunbookError as exc:
        raise DemoSetupError(str(exc)) from None


def _db_name() -> str:
    name = os.environ.get("RUNBOOK_DEMO_DB") or DEFAULT_DB
    if not _DB_NAME.match(name):
        raise DemoSetupError(
            f"RUNBOOK_DEMO_DB={name!r}: the demo drops and recreates this database, so its "
            "name must start with runbook_demo (lower-case letters, digits, '_')"
        )
    return name


def _number(var: str, default: float, minimum: float) -> float:
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


def _alembic_ini() -> Path:
    """The reference project's alembic.ini: next to the jobs package (a checkout or an
    editable install), else in the working directory (the compose image's /app)."""
    for candidate in (
        Path(__file__).resolve().parent.parent / "alembic.ini",
        Path.cwd() / "alembic.ini",
    ):
        if candidate.is_file():
            return candidate
    raise DemoSetupError(
        "the reference project's alembic.ini was not found next to the jobs package nor in "
        "the current directory; run the demo from runbook's checkout"
    )


def _backup_dir() -> Path:
    base = os.environ.get("RUNBOOK_BACKUP_DIR")
    return (Path(base) if base else Path("backups")).absolute() / "demo"


def _psycopg2_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _where(url: URL) -> str:
    return f"{url.host or 'localhost'}:{url.port or 5432}"


# -- services --------------------------------------------------------------------------------


def _postgres_problem(admin: URL) -> str | None:
    import psycopg2

    try:
        psycopg2.connect(_psycopg2_dsn(admin), connect_timeout=3).close()
    except psycopg2.Error as exc:
        text = str(exc).strip()
        low = text.lower()
        down = ("could not connect", "connection refused", "timeout", "translate host")
        if any(s in low for s in down):
            return f"PostgreSQL is not reachable at {_where(admin)} (RUNBOOK_DEMO_ADMIN_URL)"
        first = redact(text.splitlines()[0] if text else type(exc).__name__)
        raise DemoSetupError(
            f"PostgreSQL at {_where(admin)} refused the demo's connection ({first}); check the "
            "user, password and database in RUNBOOK_DEMO_ADMIN_URL"
        ) from None
    return None


def _broker_problem(broker: str) -> str | None:
    from kombu import Connection
    from kombu.utils.url import maybe_sanitize_url

    try:
        with Connection(broker, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
    except Exception:
        safe = maybe_sanitize_url(broker)
        return f"the broker (Redis) is not reachable at {safe} (CELERY_BROKER_URL)"
    return None


# -- the scratch database --------------------------------------------------------------------


def _recreate_database(admin: URL, name: str) -> None:
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


def _migrate_to_initial(alembic_ini: Path, url: URL) -> Path:
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


def _seed(script_dir: Path, url: URL, rows: int) -> None:
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


def _large_table_counts(url: URL) -> tuple[int, int] | None:
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


def _write_config(path: Path, url: URL, alembic_ini: Path, backup_dir: Path) -> None:
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
    """A real ``celery worker`` subprocess on the demo's own queue."""

    def __init__(self, workdir: Path, queue: str, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.queue = queue
        self.env = env
        self.nodename = f"runbook-demo-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.log_path = workdir / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "worker",
            "-Q",
            self.queue,
            "-c",
            "1",
            "-n",
            self.nodename,
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "WARNING",
        ]
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
        from worker.app import app

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(
                    f"the worker exited at start (code {self.proc.returncode}); its log ends "
                    f"with:\n{self.log_tail()}"
                )
            if app.control.ping(destination=[self.nodename], timeout=0.5):
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


def _forget_queue(broker: str, queue: str) -> None:
    """Best effort: remove the demo's queue (and its binding) from the broker."""
    from kombu import Connection, Exchange, Queue

    try:
        with Connection(broker, connect_timeout=3) as conn:
            # Celery's automatic queue: a direct exchange of the same name. The channel only
            # deletes bindings it knows, so declare them (a no-op) before deleting.
            bound = Queue(queue, Exchange(queue, type="direct"), routing_key=queue)(
                conn.default_channel
            )
            bound.declare()
            bound.delete()
    except Exception:
        pass


# -- output ----------------------------------------------------------------------------------


def _style(state: str, width: int = 0) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{escape(state.ljust(width))}[/]"


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _progress(started: float, titles: dict[str, str]) -> Callable[[dict[str, Any]], None]:
    """An ``on_change`` for api.wait: one line per run state and per step change."""
    seen: dict[tuple[str, str | None], tuple[str, int]] = {}
    last: list[str] = []

    def show(run: dict[str, Any]) -> None:
        stamp = f"[dim]{time.monotonic() - started:6.1f}s[/]"

        def run_line() -> None:
            if not last or last[-1] != run["state"]:
                last.append(run["state"])
                out.print(f"{stamp} run {run['id']} {_style(run['state'])}")

        if run["state"] not in TERMINAL:
            run_line()
        for step in run["steps"]:
            key = (step["kind"], step["revision"])
            mark = (step["state"], step["attempts"])
            if seen.get(key) == mark:
                continue
            first = key not in seen
            seen[key] = mark
            rev = step["revision"] or ""
            took = _seconds(step.get("started_at"), step.get("finished_at"))
            extra = f", {took:.1f}s" if took is not None else ""
            if first and step["kind"] == "upgrade" and titles.get(rev):
                extra += f"  [dim]{escape(titles[rev])}[/]"
            if step.get("error"):
                extra += f"  [red]{escape(str(step['error']))}[/]"
            out.print(
                f"{stamp}   {step['kind']:<8} {rev:<12} {_style(step['state'], 9)} "
                f"attempt {step['attempts']}{extra}"
            )
        if run["state"] in TERMINAL:
            run_line()

    return show


def verification_words(verification: dict[str, Any]) -> str:
    """How a backup was proven, as a sentence (the ledger keeps the structure)."""
    parts = []
    if verification.get("list"):
        parts.append(str(verification["list"]))
    restore = verification.get("restore")
    if isinstance(restore, dict):
        tables, rows = int(restore.get("tables", 0)), int(restore.get("rows", 0))
        checked = int(restore.get("checksummed", 0))
        said = (
            f"a trial restore into a scratch database held the same {tables} "
            f"table{'s' if tables != 1 else ''} and {rows:,} row{'s' if rows != 1 else ''} "
            "as the snapshot"
        )
        if checked:
            said += f", content checksums of {checked} table{'s' if checked != 1 else ''} equal"
        parts.append(said)
    elif restore:
        parts.append(f"trial restore {restore}")
    return ("verified: " + "; ".join(parts)) if parts else "not verified"


def _summary(
    run: dict[str, Any], dbname: str, url: URL, elapsed: float, counts: tuple[int, int] | None
) -> None:
    def row(label: str, value: str) -> None:
        out.print(f"  [bold]{label:<11}[/] {value}")

    out.print()
    out.print("[bold]Summary[/]")
    row("run", f"{run['id']} on target {run['target']}")
    row("state", _style(run["state"]))
    row(
        "revisions",
        f"{run['from_revision'] or 'base'} -> {run['to_revision'] or 'base'} "
        f"(now at {run['current_revision'] or 'base'})",
    )
    kinds: dict[str, int] = {}
    for step in run["steps"]:
        if step["state"] == "succeeded":
            kinds[step["kind"]] = kinds.get(step["kind"], 0) + 1
    done = ", ".join(f"{n} {kind}" for kind, n in kinds.items()) or "none"
    row("steps", f"{len(run['steps'])} recorded, succeeded: {done}")
    backup = run.get("backup")
    if backup:
        row("backup", escape(str(backup["path"])))
        row("", f"{backup['size']:,} bytes, sha256 {backup['sha256']}")
        if backup.get("verification"):
            row("", escape(verification_words(backup["verification"])))
    else:
        row("backup", "none")
    if counts is not None:
        row("large_table", f"{counts[0]:,} rows, new_column filled in {counts[1]:,} (backfill)")
    run_s = _seconds(run.get("started_at"), run.get("finished_at"))
    row(
        "duration",
        (f"{run_s:.1f}s in the worker, " if run_s is not None else "")
        + f"{elapsed:.1f}s for the whole demo",
    )
    if run.get("error"):
        row("error", f"[red]{escape(str(run['error']))}[/]")
    safe = url.set(drivername="postgresql").render_as_string(hide_password=True)
    row("database", f"{dbname} is left in place: psql {escape(safe)}")


# -- the demo --------------------------------------------------------------------------------


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for this process (and its children), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


class _Signals:
    """Ctrl-C (SIGINT) and SIGTERM (`kill`, `docker stop`) end the demo by raising
    KeyboardInterrupt or SystemExit, so that its ``finally`` stops the worker; while it
    cleans up they are held, and raised once the cleanup is done."""

    def __init__(self) -> None:
        self.holding = False
        self.pending: int | None = None

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.holding:
            self.pending = signum
            return
        self._raise(signum)

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous: dict[int, Any] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            if self.pending is not None:
                signum, self.pending = self.pending, None
                self._raise(signum)


_SIGNALS = _Signals()


def _follow(
    run_id: str,
    settings: Settings,
    worker: DemoWorker,
    on_change: Callable[[dict[str, Any]], None],
    timeout_s: float,
) -> dict[str, Any]:
    """api.wait in short slices, so a worker that dies does not leave the demo hanging."""
    from jobs import api

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return api.wait(run_id, TARGET, timeout_s=2.0, on_change=on_change, settings=settings)
        except RunbookError as exc:
            if type(exc) is not RunbookError:  # not wait's "still running": a real problem
                raise
        if not worker.alive():
            raise DemoError(
                f"the worker died during run {run_id}; its log ends with:\n{worker.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise DemoError(
                f"run {run_id} did not finish within {timeout_s:.0f}s (RUNBOOK_DEMO_TIMEOUT)"
            )


def _titles(alembic_ini: Path) -> dict[str, str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(Config(str(alembic_ini)))
    return {
        s.revision: (s.doc or "").strip().splitlines()[0] if s.doc else ""
        for s in script.walk_revisions()
    }


def _demo(workdir: Path) -> int:
    admin = _admin_url()
    broker = os.environ.get("CELERY_BROKER_URL") or DEFAULT_BROKER
    dbname = _db_name()
    rows = int(_number("RUNBOOK_DEMO_ROWS", DEFAULT_ROWS, 0))
    timeout_s = _number("RUNBOOK_DEMO_TIMEOUT", DEFAULT_TIMEOUT_S, 1)
    alembic_ini = _alembic_ini()

    problems = [p for p in (_postgres_problem(admin), _broker_problem(broker)) if p]
    if problems:
        hint = START_HINT if len(problems) > 1 else START_HINT.replace("them", "it")
        err.print(
            f"runbook demo: {' and '.join(problems)}; {hint} "
            "(or point RUNBOOK_DEMO_ADMIN_URL / CELERY_BROKER_URL at running ones)",
            markup=False,
        )
        return 2

    started = time.monotonic()
    url = admin.set(database=dbname)
    out.print(
        f"[bold]runbook demo[/]: PostgreSQL {_where(admin)}, broker "
        f"{escape(redact(broker))}, project {escape(str(alembic_ini))}"
    )
    out.print(f"  database {dbname}: recreating, alembic upgrade {INITIAL_REVISION}, seeding")
    _recreate_database(admin, dbname)
    script_dir = _migrate_to_initial(alembic_ini, url)
    _seed(script_dir, url, rows)
    out.print(f"  seeded sample data ({rows:,} rows in large_table)")

    backup_dir = _backup_dir()
    backup_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_path = workdir / "runbook.toml"
    _write_config(config_path, url, alembic_ini, backup_dir)
    queue = f"runbook-demo-{uuid.uuid4().hex[:8]}"
    shared = {
        "RUNBOOK_CONFIG": str(config_path),
        "RUNBOOK_QUEUE": queue,
        "CELERY_BROKER_URL": broker,
    }
    # This process and the worker read the same settings: set before worker.app is imported.
    with _environment(shared):
        settings = load_settings(config_path)
        worker = DemoWorker(workdir, queue, dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            out.print(f"  starting a Celery worker on queue {queue}")
            worker.start()
            from jobs import api

            run_id = api.enqueue(TARGET, "head", settings=settings)
            if run_id is None:  # cannot happen on a fresh database, but say so if it does
                raise DemoError(f"database {dbname} is already at head; nothing to demonstrate")
            out.print(f"  enqueued run {run_id}: {TARGET} -> head, backup first")
            out.print()
            final = _follow(
                run_id,
                settings,
                worker,
                _progress(time.monotonic(), _titles(alembic_ini)),
                timeout_s,
            )
        finally:
            with _SIGNALS.held():
                worker.stop()
                _forget_queue(broker, queue)
    counts = _large_table_counts(url)
    _summary(final, dbname, url, time.monotonic() - started, counts)
    if final["state"] != SUCCEEDED:
        tail = worker.log_tail()
        if tail:
            out.print("[bold]worker log (last lines)[/]")
            out.print(escape(tail))
        return 1
    return 0


def run_demo() -> int:
    """Run the demo; the process exit code (0 only when the run succeeded)."""
    workdir = Path(tempfile.mkdtemp(prefix="runbook-demo-"))
    try:
        with _SIGNALS.installed():
            return _demo(workdir)
    except RunbookError as exc:
        err.print(f"runbook demo: {redact(str(exc))}", markup=False)
        return exc.exit_code
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
