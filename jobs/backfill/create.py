"""Creating a backfill: the table and key resolved, the statement checked, the rows estimated,
the slices cut, and the ledger rows written in one transaction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pglast import parse_sql
from pglast.parser import ParseError
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs.backfill.batch_sql import APPLICATION_NAME, update_sql
from jobs.backfill.keys import (
    Table,
    estimate_rows,
    largest_key,
    planned_rows,
    quote,
    resolve_table,
    slice_bounds,
    walkable_key_type,
    where_of,
)
from jobs.backfill.marks import Marks, sample_marks
from jobs.backfill.spec import Spec
from jobs.errors import (
    BadSpec,
)
from jobs.ledger import backfills, schema
from jobs.ledger.estimate import COUNTED, PLANNER
from jobs.pg.sqlstate import describe
from jobs.states import (
    ENQUEUED,
    SUCCEEDED,
)


def _check_fragments(spec: Spec) -> None:
    """The SET and WHERE must be one assignment list and one condition, not touching the key:
    anything else would change what each batch's UPDATE means."""
    where = f"\nWHERE\n{spec.where_sql}\n" if spec.where_sql else ""
    try:
        statements = parse_sql(f"UPDATE t SET\n{spec.set_sql}\n{where}")
    except ParseError as exc:
        raise BadSpec(f"the backfill's SET or WHERE is not valid SQL: {exc}") from None
    stmt: Any = statements[0].stmt if len(statements) == 1 else None
    extra = stmt is None or any(
        getattr(stmt, name, None)
        for name in ("fromClause", "returningClause", "returningList", "withClause")
    )
    if extra or (stmt.whereClause is not None) != bool(spec.where_sql):
        raise BadSpec(
            "the backfill's SET must be only 'column = expression, …' and its WHERE only a "
            "condition (no FROM, RETURNING, WITH or second statement)"
        )
    if any(target.name == spec.key for target in stmt.targetList):
        raise BadSpec(f"the SET assigns the key {spec.key}; a backfill must not move its key")


def _check_statement(conn: Connection, table: Table, spec: Spec, key_type: str) -> None:
    """Plan (without running) the batch UPDATE, so a bad SET or WHERE fails now."""
    _check_fragments(spec)
    sql = update_sql(table.name, quote(spec.key), key_type, spec.set_sql, spec.where_sql, True)
    try:
        with conn.begin_nested():
            conn.execute(text(f"EXPLAIN {sql}"), {"lo": None, "hi": None})
    except DBAPIError as exc:
        raise BadSpec(
            f"the backfill's SET or WHERE does not work on {table.name}: {describe(exc)}"
        ) from None


@dataclass(frozen=True)
class Prepared:
    table: Table
    key_type: str
    upper: str | None
    table_rows: int
    estimate: int
    estimate_kind: str


def prepare(conn: Connection, spec: Spec, *, count: bool = True) -> Prepared:
    """Every check of ``spec`` against the database, read-only; what the walk needs. The
    rows to update are counted within the budget (keys.estimate_rows), or with ``count``
    false only guessed by the planner (refine counts them later)."""
    spec.check()
    table = resolve_table(conn, spec.table)
    key_type = walkable_key_type(conn, table, spec.key)
    _check_statement(conn, table, spec, key_type)
    upper = largest_key(conn, table, spec.key)
    table_rows = planned_rows(conn, f"SELECT 1 FROM {table.name}")
    if count:
        estimate, kind = estimate_rows(conn, table, spec, table_rows)
    else:
        estimate, kind = planned_rows(conn, f"SELECT 1 FROM {table.name}{where_of(spec)}"), PLANNER
    return Prepared(table, key_type, upper, table_rows, estimate, kind)


def _estimate(
    conn: Connection, plan: Prepared, spec: Spec, bounds: list[str]
) -> tuple[int, str, Marks | None]:
    """The rows to update, how that is known, and the slices' key marks that refine it as
    the walk goes (jobs/ledger/estimate.py): none when the rows were counted. Before a row is
    done, the sampled keys times the planner's share of them the WHERE keeps."""
    if plan.estimate_kind == COUNTED or not bounds:
        return plan.estimate, plan.estimate_kind, None
    marks = sample_marks(conn, plan.table, spec.key, plan.key_type, bounds, plan.table_rows)
    share = min(plan.estimate / plan.table_rows, 1.0) if spec.where_sql and plan.table_rows else 1
    return round(marks.keys * share), marks.kind, marks


