"""Runs: plan, check, enqueue (apply, rollback, rehearse, stamp), status, wait, resume, cancel
and history.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from jobs.config import Settings, Target
from jobs.errors import (
    RevisionError,
    RunbookError,
)
from jobs.lazy import lazy, lazy_callable
from jobs.ledger import read
from jobs.ledger.records import Run
from jobs.pg import connect
from jobs.states import BACKFILL_TERMINAL, CANCELLED, ENQUEUED, RunKind, RunState, StepKind

# Loaded on first use, so that `runbook status` pays only for reading the ledger, with plain
# psycopg2 (jobs/ledger/read.py): SQLAlchemy (db, ledger), Alembic (migrate), pglast
# (backfill, sqlguard, plan), boto3 (vault) and rich (plan) come with the commands that need
# them (tests/unit/test_cli_imports.py, tests/integration/test_status_imports.py).
if TYPE_CHECKING:
    from sqlalchemy import Connection

    from jobs.insight import plan as insight_plan
    from jobs.ledger import backups as ledger_backups
    from jobs.ledger import notify, runs, schema
    from jobs.pg import db
    from jobs.project import losses
    from jobs.project.runtime import Project
    from jobs.project.scripts import Revision
else:
    insight_plan = lazy("jobs.insight.plan")
    ledger_backups = lazy("jobs.ledger.backups")
    notify = lazy("jobs.ledger.notify")
    runs = lazy("jobs.ledger.runs")
    schema = lazy("jobs.ledger.schema")
    db = lazy("jobs.pg.db")
    losses = lazy("jobs.project.losses")
    Project = lazy_callable("jobs.project.runtime", "Project")
from jobs.api.backfills import read_progress
from jobs.api.common import (
    WAIT_REREAD_S,
    admit,
    check_broker,
    check_scratch,
    find_run,
    resolve_settings,
    send_run,
    settle_refusal,
)


def plan(
    target: str | None = None, to: str = "head", *, settings: Settings | None = None
) -> dict[str, Any]:
    """What an apply to ``to`` would do: SQL, lint, irreversibility, tables, last rehearsal."""
    t = resolve_settings(settings).target(target)
    project = Project(t)
    to_rev = project.resolve(to)
    with db.connect(t) as conn:
        result = insight_plan.build_plan(t, project, conn, to_rev)
        result["rehearsal"] = (
            ledger_backups.latest_rehearsal(conn, result["current"], to_rev)
            if schema.exists(conn)
            else None
        )
    return result


def check(target: str | None = None, *, settings: Settings | None = None) -> dict[str, Any]:
    """Drift: models against the live schema, and applied revision files edited since."""
    from jobs.insight import drift

    t = resolve_settings(settings).target(target)
    return drift.check(t, Project(t))


def doctor(target: str | None = None, *, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The common migration errors diagnosed (jobs/insight/doctor.py): one finding per problem,
    with its fix."""
    from jobs.insight import doctor as insight_doctor

    t = resolve_settings(settings).target(target)
    with db.connect(t) as conn:
        return [dict(f) for f in insight_doctor.diagnose(t, conn)]


def _refusal(t: Target, found: dict[str, Any]) -> str | None:
    """Why apply --strict refuses this plan (a lint error the target has not allowed in
    lint_allow), or None."""
    errors = [
        (rev["id"], f)
        for rev in found["revisions"]
        for f in rev.get("lint") or []
        if f["level"] == "error" and f["rule"] not in t.lint_allow
    ]
    if not errors:
        return None
    rev, first = errors[0]
    more = f" (and {len(errors) - 1} more; see runbook plan)" if len(errors) > 1 else ""
    return (
        f"--strict: {rev}: {first['rule']}: {first['message']}{more}; fix the revision "
        f"or add the rule to lint_allow for target {t.name!r}"
    )


def _check_lint(t: Target, found: dict[str, Any]) -> None:
    """apply --strict: no lint error the target has not allowed (lint_allow)."""
    refusal = _refusal(t, found)
    if refusal:
        raise RunbookError(refusal)


def strict_refusal(
    target: str | None, found: dict[str, Any], *, settings: Settings | None = None
) -> str | None:
    """plan --strict: the line apply --strict would refuse ``found`` (a plan) with, or None."""
    return _refusal(resolve_settings(settings).target(target), found)


def enqueue(
    target: str | None = None,
    to: str = "head",
    *,
    backup: bool | None = None,
    strict: bool = False,
    settings: Settings | None = None,
    rollout: str | None = None,
) -> str | None:
    """Check everything that can be checked, record the run and queue it; its id.

    None when the target is already at ``to`` (nothing to do). RunbookError, with nothing
    enqueued and nothing changed, on bad input or configuration. ``rollout``: the run is a
    member's run of that rollout (jobs/fleet/advance.py).
    """
    settings = resolve_settings(settings)
    t = settings.target(target)
    project = Project(t)
    to_rev = project.resolve(to)
    take_backup = t.backup if backup is None else backup
    with db.connect(t) as conn:
        current = project.current(conn)
        path = project.upgrade_path(current, to_rev)
        if not path:
            return None
        project.check_declarations(path)  # a bad declared backfill: exit 2, nothing queued
        if t.require_rehearsal:
            _check_rehearsed(conn, t, current, to_rev, path)
        if strict:
            _check_lint(t, insight_plan.build_plan(t, project, conn, to_rev))
        return admit(
            settings,
            t,
            conn,
            kind=RunKind.APPLY,
            from_revision=current,
            to_revision=to_rev,
            options={"backup": take_backup},
            backup=take_backup,
            irreversible={r.id: r.irreversible for r in path if r.irreversible},
            rollout=rollout,
        )


