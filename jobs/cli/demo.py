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

import os
import shutil
import signal
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

from jobs import dispatch
from jobs.cli.demo_setup import (
    DEFAULT_ROWS,
    INITIAL_REVISION,
    START_HINT,
    TARGET,
    DemoWorker,
    admin_url,
    broker_problem,
    db_name,
    demo_backup_dir,
    env_number,
    large_table_counts,
    migrate_to_initial,
    postgres_problem,
    recreate_database,
    reference_alembic_ini,
    seed_large_table,
    where_is,
    write_config,
)
from jobs.config import DEFAULT_BROKER, Settings, load_settings, redact
from jobs.errors import DemoError, RunbookError
from jobs.pg.url import PgURL
from jobs.states import SUCCEEDED, TERMINAL, RunState, StepKind, StepState

DEFAULT_TIMEOUT_S = 600.0

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

STATE_STYLE: dict[str, str] = {
    RunState.SUCCEEDED: "green",
    RunState.RUNNING: "yellow",
    RunState.ENQUEUED: "cyan",
    RunState.FAILED: "bold red",
    RunState.ROLLING_BACK: "magenta",
    RunState.ROLLED_BACK: "magenta",
    RunState.RESTORED: "magenta",
    StepState.SKIPPED: "dim",
}


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
            if first and step["kind"] == StepKind.UPGRADE and titles.get(rev):
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
    run: dict[str, Any], dbname: str, url: PgURL, elapsed: float, counts: tuple[int, int] | None
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
        if step["state"] == StepState.SUCCEEDED:
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


def _prepare_database(
    admin: PgURL, dbname: str, broker: str, alembic_ini: Path, rows: int
) -> PgURL:
    """The scratch database, recreated at the history's first revision and seeded; its URL."""
    url = admin.set(database=dbname)
    out.print(
        f"[bold]runbook demo[/]: PostgreSQL {where_is(admin)}, broker "
        f"{escape(redact(broker))}, project {escape(str(alembic_ini))}"
    )
    out.print(f"  database {dbname}: recreating, alembic upgrade {INITIAL_REVISION}, seeding")
    recreate_database(admin, dbname)
    script_dir = migrate_to_initial(alembic_ini, url)
    seed_large_table(script_dir, url, rows)
    out.print(f"  seeded sample data ({rows:,} rows in large_table)")
    return url


def _run_on_worker(
    workdir: Path, url: PgURL, dbname: str, broker: str, alembic_ini: Path, timeout_s: float
) -> tuple[dict[str, Any], DemoWorker]:
    """Start a worker on a queue of its own, enqueue "demo to head" and follow the run to its
    end; the run as it ended, and the worker (stopped by now, its log kept)."""
    backup_dir = demo_backup_dir()
    backup_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_path = workdir / "runbook.toml"
    write_config(config_path, url, alembic_ini, backup_dir)
    queue = f"runbook-demo-{uuid.uuid4().hex[:8]}"
    shared = {
        "RUNBOOK_CONFIG": str(config_path),
        "RUNBOOK_QUEUE": queue,
        "CELERY_BROKER_URL": broker,
    }
    # This process and the worker read the same settings: set before worker.app is imported.
    with _environment(shared):
        settings = load_settings(config_path)
        demo_queue = dispatch.connect(broker, queue)
        worker = DemoWorker(workdir, demo_queue, dict(os.environ, PYTHONUNBUFFERED="1"))
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
                demo_queue.forget_queue()
    return final, worker


def _demo(workdir: Path) -> int:
    admin = admin_url()
    broker = os.environ.get("CELERY_BROKER_URL") or DEFAULT_BROKER
    dbname = db_name()
    rows = int(env_number("RUNBOOK_DEMO_ROWS", DEFAULT_ROWS, 0))
    timeout_s = env_number("RUNBOOK_DEMO_TIMEOUT", DEFAULT_TIMEOUT_S, 1)
    alembic_ini = reference_alembic_ini()

    problems = [p for p in (postgres_problem(admin), broker_problem(broker)) if p]
    if problems:
        hint = START_HINT if len(problems) > 1 else START_HINT.replace("them", "it")
        err.print(
            f"runbook demo: {' and '.join(problems)}; {hint} "
            "(or point RUNBOOK_DEMO_ADMIN_URL / CELERY_BROKER_URL at running ones)",
            markup=False,
        )
        return 2

    started = time.monotonic()
    url = _prepare_database(admin, dbname, broker, alembic_ini, rows)
    final, worker = _run_on_worker(workdir, url, dbname, broker, alembic_ini, timeout_s)
    counts = large_table_counts(url)
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