@dataclass(frozen=True)
class Recorded:
    """A backfill just recorded, with what refine needs to estimate its rows later."""

    id: str
    spec: Spec
    plan: Prepared
    bounds: list[str]


def create(
    conn: Connection,
    target_name: str,
    spec: Spec,
    run_id: str | None = None,
    revision: str | None = None,
) -> str:
    """Check ``spec`` against the database and record the backfill and its slices, its rows
    estimated; its id (record's states and errors)."""
    return record(conn, target_name, spec, run_id, revision).id


def record(
    conn: Connection,
    target_name: str,
    spec: Spec,
    run_id: str | None = None,
    revision: str | None = None,
    *,
    estimated: bool = True,
) -> Recorded:
    """Check ``spec`` against the database and record the backfill and its slices.

    It is ``enqueued`` (start it, then run its slices), or ``succeeded`` at once when the
    table is empty. Raises BadSpec or UnusableKey with one line for the operator. With
    ``estimated`` false the rows are the planner's guess until refine (the count or the
    key marks can take a second or two on a large table: the walk need not wait for them).
    """
    try:  # every check first: bad input leaves the database as it was, ledger included
        plan = prepare(conn, spec, count=estimated)
        bounds = (
            []
            if plan.upper is None
            else slice_bounds(conn, plan.table, spec.key, spec.slices, plan.upper, plan.table_rows)
        )
        estimate, kind, marks = (
            _estimate(conn, plan, spec, bounds)
            if estimated
            else (plan.estimate, plan.estimate_kind, None)
        )
    finally:
        if conn.in_transaction():
            conn.rollback()
    schema.ensure(conn)
    backfill_id = backfills.create_backfill(
        conn,
        target=target_name,
        run_id=run_id,
        revision=revision,
        table_name=plan.table.name,
        key_column=spec.key,
        key_type=plan.key_type,
        set_sql=spec.set_sql,
        where_sql=spec.where_sql,
        state=ENQUEUED if plan.upper is not None else SUCCEEDED,
        finished=plan.upper is None,
        upper_key=plan.upper,
        bounds=bounds,
        on_error=spec.on_error,
        rows_total_estimate=estimate,
        estimate_kind=kind,
        marks=marks,
        settings=spec.settings(),
    )
    return Recorded(backfill_id, spec, plan, bounds)


@contextmanager
def snapshot(conn: Connection) -> Iterator[Connection]:
    """``conn`` in a read-only REPEATABLE READ transaction whose snapshot is taken at once:
    enter it before the slices are sent, so that refine counts the table as it was before
    any batch (a SET that makes the WHERE false would otherwise hide the rows done). Its
    statements run without parallel workers: they run beside the walk and the application,
    and should take no more than one core from them."""
    if conn.in_transaction():
        conn.rollback()
    conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
    conn.exec_driver_sql("SET LOCAL max_parallel_workers_per_gather = 0")
    conn.exec_driver_sql("SELECT 1")  # the snapshot is the first statement's
    try:
        yield conn
    finally:
        conn.rollback()


def refine(snap: Connection, ledger: Connection, recorded: Recorded) -> None:
    """Estimate ``recorded``'s rows as create does (counted within the budget, else the key
    marks), reading through ``snap`` (a snapshot from before its first batch), and record the
    estimate through ``ledger``."""
    plan, spec = recorded.plan, recorded.spec
    counted, kind = estimate_rows(snap, plan.table, spec, plan.table_rows)
    plan = dataclasses.replace(plan, estimate=counted, estimate_kind=kind)
    estimate, kind, marks = _estimate(snap, plan, spec, recorded.bounds)
    backfills.set_estimate(
        ledger, recorded.id, estimate, kind, marks, session_name=APPLICATION_NAME
    )