def _check_rehearsed(
    conn: Connection, t: Target, current: str | None, to_rev: str | None, path: list[Revision]
) -> None:
    """require_rehearsal: a succeeded rehearsal of exactly these revision files must exist."""
    hint = f"run `runbook rehearse --target {t.name} --to {to_rev}` first"
    found = ledger_backups.latest_rehearsal(conn, current, to_rev) if schema.exists(conn) else None
    if found is None or found["state"] != RunState.SUCCEEDED:
        raise RunbookError(
            f"target {t.name!r} requires a rehearsal of {current or 'base'} -> {to_rev}; {hint}"
        )
    rehearsed = {r["revision"]: r.get("sha256") for r in found.get("revisions", [])}
    changed = [r.id for r in path if rehearsed.get(r.id) != r.sha256]
    if changed:
        raise RunbookError(f"revision {changed[0]} changed since rehearsal {found['run']}; {hint}")


def enqueue_rollback(
    target: str | None = None,
    to: str = "base",
    *,
    accept_data_loss: bool = False,
    settings: Settings | None = None,
    rollout: str | None = None,
) -> str | None:
    """Queue an operator rollback down to ``to``, one revision per step.

    A downgrade that would drop a table or column holding rows is refused unless
    ``accept_data_loss``; even then the run takes a verified backup first.
    """
    settings = resolve_settings(settings)
    t = settings.target(target)
    project = Project(t)
    to_rev = project.resolve(to)
    with db.connect(t) as conn:
        current = project.current(conn)
        if current == to_rev:
            return None
        try:
            path = project.upgrade_path(to_rev, current)
        except RevisionError:
            raise RevisionError(
                f"--to {to_rev or 'base'} is not behind the current revision {current}; "
                "rollback only goes down (use apply to go up)"
            ) from None
        found = losses.data_loss(conn, project, list(reversed(path)))
        if found and not accept_data_loss:
            raise RunbookError(
                f"{'; '.join(found)}; pass --accept-data-loss to go ahead (a verified backup "
                "is taken first)"
            )
        if found and not t.backup:
            raise RunbookError(
                f"{found[0]}; --accept-data-loss needs a backup, and target {t.name!r} has "
                "backup = false"
            )
        return admit(
            settings,
            t,
            conn,
            kind=RunKind.ROLLBACK,
            from_revision=current,
            to_revision=to_rev,
            options={"backup": t.backup, "data_loss": found},
            backup=t.backup,
            irreversible={r.id: r.irreversible for r in path if r.irreversible},
            rollout=rollout,
        )


def enqueue_rehearse(
    target: str | None = None, to: str = "head", *, settings: Settings | None = None
) -> str | None:
    """Queue a rehearsal of the pending revisions on a scratch copy of the target."""
    settings = resolve_settings(settings)
    t = settings.target(target)
    project = Project(t)
    to_rev = project.resolve(to)
    with db.connect(t) as conn:
        current = project.current(conn)
        path = project.upgrade_path(current, to_rev)
        if not path:
            return None
        project.check_declarations(path)
        check_scratch(conn, dataclasses.replace(t, backup=True, verify_restore=True))
        return admit(
            settings,
            t,
            conn,
            kind=RunKind.REHEARSE,
            from_revision=current,
            to_revision=to_rev,
            options={"backup": True},
            backup=True,
        )


def enqueue_stamp(
    revision: str, target: str | None = None, *, settings: Settings | None = None
) -> str:
    """Queue a stamp: record ``revision`` in the version table without migrating (the fix for
    a version table the scripts do not match, jobs/insight/doctor.py)."""
    settings = resolve_settings(settings)
    t = settings.target(target)
    project = Project(t)
    to_rev = project.resolve(revision)
    with db.connect(t) as conn:
        recorded = project.recorded(conn)
        return admit(
            settings,
            t,
            conn,
            kind=RunKind.STAMP,
            from_revision=recorded[0] if recorded else None,
            to_revision=to_rev,
            options={"backup": False},
            backup=False,
        )


def status(
    run_id: str, target: str | None = None, *, settings: Settings | None = None
) -> dict[str, Any]:
    """The run's record: state, revisions, backup, steps, error."""
    settings = resolve_settings(settings)
    t, run = find_run(settings, run_id, target)
    return settle_refusal(settings, t, run).as_dict()


