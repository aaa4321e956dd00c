"""Backfills: enqueue one, dry-run it, follow it, pause, resume or cancel it, list them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from jobs.config import Settings, Target
from jobs.config_values import ValueKind, parse_value
from jobs.errors import (
    BrokerUnavailable,
    RunbookError,
    TargetUnreachable,
    UnknownBackfill,
)
from jobs.fleet import index
from jobs.lazy import lazy
from jobs.ledger import overview, read
from jobs.states import BACKFILL_TERMINAL, BackfillState

# Loaded on first use, so that `runbook status` pays only for reading the ledger, with plain
# psycopg2 (jobs/ledger/read.py): SQLAlchemy (db, ledger), Alembic (migrate), pglast
# (backfill, sqlguard, plan), boto3 (vault) and rich (plan) come with the commands that need
# them (tests/unit/test_cli_imports.py, tests/integration/test_status_imports.py).
if TYPE_CHECKING:
    from sqlalchemy import Connection

    from jobs.backfill import control, create, dryrun, sqlguard
    from jobs.backfill import keys as backfill_keys
    from jobs.backfill import slices as backfill_slices
    from jobs.backfill import spec as backfill_spec
    from jobs.ledger import backfills, schema
    from jobs.pg import db
else:
    control = lazy("jobs.backfill.control")
    create = lazy("jobs.backfill.create")
    dryrun = lazy("jobs.backfill.dryrun")
    sqlguard = lazy("jobs.backfill.sqlguard")
    backfill_keys = lazy("jobs.backfill.keys")
    backfill_slices = lazy("jobs.backfill.slices")
    backfill_spec = lazy("jobs.backfill.spec")
    backfills = lazy("jobs.ledger.backfills")
    schema = lazy("jobs.ledger.schema")
    db = lazy("jobs.pg.db")
from jobs import ids
from jobs.api.common import (
    check_broker,
    find_backfill,
    resolve_settings,
    send_run,
    settle_refused_backfill,
    slice_sender,
)

log = logging.getLogger("runbook.backfill")


def list_backfills(
    target: str | None = None, *, limit: int = 50, settings: Settings | None = None
) -> list[dict[str, Any]]:
    """A target's recent backfills, newest first, with their progress."""
    t = resolve_settings(settings).target(target)
    with db.connect(t) as conn:
        if not schema.exists(conn):
            return []
        return [
            backfill_slices.progress(conn, bf)
            for bf in backfills.list_backfills(conn, target=t.name, limit=limit)
        ]


# A backfill's replica bounds as the API and `runbook backfill` take them: option, the Spec
# field it sets, and how it is written (as runbook.toml's key of the same name).
REPLICA_OPTIONS: tuple[tuple[str, str, ValueKind], ...] = (
    ("max_replica_lag", "max_replica_lag_ms", "duration"),
    ("max_replica_lag_bytes", "max_replica_lag_bytes", "size"),
    ("max_wal_rate", "max_wal_rate_bytes", "rate"),
    ("max_retained_wal", "max_retained_wal_bytes", "size"),
    ("max_throttle", "max_throttle_ms", "duration"),
)
Bound = str | int | float | None


def _given(*values: Bound) -> dict[str, Bound]:
    """The replica options by name, from their values in REPLICA_OPTIONS' order."""
    return {option: value for (option, _, _), value in zip(REPLICA_OPTIONS, values, strict=True)}


def replica_bounds(t: Target, given: dict[str, Bound]) -> dict[str, Any]:
    """The backfill's replica bounds: each option ``given`` (not None) parsed as runbook.toml
    parses it, the target's for the others. One line naming the option for a bad value."""
    parsed = {
        field: parse_value(kind, given[option], "--" + option.replace("_", "-"))
        for option, field, kind in REPLICA_OPTIONS
        if given.get(option) is not None
    }
    return backfill_spec.replica_bounds(t, **parsed)


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
    replicas: dict[str, Bound],
) -> backfill_spec.Spec:
    """The operator's fragments validated (jobs/sqlguard) and made a Spec; the key defaults
    to the table's primary key."""
    if batch_size <= 0:
        raise RunbookError(f"--batch-size must be a positive number of rows, got {batch_size}")
    bounds = replica_bounds(t, replicas)
    table_sql = sqlguard.table(table)
    set_text = sqlguard.render(sqlguard.assignments_of(set_sql))
    where_text = sqlguard.predicate(where) if where else None
    if key is None:
        keys = backfill_keys.candidate_keys(conn, table_sql)
        if not keys:
            raise RunbookError(f"table {table} has no usable key (a unique NOT NULL column)")
        key = keys[0]
    min_batch, max_batch = backfill_spec.batch_bounds(batch_size)
    return backfill_spec.Spec(
        table=table_sql,
        key=key,
        set_sql=set_text,
        where_sql=where_text,
        batch_size=batch_size,
        min_batch=min_batch,
        max_batch=max_batch,
        lock_timeout_ms=t.lock_timeout_ms,
        slices=slices,
        on_error=on_error,
        **bounds,
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
    max_replica_lag: Bound = None,
    max_replica_lag_bytes: Bound = None,
    max_wal_rate: Bound = None,
    max_retained_wal: Bound = None,
    max_throttle: Bound = None,
    settings: Settings | None = None,
) -> str:
    """Validate and record a batched, resumable UPDATE and queue its slices; its id.

    The replica bounds (README "Replicas") are written as runbook.toml writes them ("2s",
    "64MB", 20 for MB/s); None takes the target's."""
    settings = resolve_settings(settings)
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
            replicas=_given(
                max_replica_lag, max_replica_lag_bytes, max_wal_rate, max_retained_wal, max_throttle
            ),
        )
        spec.check()
        check_broker(settings)
        # The rows are estimated once the slices are on their way (up to a second or two
        # on a large table, which the walk need not wait for), from a snapshot taken before.
        recorded = create.record(conn, t.name, spec, estimated=False)
        backfill_id = recorded.id
        index.note(settings, backfill_id, ids.BACKFILL, t.name)
        if control.get(conn, backfill_id).state == BackfillState.SUCCEEDED:
            return backfill_id  # an empty table: nothing to queue
        started = control.start(conn, backfill_id)
        with _snapshot_before(t, backfill_id) as before:
            try:
                backfill_slices.send_slices(
                    conn, t.name, backfill_id, started, slice_sender(settings)
                )
            except BrokerUnavailable as exc:
                # Never let it run later behind the operator's back (they will start it again).
                control.cancel(conn, backfill_id)
                raise BrokerUnavailable(
                    f"{exc} (backfill {backfill_id} was not sent, and is cancelled)"
                ) from None
            if before is not None:
                _refine(before, conn, recorded)
    return backfill_id


