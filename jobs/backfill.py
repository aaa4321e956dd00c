"""Backfills: a batched, resumable UPDATE over a large table, walked by a unique key.

The walk is keyset pagination on one NOT NULL column with a unique index of its own: each
batch takes the next ``batch_size`` keys after the cursor, never an OFFSET into the table.
Each batch is one transaction on the slice's own connection, which

1. locks the backfill's ledger row (``FOR UPDATE``) and checks that the caller's generation
   is still the current one and that no pause or cancel was asked for;
2. picks the batch's upper key, updates ``key > cursor AND key <= hi AND (where)``;
3. records the batch and moves the cursor to ``hi``;

and commits all of it at once. So a crash, a redelivered task or two workers racing can
neither lose a batch nor apply one twice: the cursor is read under the row lock in the same
transaction that moves it, and a zombie holding an old generation is refused at its next
batch. The walk ends when no key is left up to ``upper_key`` (the largest key when the
backfill was created), never by re-scanning for the predicate, so a SET that leaves its
WHERE true still ends. Rows inserted after the start with a key above ``upper_key`` (serial
keys) or behind the cursor (random uuid keys) are not visited: the application, already
writing the new value (expand phase), covers them.

Keys are compared by PostgreSQL only (the cursor is stored as text and cast back to the
key's type in SQL), so uuid and text keys walk in the column's own order and collation.

The SET and WHERE texts are SQL fragments interpolated into the UPDATE: validate an
operator's input with ``jobs.sqlguard`` before it reaches a Spec.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pglast import parse_sql
from pglast.parser import ParseError
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from jobs import ledger
from jobs.errors import (  # noqa: F401 - re-exported for callers of the engine
    BackfillError,
    BackfillInterrupted,
    BadSpec,
    IsolationFailed,
    UnknownBackfill,
    UnusableKey,
)
from jobs.migrate import describe, sqlstate
from jobs.states import (  # noqa: F401 - the backfill state machine lives in jobs/states.py
    BACKFILL_CANCEL as CANCEL,
)
from jobs.states import BACKFILL_CLAIM as CLAIM
from jobs.states import BACKFILL_PAUSE as PAUSE
from jobs.states import BACKFILL_RESUME as RESUME
from jobs.states import BACKFILL_TERMINAL as TERMINAL
from jobs.states import BACKFILL_TRANSITIONS as TRANSITIONS
from jobs.states import (
    CANCELLED,
    CANCELLING,
    ENQUEUED,
    ERRORED,
    PAUSED,
    PAUSING,
    RUNNING,
    SUCCEEDED,
)
from jobs.states import (
    check_backfill_transition as check_transition,
)

log = logging.getLogger("runbook.backfill")

CONTINUE = "continue"  # the slice's time is up and work is left: enqueue the next slice
FENCED = "fenced"  # a newer generation owns the backfill: this worker stops

# format_type() of a usable key -> the type its cursor is cast to.
KEY_TYPES = {
    "smallint": "smallint",
    "integer": "integer",
    "bigint": "bigint",
    "uuid": "uuid",
    "text": "text",
    "character varying": "varchar",
}
COUNT_BELOW_ROWS = 1_000_000  # below this many rows (planner estimate) the estimate is counted
GROWTH = 1.2  # a fast batch grows the next one by at most this factor
MAX_ATTEMPTS = 5
BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
QUERY_CANCELED = "57014"
# Worth retrying: lock_not_available, query_canceled (statement timeout), deadlock,
# serialization failure, server shutting down or starting, too many connections; and the
# whole class 08 (connection exceptions).
TRANSIENT_SQLSTATES = frozenset(
    {"55P03", QUERY_CANCELED, "40P01", "40001", "57P01", "57P02", "57P03", "53300"}
)

MAX_SLICES = 64
ON_ERROR = ("stop", "isolate")
SAMPLE_ABOVE_ROWS = 200_000  # slice bounds come from a sample of a table larger than this
SIGNAL_EVERY_S = 1.0  # how often a slice looks at the database's signals
THROTTLE_STEP_S = 0.5  # how long it waits before looking again
BLOCKED_PAUSE_S = 0.05  # after a batch that made sessions wait: let them run first
STOPPED = "stopped"  # this slice stopped; the backfill's state is another slice's to settle

Connector = Engine | Callable[[], Connection]
# The bound and the UPDATE of every batch, parsed once per text (text() costs ~50 us).
_cached_text = functools.lru_cache(maxsize=256)(text)
_UNKNOWN = object()
OnBatch = Callable[[], None]


@dataclass(frozen=True)
class Spec:
    """What to update and how fast. ``set_sql``/``where_sql`` must be validated SQL."""

    table: str
    key: str
    set_sql: str
    where_sql: str | None = None
    batch_size: int = 1000
    min_batch: int = 100
    max_batch: int = 50000
    target_batch_ms: int = 50
    sleep_ms: int = 0
    lock_timeout_ms: int = 2000
    statement_timeout_ms: int = 30000
    slices: int = 1
    on_error: str = "stop"  # or "isolate": bisect a failing batch, skip the offending rows
    max_xact_age_s: int = 600  # wait while a transaction this old holds back vacuum; 0: never

    def check(self) -> None:
        """Raise BadSpec for settings that cannot work."""
        if not self.set_sql.strip():
            raise BadSpec("the backfill has nothing to SET; give --set 'column = expression'")
        if not 1 <= self.min_batch <= self.batch_size <= self.max_batch:
            raise BadSpec(
                f"batch sizes must satisfy 1 <= min ({self.min_batch}) <= batch size "
                f"({self.batch_size}) <= max ({self.max_batch})"
            )
        for name in ("target_batch_ms", "lock_timeout_ms", "statement_timeout_ms"):
            if getattr(self, name) < 1:
                raise BadSpec(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sleep_ms < 0:
            raise BadSpec(f"sleep_ms must be 0 or more, got {self.sleep_ms}")
        if not 1 <= self.slices <= MAX_SLICES:
            raise BadSpec(f"--slices must be between 1 and {MAX_SLICES}, got {self.slices}")
        if self.on_error not in ON_ERROR:
            raise BadSpec(f"--on-error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.max_xact_age_s < 0:
            raise BadSpec(f"max_xact_age_s must be 0 (off) or more, got {self.max_xact_age_s}")

    def settings(self) -> dict[str, int]:
        """The batch sizes, pacing and timeouts, as the ledger stores them."""
        return {
            "batch_size": self.batch_size,
            "min_batch": self.min_batch,
            "max_batch": self.max_batch,
            "target_batch_ms": self.target_batch_ms,
            "sleep_ms": self.sleep_ms,
            "lock_timeout_ms": self.lock_timeout_ms,
            "statement_timeout_ms": self.statement_timeout_ms,
            "max_xact_age_s": self.max_xact_age_s,
        }


# -- the table and its key --------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
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


def _table(conn: Connection, table: str) -> _Table:
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
    return _Table(oid=int(row.oid), name=str(row.name))


def _columns(conn: Connection, table: _Table) -> list[_Column]:
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


def _choose(columns: list[_Column], table: _Table) -> str:
    """'choose --key …' for a message, or why the table has no usable key at all."""
    usable = [c.name for c in columns if c.usable]
    if usable:
        return f"choose --key {' or '.join(usable)}"
    return (
        f"table {table.name} has no usable key (no primary key or unique NOT NULL column of "
        f"type {', '.join(KEY_TYPES)}); add one"
    )


def _key_type(conn: Connection, table: _Table, key: str) -> str:
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
    return _key_type(conn, _table(conn, table), key)


def candidate_keys(conn: Connection, table: str) -> list[str]:
    """The columns that could walk ``table``, its primary key first."""
    return [c.name for c in _columns(conn, _table(conn, table)) if c.usable]


# -- creating a backfill ----------------------------------------------------------------------


def _embed(fragment: str) -> str:
    """An SQL fragment made safe for ``text()``: its colons are not bind parameters."""
    return fragment.replace(":", "\\:")


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


def _check_statement(conn: Connection, table: _Table, spec: Spec, key_type: str) -> None:
    """Plan (without running) the batch UPDATE, so a bad SET or WHERE fails now."""
    _check_fragments(spec)
    sql = _update_sql(table.name, quote(spec.key), key_type, spec.set_sql, spec.where_sql, True)
    try:
        with conn.begin_nested():
            conn.execute(text(f"EXPLAIN {sql}"), {"lo": None, "hi": None})
    except DBAPIError as exc:
        raise BadSpec(
            f"the backfill's SET or WHERE does not work on {table.name}: {describe(exc)}"
        ) from None


def _upper_key(conn: Connection, table: _Table, key: str) -> str | None:
    """The largest key now, as text; None for an empty table."""
    value = conn.execute(
        text(
            f"SELECT CAST(t.{quote(key)} AS text) AS upper_key FROM {table.name} t "
            f"ORDER BY t.{quote(key)} DESC LIMIT 1"
        )
    ).scalar()
    return None if value is None else str(value)


def _planned_rows(conn: Connection, sql: str) -> int:
    """The planner's row estimate for a query."""
    plan = conn.execute(text(f"EXPLAIN (FORMAT JSON) {sql}")).scalar_one()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])