def history(
    target: str | None = None, *, limit: int = 50, settings: Settings | None = None
) -> list[dict[str, Any]]:
    """Recent runs of a target, newest first (steps left out)."""
    t = resolve_settings(settings).target(target)
    with db.connect(t) as conn:
        if not schema.exists(conn):
            return []
        return [r.as_dict() for r in runs.list_runs(conn, limit=limit)]


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
    settings = resolve_settings(settings)
    t, _ = find_run(settings, run_id, target)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: Any = None
    read_at = 0.0
    with db.connect(t, autocommit=True) as conn:
        notify.listen(conn)
        while True:
            # Every step record is announced; a read takes the whole run. Read at most every
            # WAIT_REREAD_S, or a long history costs hundreds of reads on the worker's cores.
            time.sleep(max(0.0, read_at + WAIT_REREAD_S - time.monotonic()))
            read_at = time.monotonic()
            run = runs.get_run(conn, run_id)
            snapshot = run.as_dict()
            marker = (run.state, [(s.kind, s.revision, s.state, s.attempts) for s in run.steps])
            if marker != last and on_change is not None:
                on_change(snapshot)
            last = marker
            if run.terminal:
                return snapshot
            if settle_refusal(settings, t, run).terminal:
                continue  # re-read: the worker's refusal is now the run's failure
            if deadline is not None and time.monotonic() > deadline:
                raise RunbookError(f"run {run_id} is still {run.state} after {timeout_s:.0f}s")
            notify.wait_for_change(conn, run_id, poll_s)


# While notifications come (each batch of a run's backfill announces the run), the run is
# read at most this often; without any, every ``interval_s`` of ``follow_run``.
FOLLOW_REREAD_S = 0.1


def follow_run(
    run_id: str,
    target: str | None = None,
    *,
    interval_s: float = 0.5,
    settings: Settings | None = None,
) -> Iterator[dict[str, Any]]:
    """The run now, then again after each change the ledger announces (a step, a state, a
    batch or a state of its backfills) and at least every ``interval_s``, until it ends: the
    last one yielded. Each is ``{"run": its record, "backfills": {id: progress} of the
    backfills its steps started, "clock_offset_s": the database's clock minus this
    machine's}`` (the ledger's times are the database's). Read with plain psycopg2, as
    `runbook status` reads (jobs/ledger/read.py)."""
    settings = resolve_settings(settings)
    t, _ = find_run(settings, run_id, target)
    over: dict[str, dict[str, Any]] = {}  # backfills that ended: read once
    with connect.reading(t) as conn:
        read.listen(conn)
        offset = (read.server_now(conn) - datetime.now(UTC)).total_seconds()
        while True:
            read_at = time.monotonic()
            run = read.get_run(conn, run_id)
            assert run is not None, run_id  # find_run found it; runs are never deleted
            run = settle_refusal(settings, t, run)
            progress: dict[str, dict[str, Any]] = {}
            for backfill_id in _backfills_of(run):
                found = over.get(backfill_id) or read_progress(conn, backfill_id)
                if found is not None:
                    progress[backfill_id] = found
                    if found["state"] in BACKFILL_TERMINAL:
                        over[backfill_id] = found
            yield {"run": run.as_dict(), "backfills": progress, "clock_offset_s": offset}
            if run.terminal:
                return
            read.wait_for_notice(conn, {run_id, *progress}, interval_s)
            time.sleep(max(0.0, read_at + FOLLOW_REREAD_S - time.monotonic()))


def _backfills_of(run: Run) -> list[str]:
    """The backfills the run's steps started (jobs/run/coordinator.py notes each id)."""
    return [
        backfill_id
        for step in run.steps
        if step.kind == StepKind.BACKFILL
        for backfill_id in (step.detail or {}).get("backfills") or []
    ]


def resume(
    run_id: str, target: str | None = None, *, settings: Settings | None = None
) -> dict[str, Any]:
    """Send an unfinished run's task again (its worker died, or Redis lost the message).

    Safe to call while the run is still being worked on: the run lock turns the extra
    delivery into a no-op.
    """
    settings = resolve_settings(settings)
    t, run = find_run(settings, run_id, target)
    if run.terminal:
        raise RunbookError(f"run {run_id} already ended ({run.state}); nothing to resume")
    check_broker(settings)
    send_run(settings, run.id, t)
    return run.as_dict()


def cancel(
    run_id: str, target: str | None = None, *, settings: Settings | None = None
) -> dict[str, Any]:
    """Cancel a run that no worker has started (e.g. its message was lost with Redis).

    A running migration is not interrupted half-way: it ends by itself, or rolls back.
    """
    t, run = find_run(resolve_settings(settings), run_id, target)
    if run.terminal:
        raise RunbookError(f"run {run_id} already ended ({run.state}); nothing to cancel")
    if run.state != ENQUEUED:
        raise RunbookError(
            f"run {run_id} is {run.state}; a started migration is not cut off half-way: wait "
            f"for it (runbook status {run_id} --watch)"
        )
    with db.connect(t) as conn:
        runs.transition(conn, run, CANCELLED, error="cancelled by an operator")
        return runs.get_run(conn, run_id).as_dict()