@contextlib.contextmanager
def _snapshot_before(t: Target, backfill_id: str) -> Iterator[Connection | None]:
    """A second connection holding a snapshot from before the first batch (create.snapshot),
    or None when it cannot be had (the server at max_connections, say): the backfill is
    sent regardless and runs on with the planner's guess, the reason logged."""
    from sqlalchemy.exc import DBAPIError

    with contextlib.ExitStack() as stack:
        try:
            before = stack.enter_context(create.snapshot(stack.enter_context(db.connect(t))))
        except (TargetUnreachable, DBAPIError) as exc:
            _not_estimated(backfill_id, exc)
            before = None
        yield before


def _refine(before: Connection, conn: Connection, recorded: create.Recorded) -> None:
    """The backfill's rows estimated (create.refine); it runs on with the planner's guess
    if that fails, the reason logged."""
    from sqlalchemy.exc import DBAPIError

    try:
        create.refine(before, conn, recorded)
    except DBAPIError as exc:
        _not_estimated(recorded.id, exc)


def _not_estimated(backfill_id: str, exc: Exception) -> None:
    from jobs.pg.sqlstate import describe

    log.warning(
        "backfill %s: its rows could not be estimated (%s); status shows the planner's guess",
        backfill_id,
        describe(exc),
    )


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
    max_replica_lag: Bound = None,
    max_replica_lag_bytes: Bound = None,
    max_wal_rate: Bound = None,
    max_retained_wal: Bound = None,
    max_throttle: Bound = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """A few sample batches in a transaction that is rolled back: rows and time per batch
    and the projected total time. Changes nothing, ledger included; needs no worker."""
    t = resolve_settings(settings).target(target)
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
            replicas=_given(
                max_replica_lag, max_replica_lag_bytes, max_wal_rate, max_retained_wal, max_throttle
            ),
        )
        return dryrun.dry_run(conn, spec, batches)


def backfill_status(
    backfill_id: str, target: str | None = None, *, settings: Settings | None = None
) -> dict[str, Any]:
    """The backfill's state and progress (rows done, total, percent, rate, ETA, slices…)."""
    settings = resolve_settings(settings)
    t = find_backfill(settings, backfill_id, target)
    settle_refused_backfill(settings, t, backfill_id)
    # psycopg2 alone, as _locate (jobs/ledger/read.py)
    found = read.reading(t, lambda conn: read_progress(conn, backfill_id))
    if found is None:
        raise UnknownBackfill(f"unknown backfill {backfill_id!r}; `runbook backfills` lists them")
    return found


def read_progress(conn: Any, backfill_id: str) -> dict[str, Any] | None:
    """The backfill's progress read on a plain psycopg2 connection (jobs/ledger/read.py), as
    `runbook status` shows it (its run's watch too); None for an unknown backfill."""
    bf = read.get_backfill(conn, backfill_id)
    return None if bf is None else overview.progress(conn, bf)


def follow_backfill(
    backfill_id: str,
    target: str | None = None,
    *,
    interval_s: float = 0.5,
    settings: Settings | None = None,
) -> backfill_slices.Updates:
    """The backfill's progress now, then at once at each change of its state and at least
    every ``interval_s``, until it stops (see backfill_runner.follow)."""
    settings = resolve_settings(settings)
    t = find_backfill(settings, backfill_id, target)
    return backfill_slices.follow(
        t,
        backfill_id,
        interval_s,
        before_each=lambda: settle_refused_backfill(settings, t, backfill_id),
    )


def control_backfill(
    action: str, backfill_id: str, target: str | None = None, *, settings: Settings | None = None
) -> dict[str, Any]:
    """pause, resume or cancel a backfill; resume queues its unfinished slices again, each
    with a new generation."""
    settings = resolve_settings(settings)
    t = find_backfill(settings, backfill_id, target)
    with db.connect(t) as conn:
        ended = control.get(conn, backfill_id).state
        if ended in BACKFILL_TERMINAL:
            raise RunbookError(
                f"backfill {backfill_id} already ended ({ended}); nothing to {action}"
            )
        if action == "pause":
            control.pause(conn, backfill_id)
        elif action == "cancel":
            bf = control.get(conn, backfill_id)
            if control.cancel(conn, backfill_id) == BackfillState.CANCELLED and bf.run_id:
                # Cancelled at once (no slice was running to settle it): its run, waiting for
                # it, is sent on now rather than by the reconciler a lease later.
                check_broker(settings)
                send_run(settings, bf.run_id, t)
        else:
            check_broker(settings)
            started = control.start(conn, backfill_id, resume=True)
            backfill_slices.send_slices(conn, t.name, backfill_id, started, slice_sender(settings))
        return backfill_slices.progress(conn, control.get(conn, backfill_id))