def _estimate(conn: Connection, table: _Table, spec: Spec, table_rows: int) -> tuple[int, str]:
    """Rows the backfill will update: counted on a small table, else the planner's guess."""
    where = f" WHERE (\n{_embed(spec.where_sql)}\n)" if spec.where_sql else ""
    if table_rows < COUNT_BELOW_ROWS:
        try:
            with conn.begin_nested():
                conn.execute(
                    text("SELECT set_config('statement_timeout', :ms, true)"),
                    {"ms": str(spec.statement_timeout_ms)},
                )
                count = conn.execute(text(f"SELECT count(*) FROM {table.name}{where}"))
                return int(count.scalar_one()), "counted"
        except DBAPIError as exc:
            if sqlstate(exc) != QUERY_CANCELED:
                raise
    return _planned_rows(conn, f"SELECT 1 FROM {table.name}{where}"), "planner"


def _bounds(
    conn: Connection, table: _Table, key: str, slices: int, upper: str, table_rows: int
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


@dataclass(frozen=True)
class _Plan:
    table: _Table
    key_type: str
    upper: str | None
    table_rows: int
    estimate: int
    estimate_kind: str


def _prepare(conn: Connection, spec: Spec) -> _Plan:
    """Every check of ``spec`` against the database, read-only; what the walk needs."""
    spec.check()
    table = _table(conn, spec.table)
    key_type = _key_type(conn, table, spec.key)
    _check_statement(conn, table, spec, key_type)
    upper = _upper_key(conn, table, spec.key)
    table_rows = _planned_rows(conn, f"SELECT 1 FROM {table.name}")
    estimate, kind = _estimate(conn, table, spec, table_rows)
    return _Plan(table, key_type, upper, table_rows, estimate, kind)


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
        plan = _prepare(conn, spec)
        bounds = (
            []
            if plan.upper is None
            else _bounds(conn, plan.table, spec.key, spec.slices, plan.upper, plan.table_rows)
        )
    finally:
        if conn.in_transaction():
            conn.rollback()
    ledger.ensure(conn)
    return ledger.create_backfill(
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
        rows_total_estimate=plan.estimate,
        estimate_kind=plan.estimate_kind,
        settings=spec.settings(),
    )


def dry_run(conn: Connection, spec: Spec, batches: int = 3) -> dict[str, Any]:
    """Run the first ``batches`` batches inside one transaction that is rolled back; what they
    did and the whole backfill's projected time. Nothing is kept, not even in the ledger (the
    sampled rows are locked for the fraction of a second the transaction lasts)."""
    try:
        plan = _prepare(conn, spec)
        samples: list[dict[str, Any]] = []
        key = quote(spec.key)
        with conn.begin_nested():
            _set_timeouts(conn, spec.lock_timeout_ms, spec.statement_timeout_ms)
            cursor, size = None, spec.batch_size
            while plan.upper is not None and len(samples) < batches:
                bound = _bound_sql(plan.table.name, key, plan.key_type, cursor is not None)
                hi = conn.execute(
                    text(bound), {"lo": cursor, "upper": plan.upper, "n": size}
                ).scalar()
                if hi is None:
                    break
                sql = _update_sql(
                    plan.table.name,
                    key,
                    plan.key_type,
                    spec.set_sql,
                    spec.where_sql,
                    cursor is not None,
                )
                started = time.monotonic()
                rows = conn.execute(text(sql), {"lo": cursor, "hi": str(hi)}).rowcount
                ms = (time.monotonic() - started) * 1000
                samples.append({"keys": size, "rows": int(rows), "ms": round(ms, 1)})
                cursor = str(hi)
                size = next_batch_size(
                    size,
                    ms,
                    target_ms=spec.target_batch_ms,
                    min_batch=spec.min_batch,
                    max_batch=spec.max_batch,
                )
            conn.rollback()
    except DBAPIError as exc:
        raise BadSpec(f"the dry run's batch failed: {describe(exc)}") from None
    finally:
        if conn.in_transaction():
            conn.rollback()
    return _projection(spec, plan, samples)


def _projection(spec: Spec, plan: _Plan, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The dry run's report: per batch, on average, and projected over the whole key range."""
    keys = sum(s["keys"] for s in samples)
    ms = sum(s["ms"] for s in samples)
    rows = sum(s["rows"] for s in samples)
    # Keys walked per millisecond, sleeps between batches included; slices share the range.
    per_ms = keys / (ms + spec.sleep_ms * len(samples)) if keys and ms else 0.0
    projected = plan.table_rows / per_ms / 1000 / spec.slices if per_ms else 0.0
    return {
        "table": plan.table.name,
        "key": spec.key,
        "set": spec.set_sql,
        "where": spec.where_sql,
        "batches": samples,
        "rows_per_batch": round(rows / len(samples), 1) if samples else 0,
        "ms_per_batch": round(ms / len(samples), 1) if samples else 0,
        "table_rows": plan.table_rows,
        "rows_to_update": plan.estimate,
        "estimate": plan.estimate_kind,
        "slices": spec.slices,
        "projected_s": round(projected, 3),  # a small table projects to milliseconds
        "rolled_back": True,
    }


# -- operator requests ------------------------------------------------------------------------


def get(conn: Connection, backfill_id: str) -> ledger.Backfill:
    """The backfill; UnknownBackfill when the ledger has none with that id."""
    found = ledger.get_backfill(conn, backfill_id)
    if found is None:
        raise UnknownBackfill(f"unknown backfill {backfill_id!r}; `runbook backfills` lists them")
    return found


def start(conn: Connection, backfill_id: str, *, resume: bool = False) -> list[tuple[int, int]]:
    """Take the backfill over: each unfinished slice gets a new generation (fencing every
    earlier worker); [(slice, generation)], one task to send for each.

    Without ``resume`` (a start, a reconciler's takeover) a pending pause or cancel stays;
    with it (the operator's resume) a paused or errored backfill runs again.
    """
    slices = ledger.claim(conn, backfill_id, RESUME if resume else CLAIM, fresh=resume)
    if slices is None:
        raise UnknownBackfill(f"unknown backfill {backfill_id!r}; `runbook backfills` lists them")
    return slices


def _request(conn: Connection, backfill_id: str, moves: dict[str, str]) -> str:
    """Move the backfill as ``moves`` says for the state it is in; the new state."""
    done = ledger.set_state(conn, backfill_id, moves, TRANSITIONS, terminal=TERMINAL)
    if done is None:
        raise UnknownBackfill(f"unknown backfill {backfill_id!r}; `runbook backfills` lists them")
    return done[1]


def pause(conn: Connection, backfill_id: str) -> str:
    """Ask the backfill to pause; its slices stop before their next batch (``pausing`` →
    ``paused`` once all have)."""
    return _request(conn, backfill_id, PAUSE)


def cancel(conn: Connection, backfill_id: str) -> str:
    """Ask the backfill to stop for good; batches already committed stay."""
    return _request(conn, backfill_id, CANCEL)


def settled_state(state: str, slices: list[str]) -> str | None:
    """What the backfill becomes once its slices are as ``slices`` say, or None (no change):
    succeeded when every slice is done, paused or cancelled once none is still active."""
    if slices and all(s == ledger.SLICE_DONE for s in slices):
        return {RUNNING: SUCCEEDED, PAUSING: SUCCEEDED, CANCELLING: CANCELLED}.get(state)
    if ledger.SLICE_ACTIVE in slices:
        return None
    return {PAUSING: PAUSED, CANCELLING: CANCELLED}.get(state)


def settle(conn: Connection, backfill_id: str) -> str | None:
    """Move the backfill as its slices allow (see settled_state); the state it reached, or
    None when it did not move. Commits."""
    with conn.begin():
        bf = ledger.lock_backfill(conn, backfill_id)
        if bf is None:
            return None
        new = settled_state(bf.state, ledger.slice_states(conn, backfill_id))
        if new is None or new == bf.state:
            return None
        _move(conn, bf, new)
    return new


def abandon(conn: Connection, backfill_id: str, slice_no: int, generation: int, why: str) -> str:
    """Stop a slice whose tasks keep dying (a poison slice): the backfill is errored with
    ``why`` and the slice's position, and resume can try again. The state reached. Commits."""
    with conn.begin():
        bf = ledger.lock_backfill(conn, backfill_id)
        piece = ledger.lock_slice(conn, backfill_id, slice_no)
        if bf is None or piece is None or piece.generation != generation:
            return FENCED
        ledger.set_slice_state(conn, piece, ledger.SLICE_STOPPED)
        if ERRORED not in TRANSITIONS[bf.state]:
            return bf.state
        where = _Range(slice_no, piece.position, None)
        message = f"slice {slice_no} after key {piece.position or 'start'}: {why}"
        _move(conn, bf, ERRORED, error=message, error_range=where.as_dict())
    return ERRORED


# -- the walk ---------------------------------------------------------------------------------


def _session(lock_ms: int, statement_ms: int) -> dict[str, str]:
    """A batch transaction's settings: its lock and statement timeouts, its name (see
    APPLICATION_NAME), and an asynchronous commit: its COMMIT need not wait for the WAL flush
    (about 10 ms a batch). A server crash can then lose only the last batches together with
    their cursor moves and batch rows (one transaction each), so none is lost or applied
    twice; every state change and hand-off commits synchronously, which flushes them."""
    return {
        "lock_timeout": str(lock_ms),
        "statement_timeout": str(statement_ms),
        "application_name": APPLICATION_NAME,
        "synchronous_commit": "off",
    }


def _set_timeouts(conn: Connection, lock_ms: int, statement_ms: int) -> None:
    """The settings of _session for the caller's transaction (the dry run's)."""
    settings = _session(lock_ms, statement_ms)
    sets = ", ".join(f"set_config(:n{i}, :v{i}, true)" for i in range(len(settings)))
    binds: dict[str, str] = {}
    for i, (name, value) in enumerate(settings.items()):
        binds[f"n{i}"], binds[f"v{i}"] = name, value
    conn.execute(text(f"SELECT {sets}"), binds)


def _lower(key: str, key_type: str, has_lo: bool) -> str:
    return f"{key} > CAST(:lo AS {key_type}) AND " if has_lo else ""


def _bound_sql(table: str, key: str, key_type: str, has_lo: bool) -> str:
    """The batch's last key: the ``:n``-th key after ``:lo``, or the last one up to ``:upper``.
    OFFSET steps over the keys without sorting them again (about 1 ms less per batch of
    10,000 keys than taking the largest of the first n); COALESCE evaluates the second
    subquery only when fewer than n keys are left."""
    keys = f"FROM {table} t WHERE {_lower('t.' + key, key_type, has_lo)}"
    keys += f"t.{key} <= CAST(:upper AS {key_type})"
    return (
        f"SELECT coalesce((SELECT CAST(t.{key} AS text) {keys} ORDER BY t.{key} "
        f"OFFSET CAST(:n AS bigint) - 1 LIMIT 1), (SELECT CAST(t.{key} AS text) {keys} "
        f"ORDER BY t.{key} DESC LIMIT 1)) AS bound"
    )


def _keys_sql(table: str, key: str, key_type: str, has_lo: bool) -> str:
    """Every key in (``:lo``, ``:hi``], in order (for bisecting a failing batch)."""
    return (
        f"SELECT CAST(t.{key} AS text) FROM {table} t WHERE "
        f"{_lower('t.' + key, key_type, has_lo)}t.{key} <= CAST(:hi AS {key_type}) "
        f"ORDER BY t.{key}"
    )


def _update_sql(
    table: str, key: str, key_type: str, set_sql: str, where_sql: str | None, has_lo: bool
) -> str:
    """The batch's UPDATE of keys in (``:lo``, ``:hi``]. The fragments sit on lines of their
    own, so that a trailing ``--`` comment in one cannot swallow the key bounds."""
    where = f" AND (\n{_embed(where_sql)}\n)" if where_sql else ""
    return (
        f"UPDATE {table} SET\n{_embed(set_sql)}\nWHERE {_lower(key, key_type, has_lo)}"
        f"{key} <= CAST(:hi AS {key_type}){where}"
    )


# Every batch transaction names itself, so that slices waiting for each other's ledger rows
# are not mistaken for the application's sessions.
APPLICATION_NAME = "runbook backfill"
# The application's sessions waiting for a lock that this session (inside its batch) holds.
# OFFSET 0 keeps pg_blocking_pids() to the few sessions that wait on a lock at all.
# pg_stat_get_activity() rather than the pg_stat_activity view: the view's joins (roles,
# databases) cost more than the count (0.1 ms instead of 0.26 ms a batch here).
_BLOCKED_SQL = (
    "SELECT count(*) FROM (SELECT a.pid FROM pg_stat_get_activity(NULL) a "
    f"WHERE a.wait_event_type = 'Lock' AND a.application_name <> '{APPLICATION_NAME}' "
    "OFFSET 0) w WHERE pg_backend_pid() = ANY(pg_blocking_pids(w.pid))"
)
# The database's reasons to hold back: the oldest open transaction of another client (it
# keeps the xmin horizon, so vacuum cannot remove the dead rows our batches leave), and
# autovacuum working on the table now.
_SIGNALS_SQL = (
    "SELECT (SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0) "
    "  FROM pg_stat_activity WHERE backend_xmin IS NOT NULL AND backend_type = 'client backend' "
    "  AND datname = current_database() AND pid <> pg_backend_pid()) AS oldest_xact_s, "
    "EXISTS (SELECT 1 FROM pg_stat_progress_vacuum v JOIN pg_stat_activity a USING (pid) "
    "  WHERE v.relid = to_regclass(:table) AND a.backend_type = 'autovacuum worker') "
    "AS autovacuum"
)


def next_batch_size(
    size: int, duration_ms: float, *, target_ms: int, min_batch: int, max_batch: int
) -> int:
    """The next batch's size: aimed at ``target_ms``, shrunk at once after a slow batch,
    grown by at most GROWTH after a fast one, within [min_batch, max_batch]."""
    ideal = size * target_ms / max(duration_ms, 0.1)
    if duration_ms > target_ms:
        new = math.floor(ideal)
    else:
        new = min(math.floor(size * GROWTH), math.floor(ideal))
        new = max(new, size + 1) if ideal >= size + 1 else max(new, size)
    return max(min_batch, min(max_batch, new))


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the batch may succeed (a lock or statement timeout, a deadlock, a
    lost connection) rather than fail the same way (a constraint, bad data, bad SQL)."""
    code = sqlstate(exc)
    if code is None:
        return isinstance(exc, OperationalError) or bool(
            isinstance(exc, DBAPIError) and exc.connection_invalidated
        )
    return code in TRANSIENT_SQLSTATES or code.startswith("08")


@dataclass
class _Range:
    slice: int = 0
    lo: str | None = None
    hi: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"slice": self.slice, "lo": self.lo, "hi": self.hi}


def _move(conn: Connection, bf: ledger.Backfill, new: str, **error: Any) -> None:
    """A worker's own state change, inside its transaction, checked against the table."""
    check_transition(bf.state, new)
    log.info("backfill %s: %s -> %s", bf.id, bf.state, new)
    ledger.mark_backfill(conn, bf, new, finished=new in TERMINAL, **error)


class _Walk:
    """One slice's batches on its own connection, as one generation."""

    def __init__(
        self,
        connector: Connector,
        backfill_id: str,
        slice_no: int,
        generation: int,
        max_attempts: int,
    ) -> None:
        self.connector = connector
        self.id = backfill_id
        self.slice = slice_no
        self.generation = generation
        self.max_attempts = max_attempts
        self.conn: Connection | None = None
        self.settings: ledger.Backfill | None = None
        self.size: int | None = None
        self.min_batch = 1
        self.sleep_ms = 0
        self.range = _Range(slice_no)
        self.isolating = False  # the next attempt bisects the batch (on_error = isolate)
        self.pending_throttle_ms = 0.0  # waited since the last batch row; goes into the next
        self.signals_checked = 0.0
        # After a batch of ours: where the next one starts and the slice's last key, so that
        # its bound is taken in the statement that opens it (_UNKNOWN: take it on its own).
        self.next_lo: str | None | object = _UNKNOWN
        self.upper: str | None = None

    def load(self, conn: Connection) -> ledger.Backfill:
        """The backfill's settings (timeouts, sizes, pacing), read once per slice."""
        self.settings = get(conn, self.id)
        self.min_batch, self.sleep_ms = self.settings.min_batch, self.settings.sleep_ms
        return self.settings

    def connection(self) -> Connection:
        if self.conn is None or self.conn.closed or self.conn.invalidated:
            self.close()
            factory = self.connector
            self.conn = factory.connect() if isinstance(factory, Engine) else factory()
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(DBAPIError):
                self.conn.close()
            self.conn = None

    def sleep(self) -> None:
        """The pause after each batch (``sleep_ms``), counted as throttled."""
        if self.sleep_ms > 0:
            time.sleep(self.sleep_ms / 1000)
            self.pending_throttle_ms += self.sleep_ms

    def throttle(self, deadline: float) -> bool:
        """Wait while the database asks us to (see _SIGNALS_SQL); False when the slice's time
        ran out still waiting (its continuation looks again)."""
        now = time.monotonic()
        if now - self.signals_checked < SIGNAL_EVERY_S:
            return True
        self.signals_checked = now
        waited, reason = 0.0, self.signal()
        cause = reason
        while reason is not None:
            if waited == 0.0:
                log.info("backfill %s slice %d: throttled, %s", self.id, self.slice, reason)
            if time.monotonic() + THROTTLE_STEP_S > deadline:
                self.note_throttle(waited, reason)
                return False
            time.sleep(THROTTLE_STEP_S)
            waited += THROTTLE_STEP_S * 1000
            reason = self.signal()
        if cause is not None:
            self.note_throttle(waited, cause)
        return True

    def signal(self) -> str | None:
        """Why the database wants us to wait now, or None."""
        conn = self.connection()
        settings = self.settings or self.load(conn)
        row = conn.execute(text(_SIGNALS_SQL), {"table": settings.table_name}).one()
        conn.rollback()
        limit = settings.max_xact_age_s
        if limit and row.oldest_xact_s >= limit:
            return (
                f"a transaction open for {round(row.oldest_xact_s)} s holds back vacuum "
                f"(limit {limit} s)"
            )
        if row.autovacuum:
            return f"autovacuum is working on {settings.table_name}"
        return None

    def note_throttle(self, waited_ms: float, reason: str) -> None:
        """Put the wait on the ledger now, in case no batch follows in this slice."""
        self.pending_throttle_ms += waited_ms
        ledger.add_throttled(
            self.connection(), self.id, self.slice, round(self.pending_throttle_ms), reason
        )
        self.pending_throttle_ms = 0.0

    def flush_throttle(self) -> None:
        """Waits no batch row recorded go on the slice's counter."""
        if self.pending_throttle_ms >= 1:
            with contextlib.suppress(DBAPIError):
                ledger.add_throttled(
                    self.connection(), self.id, self.slice, round(self.pending_throttle_ms)
                )
        self.pending_throttle_ms = 0.0

    def batch(self, backoff_s: float) -> str:
        """One batch, retried while it fails transiently; CONTINUE or where it stopped."""
        attempt = 1
        while True:
            try:
                outcome = self.attempt(attempt)
            except IsolationFailed as exc:
                self.recover()
                return self.fail(exc, attempt)
            except DBAPIError as exc:
                self.recover()
                if not is_transient(exc) and self.isolate_next(exc):
                    continue
                if not is_transient(exc) or attempt >= self.max_attempts:
                    return self.fail(exc, attempt)
                if sqlstate(exc) == QUERY_CANCELED and self.size:
                    self.size = max(self.min_batch, self.size // 2)
                log.warning(
                    "backfill %s: attempt %d of a batch failed (%s); retrying",
                    self.id,
                    attempt,
                    describe(exc),
                )
                time.sleep(min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
                attempt += 1
                continue
            if outcome == ledger.SLICE_DONE or outcome == STOPPED:
                return settle(self.connection(), self.id) or STOPPED
            return outcome

    def isolate_next(self, exc: DBAPIError) -> bool:
        """After a permanent error: whether the batch is tried again, bisected."""
        settings = self.settings
        if self.isolating or settings is None or settings.on_error != "isolate":
            return False
        log.warning("backfill %s: a batch failed (%s); isolating its rows", self.id, describe(exc))
        self.isolating = True
        return True

    def recover(self) -> None:
        """After a failed attempt: roll back, or drop a connection that broke."""
        conn = self.conn
        if conn is None:
            return
        try:
            if conn.invalidated:
                self.close()
            elif conn.in_transaction():
                conn.rollback()
        except DBAPIError:
            self.close()

    def attempt(self, attempt: int) -> str:
        """One try of one batch, in one transaction: four round trips (open with the bound,
        the UPDATE, the ledger rows, COMMIT), five for a task's first batch."""
        conn = self.connection()
        self.range = _Range(self.slice)
        settings = self.settings or self.load(conn)
        expected, ahead = self.next_lo, None
        if expected is not _UNKNOWN and self.size and settings.key_type in KEY_TYPES.values():
            lo_guess = None if expected is None else str(expected)
            sql = _bound_sql(
                settings.table_name,
                quote(settings.key_column),
                settings.key_type,
                lo_guess is not None,
            )
            ahead = (sql, {"lo": lo_guess, "upper": self.upper, "n": self.size})
        self.next_lo = _UNKNOWN  # until this batch commits
        with conn.begin():
            # One round trip: the timeouts, the slice locked, the backfill's flags and,
            # after a batch of ours, the next bound from where that one ended.
            opened = ledger.open_batch(
                conn,
                self.id,
                self.slice,
                _session(settings.lock_timeout_ms, settings.statement_timeout_ms),
                ahead,
            )
            if opened is None:
                raise UnknownBackfill(f"unknown backfill {self.id!r} or slice {self.slice}")
            piece, bf, bound = opened
            stop = self.verdict(conn, bf, piece)
            if stop is not None:
                return stop
            size = self.size = self.size or piece.batch_size
            self.range.lo = lo = piece.position
            if ahead is not None and lo == expected and size == ahead[1]["n"]:
                hi = None if bound is None else str(bound)
            else:  # a first batch, or the cursor moved under us (a duplicate delivery)
                hi = self.bound(conn, bf, piece, size)
            if hi is None:
                ledger.set_slice_state(conn, piece, ledger.SLICE_DONE)
                return ledger.SLICE_DONE
            self.range.hi = hi
            started = time.monotonic()
            if self.isolating:
                rows, skipped = self.bisect(conn, bf, lo, hi)
            else:
                rows, skipped = self.update(conn, bf, lo, hi), []
            ms = (time.monotonic() - started) * 1000
            grown = next_batch_size(
                size,
                ms,
                target_ms=bf.target_batch_ms,
                min_batch=bf.min_batch,
                max_batch=bf.max_batch,
            )
            # Our locks held others up: smaller batches, and let them go first. Whether they
            # did is counted in the same statement that records the batch.
            shrunk = max(bf.min_batch, min(grown, size // 2))
            blocked = ledger.record_batch(
                conn,
                bf,
                piece,
                hi=hi,
                batch_size=size,
                rows=rows,
                skipped=skipped,
                duration_ms=round(ms),
                attempt=attempt,
                generation=self.generation,
                next_batch_size=grown,
                throttled_ms=round(self.pending_throttle_ms),
                blocked_sql=_BLOCKED_SQL,
                next_if_blocked=shrunk,
            )
            self.size = shrunk if blocked else grown
        self.next_lo, self.upper = hi, piece.upper_key
        self.pending_throttle_ms = 0.0
        self.isolating = False
        if blocked:
            log.info("backfill %s: a batch made %d sessions wait; slowing down", self.id, blocked)
            time.sleep(BLOCKED_PAUSE_S)
            self.pending_throttle_ms += BLOCKED_PAUSE_S * 1000
        return CONTINUE

    def verdict(self, conn: Connection, bf: ledger.Backfill, piece: ledger.Slice) -> str | None:
        """Why this worker must not do a batch now (fenced, paused, cancelled…), or None."""
        if piece.generation != self.generation:
            return FENCED
        if piece.state != ledger.SLICE_ACTIVE:
            return STOPPED
        if bf.state != RUNNING:
            # A pause, a cancel or another slice's error: this slice stops; the last one to
            # stop settles the backfill's state.
            ledger.set_slice_state(conn, piece, ledger.SLICE_STOPPED)
            return STOPPED
        if bf.key_type not in KEY_TYPES.values():
            raise BadSpec(f"backfill {bf.id}: unsupported key type {bf.key_type!r}")
        return None

    def bound(
        self, conn: Connection, bf: ledger.Backfill, piece: ledger.Slice, size: int
    ) -> str | None:
        """The last key of the next batch; None when the slice's range is walked."""
        lo = piece.position
        sql = _bound_sql(bf.table_name, quote(bf.key_column), bf.key_type, lo is not None)
        value = conn.execute(
            _cached_text(sql), {"lo": lo, "upper": piece.upper_key, "n": size}
        ).scalar()
        return None if value is None else str(value)

    def update(self, conn: Connection, bf: ledger.Backfill, lo: str | None, hi: str) -> int:
        """Run the batch's UPDATE over keys in (lo, hi]; the rows it changed."""
        sql = _update_sql(
            bf.table_name,
            quote(bf.key_column),
            bf.key_type,
            bf.set_sql,
            bf.where_sql,
            lo is not None,
        )
        return int(conn.execute(_cached_text(sql), {"lo": lo, "hi": hi}).rowcount)

    def bisect(
        self, conn: Connection, bf: ledger.Backfill, lo: str | None, hi: str
    ) -> tuple[int, list[tuple[str, str]]]:
        """The batch's UPDATE in halves (each under a savepoint) down to the single rows that
        fail; rows updated, and [(key, error)] of the rows left alone."""
        sql = _keys_sql(bf.table_name, quote(bf.key_column), bf.key_type, lo is not None)
        keys = [str(k) for k in conn.execute(text(sql), {"lo": lo, "hi": hi}).scalars()]

        def part(i: int, j: int) -> tuple[int, list[tuple[str, str]]]:
            lower = keys[i - 1] if i else lo
            try:
                with conn.begin_nested():
                    return self.update(conn, bf, lower, keys[j - 1]), []
            except DBAPIError as exc:
                if is_transient(exc):
                    raise
                if j - i == 1:
                    return 0, [(keys[i], describe(exc))]
            middle = (i + j) // 2
            left, right = part(i, middle), part(middle, j)
            return left[0] + right[0], left[1] + right[1]

        rows, skipped = part(0, len(keys)) if keys else (0, [])
        if len(keys) > 1 and len(skipped) == len(keys):
            # Every row failed: the statement is wrong, not a few rows. Stop, don't skip all.
            raise IsolationFailed(
                f"every row of keys ({lo}, {hi}] failed ({skipped[0][1]}); the SET or WHERE is "
                "wrong for this table, not a few rows: fix it and start a new backfill"
            )
        for key, error in skipped:
            log.warning("backfill %s: key %s skipped: %s", self.id, key, error)
        return rows, skipped

    def fail(self, exc: DBAPIError | IsolationFailed, attempts: int) -> str:
        """Record the backfill errored with the failing range (the cursor stays before it)."""
        lo, hi = self.range.lo, self.range.hi
        where = f"keys ({'start' if lo is None else lo}, {'?' if hi is None else hi}]"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        reason = describe(exc) if isinstance(exc, DBAPIError) else str(exc)
        message = f"batch over {where} failed{tries}: {reason}"
        try:
            conn = self.connection()
            with conn.begin():
                bf = ledger.lock_backfill(conn, self.id)
                piece = ledger.lock_slice(conn, self.id, self.slice)
                if bf is None or piece is None or piece.generation != self.generation:
                    return FENCED
                ledger.set_slice_state(conn, piece, ledger.SLICE_STOPPED)
                if ERRORED not in TRANSITIONS[bf.state]:
                    return STOPPED
                _move(conn, bf, ERRORED, error=message, error_range=self.range.as_dict())
        except DBAPIError as again:
            self.close()
            raise BackfillInterrupted(
                f"backfill {self.id}: {message}; recording that failed too "
                f"({describe(again)}); it resumes from its last checkpoint"
            ) from None
        return ERRORED


def run_slice(
    connector: Connector,
    backfill_id: str,
    generation: int,
    *,
    slice_no: int = 0,
    budget_s: float = 2.0,
    max_attempts: int = MAX_ATTEMPTS,
    backoff_s: float = BACKOFF_S,
    on_batch: OnBatch | None = None,
) -> str:
    """Do one slice's batches for about ``budget_s`` seconds as ``generation``.

    Returns CONTINUE (work is left: enqueue the next task), FENCED (a newer generation owns
    the slice), the state this slice moved the backfill to (succeeded, paused, cancelled,
    errored), or STOPPED (the slice stopped or is done and the backfill's state is not its to
    settle yet: other slices are still active, or it was not running).
    """
    walk = _Walk(connector, backfill_id, slice_no, generation, max_attempts)
    deadline = time.monotonic() + budget_s
    try:
        while True:
            if not walk.throttle(deadline):
                return CONTINUE
            outcome = walk.batch(backoff_s)
            if outcome != CONTINUE:
                return outcome
            if on_batch is not None:
                on_batch()
            walk.sleep()
            if time.monotonic() >= deadline:
                return CONTINUE
    finally:
        walk.flush_throttle()
        walk.close()
