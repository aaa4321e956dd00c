"""The Python API for scripts and CI; the CLI calls exactly these functions.

from jobs import api
run_id = api.enqueue(target="prod", to="head")
final = api.wait(run_id)
assert final["state"] == "succeeded"
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from jobs import backup as backups
from jobs import db, ledger
from jobs.config import Settings, Target, load_settings, redact
from jobs.errors import BrokerUnavailable, RunbookError, TargetUnreachable, UnknownRun
from jobs.ledger import Run
from jobs.migrate import Project
from jobs.states import CANCELLED, ENQUEUED

EXECUTE_TASK = "runbook.execute_run"


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else load_settings()


def _check_broker(settings: Settings) -> None:
    from kombu import Connection

    try:
        with Connection(settings.broker_url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
    except Exception:
        safe = redact(settings.broker_url)
        raise BrokerUnavailable(
            f"the broker at {safe} is unreachable; start Redis (e.g. `docker compose up -d "
            "redis`) or set CELERY_BROKER_URL"
        ) from None


def _send(settings: Settings, run_id: str, target: Target) -> None:
    from worker.app import app

    app.send_task(EXECUTE_TASK, args=[run_id, target.name], queue=settings.queue)


def enqueue(
    target: str | None = None,
    to: str = "head",
    *,
    backup: bool | None = None,
    settings: Settings | None = None,
) -> str | None:
    """Check everything that can be checked, record the run and queue it; its id.

    None when the target is already at ``to`` (nothing to do). RunbookError, with nothing
    enqueued and nothing changed, on bad input or configuration.
    """
    settings = _settings(settings)
    t = settings.target(target)
    project = Project(t)
    to_rev = project.resolve(to)
    take_backup = t.backup if backup is None else backup
    with db.connect(t) as conn:
        current = project.current(conn)
        project.upgrade_path(current, to_rev)
        if current == to_rev:
            return None
        if take_backup:
            backups.check_prerequisites(t, db.server_version_num(conn))
        _check_broker(settings)
        ledger.ensure(conn)
        run_id = ledger.admit(
            conn,
            target=t.name,
            kind="apply",
            from_revision=current,
            to_revision=to_rev,
            options={"backup": take_backup},
        )
    _send(settings, run_id, t)
    return run_id


def _find(settings: Settings, run_id: str, target: str | None) -> tuple[Target, Run]:
    """Look a run up in the named target's ledger, or in every configured target's."""
    candidates = [settings.target(target)] if target else list(settings.targets.values())
    unreachable: list[str] = []
    for t in candidates:
        try:
            with db.connect(t) as conn:
                if ledger.exists(conn):
                    return t, ledger.get_run(conn, run_id)
        except UnknownRun:
            continue
        except TargetUnreachable:
            if target:
                raise
            unreachable.append(t.name)
    extra = f" (unreachable: {', '.join(unreachable)})" if unreachable else ""
    raise UnknownRun(f"unknown run {run_id!r}{extra}; `runbook history` lists the runs")


def status(
    run_id: str, target: str | None = None, *, settings: Settings | None = None
) -> dict[str, Any]:
    """The run's record: state, revisions, backup, steps, error."""
    _, run = _find(_settings(settings), run_id, target)
    return run.as_dict()


def history(
    target: str | None = None, *, limit: int = 50, settings: Settings | None = None
) -> list[dict[str, Any]]:
    """Recent runs of a target, newest first (steps left out)."""
    t = _settings(settings).target(target)
    with db.connect(t) as conn:
        if not ledger.exists(conn):
            return []
        return [r.as_dict() for r in ledger.list_runs(conn, limit=limit)]


def wait(
    run_id: str,
    target: str | None = None,
    *,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
    on_change: Callable[[dict[str, Any]], None] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Follow a run in the ledger until it ends; its final record.

    Woken by the ledger's notifications; ``poll_s`` is only the fallback re-read interval.
    """
    settings = _settings(settings)
    t, _ = _find(settings, run_id, target)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: Any = None
    with db.connect(t, autocommit=True) as conn:
        ledger.listen(conn)
        while True:
            run = ledger.get_run(conn, run_id)
            snapshot = run.as_dict()
            marker = (run.state, [(s.kind, s.revision, s.state, s.attempts) for s in run.steps])
            if marker != last and on_change is not None:
                on_change(snapshot)
            last = marker
            if run.terminal:
                return snapshot
            if deadline is not None and time.monotonic() > deadline:
                raise RunbookError(f"run {run_id} is still {run.state} after {timeout_s:.0f}s")
            ledger.wait_for_change(conn, run_id, poll_s)


def resume(
    run_id: str, target: str | None = None, *, settings: Settings | None = None
) -> dict[str, Any]:
    """Send an unfinished run's task again (its worker died, or Redis lost the message).

    Safe to call while the run is still being worked on: the run lock turns the extra
    delivery into a no-op.
    """
    settings = _settings(settings)
    t, run = _find(settings, run_id, target)
    if run.terminal:
        raise RunbookError(f"run {run_id} already ended ({run.state}); nothing to resume")
    _check_broker(settings)
    _send(settings, run.id, t)
    return run.as_dict()


def cancel(
    run_id: str, target: str | None = None, *, settings: Settings | None = None
) -> dict[str, Any]:
    """Cancel a run that no worker has started (e.g. its message was lost with Redis).

    A running migration is not interrupted half-way: it ends by itself, or rolls back.
    """
    t, run = _find(_settings(settings), run_id, target)
    if run.terminal:
        raise RunbookError(f"run {run_id} already ended ({run.state}); nothing to cancel")
    if run.state != ENQUEUED:
        raise RunbookError(
            f"run {run_id} is {run.state}; a started migration is not cut off half-way: wait "
            f"for it (runbook status {run_id} --watch)"
        )
    with db.connect(t) as conn:
        ledger.transition(conn, run, CANCELLED, error="cancelled by an operator")
        return ledger.get_run(conn, run_id).as_dict()
