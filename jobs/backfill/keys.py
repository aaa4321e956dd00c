"""The key a backfill walks: a NOT NULL column with a unique index of its own, its type and
largest value, the rows to expect, and the quantiles that cut the key range into slices.

Keys are compared by PostgreSQL only (the cursor is stored as text and cast back to the
key's type in SQL), so uuid and text keys walk in the column's own order and collation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs.backfill.spec import KEY_TYPES, Spec, embed
from jobs.errors import BadSpec, UnusableKey
from jobs.pg.sqlstate import QUERY_CANCELED, sqlstate

# Counting the rows to update is tried for this long at creation; past it the walk's key
# marks estimate them (jobs/backfill/marks.py). RUNBOOK_COUNT_BUDGET_MS overrides it (0: never
# count, which the progress tests use to exercise the estimate on small tables).
COUNT_BUDGET_MS = 200
SAMPLE_ABOVE_ROWS = 200_000  # slice bounds come from a sample of a table larger than this
UNKNOWN = object()


# -- the table and its key --------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    oid: int
    name: str  # schema-qualified and quoted, fit for SQL


@dataclass(frozen=True)
class _Column:
    name: str
    type: str
    not_null: bool
    unique: bool

    @property
    def usable(self) -> bool:
        return self.not_null and self.unique and self.type in KEY_TYPES


def quote(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def resolve_table(conn: Connection, table: str) -> Table:
    """Resolve a table name (``table`` or ``schema.table``, SQL quoting allowed)."""
    try:
        with conn.begin_nested():
            row = conn.execute(
                text(
                    "SELECT c.oid, c.relkind, format('%I.%I', n.nspname, c.relname) AS name "
                    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.oid = to_regclass(:t)"
                ),
                {"t": table},
            ).first()
    except DBAPIError:  # a name to_regclass cannot even parse
        row = None
    if row is None:
        raise BadSpec(f"table {table} does not exist; name it as table or schema.table")
    if row.relkind not in ("r", "p"):
        raise BadSpec(f"{row.name} is not a table; a backfill updates a table")
    return Table(oid=int(row.oid), name=str(row.name))


def _columns(conn: Connection, table: Table) -> list[_Column]:
    """The table's columns, primary key first, each with whether it could be a key."""
    rows = conn.execute(
        text(
            "SELECT a.attname AS name, format_type(a.atttypid, NULL) AS type, "
            "a.attnotnull AS not_null, EXISTS (SELECT 1 FROM pg_index i "
            "  WHERE i.indrelid = a.attrelid AND i.indisunique AND i.indisvalid "
            "  AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indnkeyatts = 1 "
            "  AND i.indkey[0] = a.attnum AND i.indcollation[0] IN (0, a.attcollation)"
            ") AS unique, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid "
            "  AND i.indisprimary AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum) AS pk "
            "FROM pg_attribute a WHERE a.attrelid = :oid AND a.attnum > 0 "
            "AND NOT a.attisdropped ORDER BY pk DESC, a.attnum"
        ),
        {"oid": table.oid},
    ).all()
    return [_Column(r.name, r.type, r.not_null, r.unique) for r in rows]


def _choose(columns: list[_Column], table: Table) -> str:
    """'choose --key …' for a message, or why the table has no usable key at all."""
    usable = [c.name for c in columns if c.usable]
    if usable:
        return f"choose --key {' or '.join(usable)}"
    return (
        f"table {table.name} has no usable key (no primary key or unique NOT NULL column of "
        f"type {', '.join(KEY_TYPES)}); add one"
    )


def walkable_key_type(conn: Connection, table: Table, key: str) -> str:
    """The cast type of ``key`` if it walks ``table`` completely and in order."""
    columns = _columns(conn, table)
    column = next((c for c in columns if c.name == key), None)
    where = f"column {key} of table {table.name}"
    if column is None:
        raise UnusableKey(f"table {table.name} has no column {key!r}; {_choose(columns, table)}")
    if not column.unique:
        raise UnusableKey(
            f"{where} is not unique (no unique index on it alone); {_choose(columns, table)}"
        )
    if not column.not_null:
        raise UnusableKey(
            f"{where} allows NULL, so rows with a NULL key would be skipped; "
            f"{_choose(columns, table)} or SET NOT NULL on it first"
        )
    if column.type not in KEY_TYPES:
        raise UnusableKey(
            f"{where} is of type {column.type}; a key must be one of {', '.join(KEY_TYPES)}; "
            f"{_choose(columns, table)}"
        )
    return KEY_TYPES[column.type]


