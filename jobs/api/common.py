"""What every public function of jobs.api shares: settings, admission, sending work to the
queue, finding a run or a backfill on its target, and settling refusals a worker recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jobs import dispatch, ids
from jobs.config import Settings, Target, load_settings
from jobs.errors import (
    BackupError,
    BrokerUnavailable,
    RunbookError,
    TargetUnreachable,
    UnknownBackfill,
    UnknownRun,
)
from jobs.fleet import index
from jobs.lazy import lazy
from jobs.ledger import read
from jobs.ledger.records import Run
from jobs.run import refusals
from jobs.states import BACKFILL_TERMINAL, CANCELLED, ENQUEUED, FAILED

# Loaded on first use, so that `runbook status` pays only for reading the ledger, with plain
# psycopg2 (jobs/ledger/read.py): SQLAlchemy (db, ledger), Alembic (migrate), pglast
# (backfill, sqlguard, plan), boto3 (vault) and rich (plan) come with the commands that need
# them (tests/unit/test_cli_imports.py, tests/integration/test_status_imports.py).
if TYPE_CHECKING:
    from sqlalchemy import Connection

    from jobs.backfill import control
    from jobs.backups import dump
    from jobs.ledger import backfills, runs, schema
    from jobs.pg import db
else:
    control = lazy("jobs.backfill.control")
    dump = lazy("jobs.backups.dump")
    backfills = lazy("jobs.ledger.backfills")
    runs = lazy("jobs.ledger.runs")
    schema = lazy("jobs.ledger.schema")
    db = lazy("jobs.pg.db")

WAIT_REREAD_S = 0.05
log = logging.getLogger("runbook.api")


def resolve_settings(settings: Settings | None) -> Settings:
    return settings if settings is not None else load_settings()


def check_broker(settings: Settings) -> None:
    dispatch.for_settings(settings).check_broker()


def send_run(settings: Settings, run_id: str, target: Target, rollout: str | None = None) -> None:
    dispatch.for_settings(settings).send_run(run_id, target.name, rollout)


def check_scratch(conn: Connection, target: Target) -> None:
    """A verified backup restores into a scratch database: the role must be able to make one."""
    from sqlalchemy import text

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


def admit(
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
    rollout: str | None = None,
) -> str:
    """Last checks, then record the run and queue it. Nothing is written before this. A
    rollout's member run is tagged with the rollout's id (its options, and its message)."""
    if backup:
        dump.check_prerequisites(t, db.server_version_num(conn))
        check_scratch(conn, t)
    if rollout is None:  # a rollout's pass runs on a worker: a failed send below says it
        check_broker(settings)
    schema.ensure(conn)
    run_id = runs.admit(
        conn,
        target=t.name,
        kind=kind,
        from_revision=from_revision,
        to_revision=to_revision,
        options={**options, "rollout": rollout} if rollout else options,
        irreversible=irreversible,
    )
    if rollout is None:
        index.note(settings, run_id, ids.RUN, t.name)
    try:
        send_run(settings, run_id, t, rollout)
    except BrokerUnavailable as exc:
        # Recorded but never sent: cancel it, so that it neither runs later (sent by the
        # reconciler) nor blocks the next apply on this target.
        runs.transition(conn, runs.get_run(conn, run_id), CANCELLED, error=str(exc))
        raise BrokerUnavailable(f"{exc} (run {run_id} was not sent, and is cancelled)") from None
    return run_id


def indexed_target(settings: Settings, work_id: str) -> Target | None:
    """The target the control database says holds ``work_id`` (a run of [targets] or of a
    catalog group), or None: no control database, no entry, or it cannot be read."""
    from jobs.fleet import groups

    found = index.find(settings, work_id)
    if found is None or found[0] == ids.ROLLOUT:
        return None
    try:
        return groups.resolve(settings, found[1])
    except RunbookError:
        return None


def _named(settings: Settings, name: str) -> Target:
    """The target ``name``: a [targets.NAME], or a catalog group's row (its member's run
    shown by `status ID`, which passes on the name it was found under)."""
    from jobs.fleet import groups

    return groups.serving(settings, name).target(name)


def _locate(
    settings: Settings,
    target: str | None,
    lookup: Callable[[Any], Any],
    work_id: str | None = None,
) -> tuple[Target | None, Any, list[str]]:
    """Search the named target's ledger, or every configured target's, with ``lookup``
    (jobs/ledger/read.py on a plain psycopg2 connection; it returns what it found, or
    None): (target, found, targets unreachable)."""
    # A catalog member's run is found through the index even with no [targets] at all.
    known = indexed_target(settings, work_id) if not target and work_id is not None else None
    if not target and known is None:
        settings.require_any()  # "no targets are configured" rather than "unknown run"
    candidates = [_named(settings, target)] if target else list(settings.targets.values())
    if known is not None:  # looked at first; the others still if it is not there
        candidates = [known, *(t for t in candidates if t.name != known.name)]
    unreachable: list[str] = [] if target else sorted(settings.broken)
    for t in candidates:
        try:
            found = read.reading(t, lambda conn: lookup(conn) if read.exists(conn) else None)
            if found is not None:
                return t, found, unreachable
        except TargetUnreachable:
            if target:
                raise
            unreachable.append(t.name)
    return None, None, unreachable


def _unreachable(names: list[str]) -> str:
    return f" (not searched, unreachable or broken: {', '.join(names)})" if names else ""


def find_run(settings: Settings, run_id: str, target: str | None) -> tuple[Target, Run]:
    """Look a run up in the named target's ledger, or in every configured target's."""
    t, run, unreachable = _locate(settings, target, lambda conn: read.get_run(conn, run_id), run_id)
    if t is None:
        raise UnknownRun(
            f"unknown run {run_id!r}{_unreachable(unreachable)}; `runbook history` lists the runs"
        )
    return t, run


def _kind_of(conn: Any, work_id: str) -> str | None:
    """RUN, BACKFILL or None, on a plain psycopg2 connection (jobs/pg/connect.py)."""
    with conn.cursor() as cur:
        cur.execute(ids.KIND_OF, {"id": work_id})
        row = cur.fetchone()
    return None if row is None else str(row[0])


def locate(
    work_id: str, target: str | None = None, *, settings: Settings | None = None
) -> tuple[str, Target]:
    """What ``work_id`` is (jobs/ids.py: RUN or BACKFILL) and the target whose ledger holds
    it: one look in each ledger searched, for the commands that take either kind."""
    settings = resolve_settings(settings)
    t, kind, unreachable = _locate(
        settings,
        target,
        lambda conn: _kind_of(conn, work_id),
        work_id,
    )
    if t is None:
        from jobs.fleet import groups

        if groups.has_control(settings):  # the id may have been meant as a rollout's
            raise UnknownRun(
                f"unknown run, backfill or rollout {work_id!r}{_unreachable(unreachable)}; "
                "`runbook history` lists the runs, `runbook rollouts` the rollouts"
            )
        raise UnknownRun(
            f"unknown run or backfill {work_id!r}{_unreachable(unreachable)}; "
            "`runbook history` lists the runs"
        )
    return kind, t


def _refusal(settings: Settings, work_id: str) -> dict[str, Any] | None:
    """Why a worker refused ``work_id``, if one did (jobs/run/refusals.py); None when Redis
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
        runs.transition(conn, run, FAILED, error=f"a worker refused the run: {found['error']}")
        refusals.forget(settings.result_backend, run.id)
        return runs.get_run(conn, run.id)


