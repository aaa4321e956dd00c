"""Creating a backfill: the table and key resolved, the statement checked, the rows estimated,
the slices cut, and the ledger rows written in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pglast import parse_sql
from pglast.parser import ParseError
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs.backfill.batch_sql import update_sql
from jobs.backfill.keys import (
    Table,
    estimate_rows,
    largest_key,
    planned_rows,
    quote,
    resolve_table,
    slice_bounds,
    walkable_key_type,
)
from jobs.backfill.marks import Marks, sample_marks
from jobs.backfill.spec import Spec
from jobs.errors import (
    BadSpec,
)
from jobs.ledger import backfills, schema
from jobs.ledger.estimate import COUNTED
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


def prepare(conn: Connection, spec: Spec) -> Prepared:
    """Every check of ``spec`` against the database, read-only; what the walk needs."""
    spec.check()
    table = resolve_table(conn, spec.table)
    key_type = walkable_key_type(conn, table, spec.key)
    _check_statement(conn, table, spec, key_type)
    upper = largest_key(conn, table, spec.key)
    table_rows = planned_rows(conn, f"SELECT 1 FROM {table.name}")
    estimate, kind = estimate_rows(conn, table, spec, table_rows)
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


def create(
    conn: Connection,
    target_name: str,
    spec: Spec,
    run_id: str | None = None,
    revision: str | None = None,
) -> str:
    """Check ``spec`` against the database and record the backfill and its slices; its id.

    It is ``enqueued`` (start it, then run its slices), or ``succeeded`` at once when the
    table is empty. Raises BadSpec or UnusableKey with one line for the operator.
    """
    try:  # every check first: bad input leaves the database as it was, ledger included
        plan = prepare(conn, spec)
        bounds = (
            []
            if plan.upper is None
            else slice_bounds(conn, plan.table, spec.key, spec.slices, plan.upper, plan.table_rows)
        )
        estimate, kind, marks = _estimate(conn, plan, spec, bounds)
    finally:
        if conn.in_transaction():
            conn.rollback()
    schema.ensure(conn)
    return backfills.create_backfill(
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
