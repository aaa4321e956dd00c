"""The Python API for scripts and CI; the CLI calls exactly these functions.

from jobs import api
run_id = api.enqueue(target="prod", to="head")
final = api.wait(run_id)
assert final["state"] == "succeeded"
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs import db, ledger, refusals
from jobs.config import Settings, Target, load_settings, redact
from jobs.errors import (
    BackupError,
    BrokerUnavailable,
    RevisionError,
    RunbookError,
    TargetUnreachable,
    UnknownRun,
)
from jobs.lazy import lazy, lazy_callable
from jobs.ledger import Run
from jobs.states import BACKFILL_TERMINAL, CANCELLED, ENQUEUED, FAILED

# Loaded on first use, so that `runbook status` pays only for the ledger: Alembic (migrate),
# pglast (backfill, sqlguard, plan), boto3 (vault) and rich (plan) come with the commands
# that need them (tests/unit/test_cli_imports.py).
if TYPE_CHECKING:
    from jobs import backfill, backfill_runner, sqlguard, vault
    from jobs import backup as backups
    from jobs import plan as planning
    from jobs.migrate import Project, Revision
else:
    backfill = lazy("jobs.backfill")
    backfill_runner = lazy("jobs.backfill_runner")
    sqlguard = lazy("jobs.sqlguard")
    vault = lazy("jobs.vault")
    backups = lazy("jobs.backup")
    planning = lazy("jobs.plan")
    Project = lazy_callable("jobs.migrate", "Project")

EXECUTE_TASK = "runbook.execute_run"
WAIT_REREAD_S = 0.05


def _settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else load_settings()


def _broker_gone(settings: Settings) -> str:
    from kombu.utils.url import maybe_sanitize_url

    safe = redact(maybe_sanitize_url(settings.broker_url))
    return (
        f"the broker at {safe} is unreachable; start Redis (e.g. `docker compose up -d "
        "redis`) or set CELERY_BROKER_URL"
    )


def _check_broker(settings: Settings) -> None:
    from kombu import Connection

    # A timeout on every socket read too: a stopped Redis accepts connections, never answers.
    options = {"socket_timeout": 3, "socket_connect_timeout": 3}
    try:
        with Connection(settings.broker_url, connect_timeout=3, transport_options=options) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
            client = getattr(conn.default_channel, "client", None)  # Redis: a real round trip
            if client is not None:
                client.ping()
    except Exception:
        raise BrokerUnavailable(_broker_gone(settings)) from None


def _publish(settings: Settings, task: str, args: list[Any], **options: Any) -> None:
    """Send one task message; BrokerUnavailable when the broker cannot take it (it went away
    since _check_broker): a few quick retries, not Celery's default of a second or more."""
    from kombu.exceptions import OperationalError

    from worker.app import app

    try:
        app.send_task(
            task,
            args=args,
            queue=settings.queue,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.2},
            **options,
        )
    except (OperationalError, OSError):
        raise BrokerUnavailable(_broker_gone(settings)) from None


def _send(settings: Settings, run_id: str, target: Target) -> None:
    _publish(settings, EXECUTE_TASK, [run_id, target.name])