def inspect_key(conn: Connection, table: str, key: str) -> str:
    """The SQL type ``key`` is walked as; UnusableKey unless it is NOT NULL, unique alone
    (primary key or unique index on exactly that column) and of a supported type."""
    return walkable_key_type(conn, resolve_table(conn, table), key)


def candidate_keys(conn: Connection, table: str) -> list[str]:
    """The columns that could walk ``table``, its primary key first."""
    return [c.name for c in _columns(conn, resolve_table(conn, table)) if c.usable]


def largest_key(conn: Connection, table: Table, key: str) -> str | None:
    """The largest key now, as text; None for an empty table."""
    value = conn.execute(
        text(
            f"SELECT CAST(t.{quote(key)} AS text) AS upper_key FROM {table.name} t "
            f"ORDER BY t.{quote(key)} DESC LIMIT 1"
        )
    ).scalar()
    return None if value is None else str(value)


def planned_rows(conn: Connection, sql: str) -> int:
    """The planner's row estimate for a query."""
    plan = conn.execute(text(f"EXPLAIN (FORMAT JSON) {sql}")).scalar_one()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


def count_budget_ms() -> int:
    """How long creation may count the rows to update (COUNT_BUDGET_MS)."""
    return int(os.environ.get("RUNBOOK_COUNT_BUDGET_MS", COUNT_BUDGET_MS))


def where_of(spec: Spec) -> str:
    """`` WHERE (…)`` of the backfill's condition, or nothing."""
    return f" WHERE (\n{embed(spec.where_sql)}\n)" if spec.where_sql else ""


def estimate_rows(conn: Connection, table: Table, spec: Spec, table_rows: int) -> tuple[int, str]:
    """Rows the backfill will update: counted when that takes less than count_budget_ms(),
    else the planner's guess (which create() replaces with the key marks' estimate)."""
    where = where_of(spec)
    budget = count_budget_ms()
    if budget > 0:
        timeout = text("SELECT set_config('statement_timeout', :ms, true)")
        before = conn.execute(text("SELECT current_setting('statement_timeout')")).scalar_one()
        try:
            with conn.begin_nested():
                conn.execute(timeout, {"ms": str(budget)})
                count = conn.execute(text(f"SELECT count(*) FROM {table.name}{where}"))
                # A savepoint released keeps its settings: the statements after it get theirs.
                conn.execute(timeout, {"ms": before})
                return int(count.scalar_one()), "counted"
        except DBAPIError as exc:
            if sqlstate(exc) != QUERY_CANCELED:
                raise
    return planned_rows(conn, f"SELECT 1 FROM {table.name}{where}"), "planner"


def slice_bounds(
    conn: Connection, table: Table, key: str, slices: int, upper: str, table_rows: int
) -> list[str]:
    """The slices' last keys, ascending, ending with ``upper``: quantiles of the key (from a
    sample of a large table), so each slice holds about as many rows. Fewer slices than asked
    when the table has fewer distinct keys."""
    if slices == 1:
        return [upper]
    sample = ""
    if table_rows > SAMPLE_ABOVE_ROWS:
        sample = f" TABLESAMPLE SYSTEM ({min(100.0, 100.0 * SAMPLE_ABOVE_ROWS / table_rows)})"
    fractions = [i / slices for i in range(1, slices)]
    cuts = conn.execute(
        text(
            "SELECT CAST(q.k AS text) AS k FROM unnest((SELECT percentile_disc(:f) WITHIN GROUP "
            f"(ORDER BY t.{quote(key)}) FROM {table.name} t{sample})) WITH ORDINALITY AS q(k, n) "
            f"WHERE q.k IS NOT NULL AND q.k < (SELECT t.{quote(key)} FROM {table.name} t "
            f"ORDER BY t.{quote(key)} DESC LIMIT 1) ORDER BY q.n"
        ),
        {"f": fractions},
    ).scalars()
    bounds: list[str] = []
    for cut in cuts:
        if not bounds or bounds[-1] != cut:
            bounds.append(str(cut))
    return [*bounds, upper]