def settle_refused_backfill(settings: Settings, t: Target, backfill_id: str) -> None:
    """The same for a backfill: the refused slice is stopped and the backfill errored, unless
    it ended or a newer generation took the slice over since (jobs/backfill/ ``abandon``
    fences). Redis is asked first: without a refusal, nothing more is read."""
    found = _refusal(settings, backfill_id)
    if found is None:
        return
    with db.connect(t) as conn:  # abandon() locks rows: a transaction, not autocommit
        bf = backfills.get_backfill(conn, backfill_id)
        if bf is None or bf.state in BACKFILL_TERMINAL or found.get("target") != bf.target:
            return
        control.abandon(
            conn,
            backfill_id,
            int(found["slice"]),
            int(found["generation"]),
            f"a worker refused it: {found['error']}",
        )
    refusals.forget(settings.result_backend, backfill_id)


def slice_sender(settings: Settings) -> dispatch.SendSlice:
    return dispatch.for_settings(settings).send_slice


def find_backfill(settings: Settings, backfill_id: str, target: str | None) -> Target:
    t, _, unreachable = _locate(
        settings, target, lambda conn: read.get_backfill(conn, backfill_id), backfill_id
    )
    if t is None:
        # As locate's: `runbook pause ID` and the API take a backfill's id where a run's is
        # often meant.
        raise UnknownBackfill(
            f"unknown run or backfill {backfill_id!r}{_unreachable(unreachable)}; "
            "`runbook history` lists the runs"
        )
    return t