def _check_scratch(conn: Connection, target: Target) -> None:
    """A verified backup restores into a scratch database: the role must be able to make one."""
    if not (target.backup and target.verify_restore):
        return
    can = conn.execute(
        text("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
    ).scalar()
    if conn.in_transaction():
        conn.rollback()
    if not can:
        raise BackupError(
            f"target {target.name!r}: role {target.url.username} cannot create the scratch "
            "database a backup is verified in (no CREATEDB); grant it, or set "
            "verify_restore = false"
        )


def _admit(
    settings: Settings,
    t: Target,
    conn: Connection,
    *,
    kind: str,
    from_revision: str | None,
    to_revision: str | None,
    options: dict[str, Any],
    backup: bool,
    irreversible: dict[str, str] | None = None,
) -> str:
    """Last checks, then record the run and queue it. Nothing is written before this."""
    if backup:
        backups.check_prerequisites(t, db.server_version_num(conn))
        _check_scratch(conn, t)
    _check_broker(settings)
    ledger.ensure(conn)
    run_id = ledger.admit(
        conn,
        target=t.name,
        kind=kind,
        from_revision=from_revision,
        to_revision=to_revision,
        options=options,
        irreversible=irreversible,
    )
    try:
        _send(settings, run_id, t)
    except BrokerUnavailable as exc:
        # Recorded but never sent: cancel it, so that it neither runs later (sent by the
        # reconciler) nor blocks the next apply on this target.
        ledger.transition(conn, ledger.get_run(conn, run_id), CANCELLED, error=str(exc))
        raise BrokerUnavailable(f"{exc} (run {run_id} was not sent, and is cancelled)") from None
    return run_id


def plan(
    target: str | None = None, to: str = "head", *, settings: Settings | None = None
) -> dict[str, Any]:
    """What an apply to ``to`` would do: SQL, lint, irreversibility, tables, last rehearsal."""
    t = _settings(settings).target(target)
    project = Project(t)
    to_rev = project.resolve(to)
    with db.connect(t) as conn:
        result = planning.build_plan(t, project, conn, to_rev)
        result["rehearsal"] = (
            ledger.latest_rehearsal(conn, result["current"], to_rev)
            if ledger.exists(conn)
            else None
        )
    return result


def check(target: str | None = None, *, settings: Settings | None = None) -> dict[str, Any]:
    """Drift: models against the live schema, and applied revision files edited since."""
    from jobs import drift

    t = _settings(settings).target(target)
    return drift.check(t, Project(t))


def doctor(target: str | None = None, *, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The runbook's §8 troubleshooting, automated: one finding per problem, with its fix."""
    from jobs import doctor as diagnosis

    t = _settings(settings).target(target)
    with db.connect(t) as conn:
        return [dict(f) for f in diagnosis.diagnose(t, conn)]


def _check_lint(t: Target, found: dict[str, Any]) -> None:
    """apply --strict: no lint error the target has not allowed (lint_allow)."""
    errors = [
        (rev["id"], f)
        for rev in found["revisions"]
        for f in rev.get("lint") or []
        if f["level"] == "error" and f["rule"] not in t.lint_allow
    ]
    if errors:
        rev, first = errors[0]
        more = f" (and {len(errors) - 1} more; see runbook plan)" if len(errors) > 1 else ""
        raise RunbookError(
            f"--strict: {rev}: {first['rule']}: {first['message']}{more}; fix the revision "
            f"or add the rule to lint_allow for target {t.name!r}"
        )


def enqueue(
    target: str | None = None,
    to: str = "head",
    *,
    backup: bool | None = None,
    strict: bool = False,
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
        path = project.upgrade_path(current, to_rev)
        if not path:
            return None
        project.check_declarations(path)  # a bad declared backfill: exit 2, nothing queued
        if t.require_rehearsal:
            _check_rehearsed(conn, t, current, to_rev, path)
        if strict:
            _check_lint(t, planning.build_plan(t, project, conn, to_rev))
        return _admit(
            settings,
            t,
            conn,
            kind="apply",
            from_revision=current,
            to_revision=to_rev,
            options={"backup": take_backup},
            backup=take_backup,
            irreversible={r.id: r.irreversible for r in path if r.irreversible},
        )


def _check_rehearsed(
    conn: Connection, t: Target, current: str | None, to_rev: str | None, path: list[Revision]
) -> None:
    """require_rehearsal: a succeeded rehearsal of exactly these revision files must exist."""
    hint = f"run `runbook rehearse --target {t.name} --to {to_rev}` first"
    found = ledger.latest_rehearsal(conn, current, to_rev) if ledger.exists(conn) else None
    if found is None or found["state"] != "succeeded":
        raise RunbookError(
            f"target {t.name!r} requires a rehearsal of {current or 'base'} -> {to_rev}; {hint}"
        )
    rehearsed = {r["revision"]: r.get("sha256") for r in found.get("revisions", [])}
    changed = [r.id for r in path if rehearsed.get(r.id) != r.sha256]
    if changed:
        raise RunbookError(f"revision {changed[0]} changed since rehearsal {found['run']}; {hint}")


def enqueue_backup(target: str | None = None, *, settings: Settings | None = None) -> str:
    """Queue a run that takes, verifies and records one backup of the target."""
    settings = _settings(settings)
    t = settings.target(target)
    project = Project(t)
    with db.connect(t) as conn:
        current = project.current(conn)
        return _admit(
            settings,
            t,
            conn,
            kind="backup",
            from_revision=current,
            to_revision=current,
            options={"backup": True},
            backup=True,
        )


_DROP_TABLE = re.compile(r"DROP TABLE (?:IF EXISTS )?([\w.\"]+)", re.IGNORECASE)
_DROP_COLUMN = re.compile(
    r"ALTER TABLE (?:ONLY )?([\w.\"]+) DROP COLUMN (?:IF EXISTS )?([\w\"]+)", re.IGNORECASE
)


def data_loss(conn: Connection, project: Project, revisions: list[Revision]) -> list[str]:
    """What the downgrades of ``revisions`` would destroy: tables and columns holding rows."""
    found = []
    for rev in revisions:
        sql = project.downgrade_sql(rev)
        drops: list[tuple[str, str | None]] = [
            (m.group(1), None) for m in _DROP_TABLE.finditer(sql)
        ]
        drops += [(m.group(1), m.group(2)) for m in _DROP_COLUMN.finditer(sql)]
        for table, column in drops:
            where = f" WHERE {column} IS NOT NULL" if column else ""
            try:
                rows = conn.execute(text(f"SELECT count(*) FROM {table}{where}")).scalar_one()
            except DBAPIError:
                rows = 0  # not there (yet): nothing to lose
            finally:
                if conn.in_transaction():
                    conn.rollback()
            if rows:
                what = f"column {table}.{column}" if column else f"table {table}"
                found.append(f"the downgrade of {rev.id} drops {what} holding {rows} rows")
    return found


def enqueue_rollback(
    target: str | None = None,
    to: str = "base",
    *,
    accept_data_loss: bool = False,
    settings: Settings | None = None,
) -> str | None:
    """Queue an operator rollback down to ``to``, one revision per step (§4.2).

    A downgrade that would drop a table or column holding rows is refused unless
    ``accept_data_loss``; even then the run takes a verified backup first.
    """
    settings = _settings(settings)
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
        losses = data_loss(conn, project, list(reversed(path)))
        if losses and not accept_data_loss:
            raise RunbookError(
                f"{'; '.join(losses)}; pass --accept-data-loss to go ahead (a verified backup "
                "is taken first)"
            )
        if losses and not t.backup:
            raise RunbookError(
                f"{losses[0]}; --accept-data-loss needs a backup, and target {t.name!r} has "
                "backup = false"
            )
        return _admit(
            settings,
            t,
            conn,
            kind="rollback",
            from_revision=current,
            to_revision=to_rev,
            options={"backup": t.backup, "data_loss": losses},
            backup=t.backup,
            irreversible={r.id: r.irreversible for r in path if r.irreversible},
        )


def enqueue_restore(
    backup_id: str,
    target: str | None = None,
    *,
    tables: list[str] | None = None,
    settings: Settings | None = None,
) -> str:
    """Queue a restore of a recorded backup: the whole database, or only ``tables``."""
    settings = _settings(settings)
    t = settings.target(target)
    project = Project(t)
    with db.connect(t) as conn:
        found = vault.usable_backup(conn, t, backup_id)
        held = backups.archive_tables(t, Path(found.path))
        for name in tables or []:
            qualified = name if "." in name else f"public.{name}"
            if qualified not in held:
                raise RunbookError(f"backup {backup_id} holds no table {name}")
        current = project.current(conn)
        return _admit(
            settings,
            t,
            conn,
            kind="restore",
            from_revision=current,
            to_revision=found.revision if not tables else current,
            options={"backup": True, "backup_id": backup_id, "tables": tables or []},
            backup=True,
        )


def enqueue_rehearse(
    target: str | None = None, to: str = "head", *, settings: Settings | None = None
) -> str | None:
    """Queue a rehearsal of the pending revisions on a scratch copy of the target."""
    settings = _settings(settings)
    t = settings.target(target)
    project = Project(t)
    to_rev = project.resolve(to)
    with db.connect(t) as conn:
        current = project.current(conn)
        path = project.upgrade_path(current, to_rev)
        if not path:
            return None
        project.check_declarations(path)
        _check_scratch(conn, dataclasses.replace(t, backup=True, verify_restore=True))
        return _admit(
            settings,
            t,
            conn,
            kind="rehearse",
            from_revision=current,
            to_revision=to_rev,
            options={"backup": True},
            backup=True,
        )


def enqueue_stamp(
    revision: str, target: str | None = None, *, settings: Settings | None = None
) -> str:
    """Queue a stamp: record ``revision`` in the version table without migrating (§8)."""
    settings = _settings(settings)
    t = settings.target(target)
    project = Project(t)
    to_rev = project.resolve(revision)
    with db.connect(t) as conn:
        recorded = project.recorded(conn)
        return _admit(
            settings,
            t,
            conn,
            kind="stamp",
            from_revision=recorded[0] if recorded else None,
            to_revision=to_rev,
            options={"backup": False},
            backup=False,
        )


def list_backups(
    target: str | None = None, *, settings: Settings | None = None
) -> list[dict[str, Any]]:
    """The target's backups, newest first."""
    t = _settings(settings).target(target)
    with db.connect(t) as conn:
        if not ledger.exists(conn):
            return []
        return [b.as_dict() for b in ledger.list_backups(conn, t.name)]


def _locate(
    settings: Settings, target: str | None, lookup: Callable[[Connection], Any]
) -> tuple[Target | None, Any, list[str]]:
    """Search the named target's ledger, or every configured target's, with ``lookup``
    (which returns what it found, or None): (target, found, targets unreachable)."""
    if not target:
        settings.require_any()  # "no targets are configured" rather than "unknown run"
    candidates = [settings.target(target)] if target else list(settings.targets.values())
    unreachable: list[str] = [] if target else sorted(settings.broken)
    for t in candidates:
        try:
            with db.connect(t) as conn:
                found = lookup(conn) if ledger.exists(conn) else None
                if found is not None:
                    return t, found, unreachable
        except TargetUnreachable:
            if target:
                raise
            unreachable.append(t.name)
    return None, None, unreachable


def _unreachable(names: list[str]) -> str:
    return f" (not searched, unreachable or broken: {', '.join(names)})" if names else ""


def _run_or_none(conn: Connection, run_id: str) -> Run | None:
    try:
        return ledger.get_run(conn, run_id)
    except UnknownRun:
        return None


def _find(settings: Settings, run_id: str, target: str | None) -> tuple[Target, Run]:
    """Look a run up in the named target's ledger, or in every configured target's."""
    t, run, unreachable = _locate(settings, target, lambda conn: _run_or_none(conn, run_id))
    if t is None:
        raise UnknownRun(
            f"unknown run {run_id!r}{_unreachable(unreachable)}; `runbook history` lists the runs"
        )
    return t, run


def _refusal(settings: Settings, work_id: str) -> dict[str, Any] | None:
    """Why a worker refused ``work_id``, if one did (jobs/refusals.py); None when Redis
    cannot be asked: the ledger alone still answers."""
    try:
        return refusals.read(settings.result_backend, work_id)
    except Exception:
        return None


def settle_refusal(settings: Settings, t: Target, run: Run) -> Run:
    """A run still enqueued that a worker refused (its configuration lacks or breaks the
    target, so it could not reach this ledger) ends failed here, with the worker's line."""
    if run.state != ENQUEUED:
        return run
    found = _refusal(settings, run.id)
    if found is None or found.get("target") != run.target:
        return run  # a message naming another target says nothing about this run
    with db.connect(t) as conn:
        ledger.transition(conn, run, FAILED, error=f"a worker refused the run: {found['error']}")
        refusals.forget(settings.result_backend, run.id)
        return ledger.get_run(conn, run.id)


def _settle_refused_backfill(settings: Settings, t: Target, backfill_id: str) -> None:
    """The same for a backfill: the refused slice is stopped and the backfill errored, unless
    it ended or a newer generation took the slice over since (jobs/backfill.py ``abandon``
    fences). Redis is asked first: without a refusal, nothing more is read."""
    found = _refusal(settings, backfill_id)
    if found is None:
        return
    with db.connect(t) as conn:  # abandon() locks rows: a transaction, not autocommit
        bf = ledger.get_backfill(conn, backfill_id)
        if bf is None or bf.state in BACKFILL_TERMINAL or found.get("target") != bf.target:
            return
        backfill.abandon(
            conn,
            backfill_id,
            int(found["slice"]),
            int(found["generation"]),
            f"a worker refused it: {found['error']}",
        )
    refusals.forget(settings.result_backend, backfill_id)


def status(
    run_id: str, target: str | None = None, *, settings: Settings | None = None
) -> dict[str, Any]:
    """The run's record: state, revisions, backup, steps, error."""
    settings = _settings(settings)
    t, run = _find(settings, run_id, target)
    return settle_refusal(settings, t, run).as_dict()


def _health(settings: Settings, name: str, project: Project | None) -> dict[str, Any]:
    """One target's row of ``targets``: config, reachability, revisions, last run."""
    row: dict[str, Any] = {
        "name": name,
        "ok": False,
        "config": "broken" if name in settings.broken else "ok",
        "database": None,
        "reachable": None,
        "current_revision": None,
        "head": None,
        "pending": None,
        "last_run": None,
        "error": settings.broken.get(name),
    }
    if project is None:
        return row
    t = settings.targets[name]
    row["database"] = t.where
    try:
        head = project.resolve("head")
        with db.connect(t) as conn:
            row["reachable"] = True
            current = project.current(conn)
            pending = project.upgrade_path(current, head)
            last = ledger.list_runs(conn, limit=1) if ledger.exists(conn) else []
    except TargetUnreachable as exc:
        row.update(reachable=False, error=str(exc))
        return row
    except RunbookError as exc:  # a project or history problem: `runbook doctor` says more
        row["error"] = str(exc)
        return row
    row.update(
        ok=True,
        current_revision=current,
        head=head,
        pending=[r.id for r in pending],
        last_run=(
            None
            if not last
            else {
                "id": last[0].id,
                "kind": last[0].kind,
                "state": last[0].state,
                "finished_at": last[0].finished_at.isoformat() if last[0].finished_at else None,
            }
        ),
    )
    return row


def targets(*, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Every configured target with its health: config valid, database reachable, current
    and head revision, pending revisions, last run. Broken targets are listed, not raised."""
    from concurrent.futures import ThreadPoolExecutor

    settings = _settings(settings)
    settings.require_any()
    projects: dict[str, Project | None] = {}
    for name in settings.names:
        projects[name] = None
        if name in settings.targets:
            try:
                projects[name] = Project(settings.targets[name])
            except RunbookError as exc:
                settings = dataclasses.replace(settings, broken={**settings.broken, name: str(exc)})
    # Each target is asked on its own connection at once: one slow host does not hold the
    # others up beyond its connect timeout (jobs/db.py).
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda n: _health(settings, n, projects[n]), settings.names))


def history(
    target: str | None = None, *, limit: int = 50, settings: Settings | None = None
) -> list[dict[str, Any]]:
    """Recent runs of a target, newest first (steps left out)."""
    t = _settings(settings).target(target)
    with db.connect(t) as conn:
        if not ledger.exists(conn):
            return []
        return [r.as_dict() for r in ledger.list_runs(conn, limit=limit)]


def list_backfills(
    target: str | None = None, *, limit: int = 50, settings: Settings | None = None
) -> list[dict[str, Any]]:
    """A target's recent backfills, newest first, with their progress."""
    t = _settings(settings).target(target)
    with db.connect(t) as conn:
        if not ledger.exists(conn):
            return []
        return [
            backfill_runner.progress(conn, bf)
            for bf in ledger.list_backfills(conn, target=t.name, limit=limit)
        ]


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
    read_at = 0.0
    with db.connect(t, autocommit=True) as conn:
        ledger.listen(conn)
        while True:
            # Every step record is announced; a read takes the whole run. Read at most every
            # WAIT_REREAD_S, or a long history costs hundreds of reads on the worker's cores.
            time.sleep(max(0.0, read_at + WAIT_REREAD_S - time.monotonic()))
            read_at = time.monotonic()
            run = ledger.get_run(conn, run_id)
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


def _backfill_spec(
    conn: Connection,
    t: Target,
    table: str,
    set_sql: str | Sequence[str],
    *,
    where: str | None,
    key: str | None,
    batch_size: int,
    slices: int,
    on_error: str,
) -> backfill.Spec:
    """The operator's fragments validated (jobs/sqlguard) and made a Spec; the key defaults
    to the table's primary key."""
    if batch_size <= 0:
        raise RunbookError(f"--batch-size must be a positive number of rows, got {batch_size}")
    table_sql = sqlguard.table(table)
    set_text = sqlguard.render(sqlguard.assignments_of(set_sql))
    where_text = sqlguard.predicate(where) if where else None
    if key is None:
        keys = backfill.candidate_keys(conn, table_sql)
        if not keys:
            raise RunbookError(f"table {table} has no usable key (a unique NOT NULL column)")
        key = keys[0]
    return backfill.Spec(
        table=table_sql,
        key=key,
        set_sql=set_text,
        where_sql=where_text,
        batch_size=batch_size,
        min_batch=min(100, batch_size),
        max_batch=max(50000, batch_size),
        lock_timeout_ms=t.lock_timeout_ms,
        slices=slices,
        on_error=on_error,
    )


def enqueue_backfill(
    table: str,
    set_sql: str | Sequence[str],
    *,
    target: str | None = None,
    where: str | None = None,
    key: str | None = None,
    batch_size: int = 1000,
    slices: int = 1,
    on_error: str = "stop",
    settings: Settings | None = None,
) -> str:
    """Validate and record a batched, resumable UPDATE and queue its slices; its id."""
    settings = _settings(settings)
    t = settings.target(target)
    with db.connect(t) as conn:
        spec = _backfill_spec(
            conn,
            t,
            table,
            set_sql,
            where=where,
            key=key,
            batch_size=batch_size,
            slices=slices,
            on_error=on_error,
        )
        spec.check()
        _check_broker(settings)
        backfill_id = backfill.create(conn, t.name, spec)
        if backfill.get(conn, backfill_id).state == "succeeded":
            return backfill_id  # an empty table: nothing to queue
        started = backfill.start(conn, backfill_id)
        try:
            backfill_runner.send_slices(conn, t.name, backfill_id, started, _slice_sender(settings))
        except BrokerUnavailable as exc:
            # Never let it run later behind the operator's back (they will start it again).
            backfill.cancel(conn, backfill_id)
            raise BrokerUnavailable(
                f"{exc} (backfill {backfill_id} was not sent, and is cancelled)"
            ) from None
    return backfill_id


def dry_run_backfill(
    table: str,
    set_sql: str | Sequence[str],
    *,
    target: str | None = None,
    where: str | None = None,
    key: str | None = None,
    batch_size: int = 1000,
    slices: int = 1,
    on_error: str = "stop",
    batches: int = 3,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """A few sample batches in a transaction that is rolled back: rows and time per batch
    and the projected total time. Changes nothing, ledger included; needs no worker."""
    t = _settings(settings).target(target)
    with db.connect(t) as conn:
        spec = _backfill_spec(
            conn,
            t,
            table,
            set_sql,
            where=where,
            key=key,
            batch_size=batch_size,
            slices=slices,
            on_error=on_error,
        )
        return backfill.dry_run(conn, spec, batches)


def _slice_sender(settings: Settings) -> backfill_runner.SendSlice:
    def send(backfill_id: str, target: str, slice_no: int, generation: int, label: str) -> None:
        _publish(
            settings,
            "runbook.backfill_slice",
            [backfill_id, target, slice_no, generation],
            argsrepr=label,
            kwargsrepr="{}",
        )

    return send


def _find_backfill(settings: Settings, backfill_id: str, target: str | None) -> Target:
    t, _, unreachable = _locate(
        settings, target, lambda conn: ledger.get_backfill(conn, backfill_id)
    )
    if t is None:
        # The CLI looks for a run first, then a backfill: name both.
        raise backfill.UnknownBackfill(
            f"unknown run or backfill {backfill_id!r}{_unreachable(unreachable)}; "
            "`runbook history` lists the runs"
        )
    return t


def backfill_status(
    backfill_id: str, target: str | None = None, *, settings: Settings | None = None
) -> dict[str, Any]:
    """The backfill's state and progress (rows done, total, percent, rate, ETA, slices…)."""
    settings = _settings(settings)
    t = _find_backfill(settings, backfill_id, target)
    _settle_refused_backfill(settings, t, backfill_id)
    with db.connect(t) as conn:
        return backfill_runner.progress(conn, backfill.get(conn, backfill_id))


def follow_backfill(
    backfill_id: str,
    target: str | None = None,
    *,
    interval_s: float = 0.5,
    settings: Settings | None = None,
) -> backfill_runner.Updates:
    """The backfill's progress now, then at once at each change of its state and at least
    every ``interval_s``, until it stops (see backfill_runner.follow)."""
    settings = _settings(settings)
    t = _find_backfill(settings, backfill_id, target)
    return backfill_runner.follow(
        t,
        backfill_id,
        interval_s,
        before_each=lambda: _settle_refused_backfill(settings, t, backfill_id),
    )


def control_backfill(
    action: str, backfill_id: str, target: str | None = None, *, settings: Settings | None = None
) -> dict[str, Any]:
    """pause, resume or cancel a backfill; resume queues its unfinished slices again, each
    with a new generation."""
    settings = _settings(settings)
    t = _find_backfill(settings, backfill_id, target)
    with db.connect(t) as conn:
        ended = backfill.get(conn, backfill_id).state
        if ended in BACKFILL_TERMINAL:
            raise RunbookError(
                f"backfill {backfill_id} already ended ({ended}); nothing to {action}"
            )
        if action == "pause":
            backfill.pause(conn, backfill_id)
        elif action == "cancel":
            bf = backfill.get(conn, backfill_id)
            if backfill.cancel(conn, backfill_id) == "cancelled" and bf.run_id:
                # Cancelled at once (no slice was running to settle it): its run, waiting for
                # it, is sent on now rather than by the reconciler a lease later.
                _check_broker(settings)
                _send(settings, bf.run_id, t)
        else:
            _check_broker(settings)
            started = backfill.start(conn, backfill_id, resume=True)
            backfill_runner.send_slices(conn, t.name, backfill_id, started, _slice_sender(settings))
        return backfill_runner.progress(conn, backfill.get(conn, backfill_id))
