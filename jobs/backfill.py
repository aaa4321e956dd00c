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

Connector = Engine | Callable[[], Connection]


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
        raise BadSpec(f"table {table!r} does not exist; name it as table or schema.table")
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


def _estimate(conn: Connection, table: _Table, spec: Spec) -> tuple[int, str]:
    """Rows the backfill will update: counted on a small table, else the planner's guess."""
    where = f" WHERE (\n{_embed(spec.where_sql)}\n)" if spec.where_sql else ""
    if _planned_rows(conn, f"SELECT 1 FROM {table.name}") < COUNT_BELOW_ROWS:
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


def create(conn: Connection, target_name: str, spec: Spec, run_id: str | None = None) -> str:
    """Check ``spec`` against the database and record the backfill; its id.

    It is ``enqueued`` (claim it, then run slices), or ``succeeded`` at once when the table
    is empty. Raises BadSpec or UnusableKey with one line for the operator.
    """
    spec.check()
    try:  # every check first: bad input leaves the database as it was, ledger included
        table = _table(conn, spec.table)
        key_type = _key_type(conn, table, spec.key)
        _check_statement(conn, table, spec, key_type)
        upper = _upper_key(conn, table, spec.key)
        estimate, kind = _estimate(conn, table, spec)
    finally:
        if conn.in_transaction():
            conn.rollback()
    ledger.ensure(conn)
    return ledger.create_backfill(
        conn,
        target=target_name,
        run_id=run_id,
        table_name=table.name,
        key_column=spec.key,
        key_type=key_type,
        set_sql=spec.set_sql,
        where_sql=spec.where_sql,
        state=ENQUEUED if upper is not None else SUCCEEDED,
        finished=upper is None,
        upper_key=upper,
        rows_total_estimate=estimate,
        estimate_kind=kind,
        settings=spec.settings(),
    )


# -- operator requests ------------------------------------------------------------------------


def get(conn: Connection, backfill_id: str) -> ledger.Backfill:
    """The backfill; UnknownBackfill when the ledger has none with that id."""
    found = ledger.get_backfill(conn, backfill_id)
    if found is None:
        raise UnknownBackfill(f"unknown backfill {backfill_id!r}; `runbook backfills` lists them")
    return found


def claim(conn: Connection, backfill_id: str, *, resume: bool = False) -> int:
    """Take the backfill over with a new generation (fencing every earlier worker); it.

    Without ``resume`` (a start, a reconciler's takeover) a pending pause or cancel stays;
    with it (the operator's resume) a paused or errored backfill runs again.
    """
    generation = ledger.claim(conn, backfill_id, RESUME if resume else CLAIM)
    if generation is None:
        raise UnknownBackfill(f"unknown backfill {backfill_id!r}; `runbook backfills` lists them")
    return generation


def _request(conn: Connection, backfill_id: str, moves: dict[str, str]) -> str:
    """Move the backfill as ``moves`` says for the state it is in; the new state."""
    done = ledger.set_state(conn, backfill_id, moves, TRANSITIONS, terminal=TERMINAL)
    if done is None:
        raise UnknownBackfill(f"unknown backfill {backfill_id!r}; `runbook backfills` lists them")
    return done[1]


def pause(conn: Connection, backfill_id: str) -> str:
    """Ask the backfill to pause; it stops before its next batch (``pausing`` → ``paused``)."""
    return _request(conn, backfill_id, PAUSE)


def cancel(conn: Connection, backfill_id: str) -> str:
    """Ask the backfill to stop for good; batches already committed stay."""
    return _request(conn, backfill_id, CANCEL)


# -- the walk ---------------------------------------------------------------------------------


def _lower(key: str, key_type: str, has_lo: bool) -> str:
    return f"{key} > CAST(:lo AS {key_type}) AND " if has_lo else ""


def _bound_sql(table: str, key: str, key_type: str, has_lo: bool) -> str:
    """The batch's last key: the ``:n``-th key after ``:lo``, or the last one up to ``:upper``."""
    return (
        f"SELECT CAST(s.k AS text) AS bound FROM (SELECT t.{key} AS k FROM {table} t "
        f"WHERE {_lower('t.' + key, key_type, has_lo)}t.{key} <= CAST(:upper AS {key_type}) "
        f"ORDER BY t.{key} LIMIT :n) s ORDER BY s.k DESC LIMIT 1"
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
    lo: str | None = None
    hi: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi}


def _move(conn: Connection, bf: ledger.Backfill, new: str, **error: Any) -> None:
    """A worker's own state change, inside its batch transaction, checked against the table."""
    check_transition(bf.state, new)
    log.info("backfill %s: %s -> %s", bf.id, bf.state, new)
    ledger.mark_backfill(conn, bf, new, finished=new in TERMINAL, **error)


class _Walk:
    """One slice's batches on its own connection, as one generation."""

    def __init__(
        self, connector: Connector, backfill_id: str, generation: int, max_attempts: int
    ) -> None:
        self.connector = connector
        self.id = backfill_id
        self.generation = generation
        self.max_attempts = max_attempts
        self.conn: Connection | None = None
        self.settings: ledger.Backfill | None = None
        self.size: int | None = None
        self.min_batch = 1
        self.sleep_ms = 0
        self.range = _Range()

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
        """The pause after each batch (``sleep_ms``; the batch counted it as throttled)."""
        if self.sleep_ms > 0:
            time.sleep(self.sleep_ms / 1000)

    def batch(self, backoff_s: float) -> str:
        """One batch, retried while it fails transiently; CONTINUE or where it stopped."""
        attempt = 1
        while True:
            try:
                return self.attempt(attempt)
            except DBAPIError as exc:
                self.recover()
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
        """One try of one batch, in one transaction."""
        conn = self.connection()
        self.range = _Range()
        settings = self.settings or self.load(conn)
        with conn.begin():
            conn.execute(
                text(
                    "SELECT set_config('lock_timeout', :lock, true), "
                    "set_config('statement_timeout', :stmt, true)"
                ),
                {"lock": str(settings.lock_timeout_ms), "stmt": str(settings.statement_timeout_ms)},
            )
            bf = ledger.lock_backfill(conn, self.id)
            if bf is None:
                raise UnknownBackfill(f"unknown backfill {self.id!r}")
            stop = self.verdict(conn, bf)
            if stop is not None:
                return stop
            size = self.size = self.size or bf.batch_size
            self.range.lo = bf.cursor
            hi = self.bound(conn, bf, size)
            if hi is None:
                _move(conn, bf, SUCCEEDED)
                return SUCCEEDED
            self.range.hi = hi
            started = time.monotonic()
            rows = self.update(conn, bf, hi)
            ms = (time.monotonic() - started) * 1000
            self.size = next_batch_size(
                size,
                ms,
                target_ms=bf.target_batch_ms,
                min_batch=bf.min_batch,
                max_batch=bf.max_batch,
            )
            ledger.record_batch(
                conn,
                bf,
                lo=bf.cursor,
                hi=hi,
                batch_size=size,
                rows=rows,
                duration_ms=round(ms),
                attempt=attempt,
                generation=self.generation,
                next_batch_size=self.size,
                throttled_ms=bf.sleep_ms,
            )
        return CONTINUE

    def verdict(self, conn: Connection, bf: ledger.Backfill) -> str | None:
        """Why this worker must not do a batch now (fenced, paused, cancelled…), or None."""
        if bf.generation != self.generation:
            return FENCED
        if bf.state == PAUSING:
            _move(conn, bf, PAUSED)
            return PAUSED
        if bf.state == CANCELLING:
            _move(conn, bf, CANCELLED)
            return CANCELLED
        if bf.state != RUNNING:
            return bf.state
        if bf.key_type not in KEY_TYPES.values():
            raise BadSpec(f"backfill {bf.id}: unsupported key type {bf.key_type!r}")
        return None

    def bound(self, conn: Connection, bf: ledger.Backfill, size: int) -> str | None:
        """The last key of the next batch; None when the walk is done."""
        if bf.upper_key is None:
            return None
        sql = _bound_sql(bf.table_name, quote(bf.key_column), bf.key_type, bf.cursor is not None)
        value = conn.execute(
            text(sql), {"lo": bf.cursor, "upper": bf.upper_key, "n": size}
        ).scalar()
        return None if value is None else str(value)

    def update(self, conn: Connection, bf: ledger.Backfill, hi: str) -> int:
        """Run the batch's UPDATE; the rows it changed."""
        sql = _update_sql(
            bf.table_name,
            quote(bf.key_column),
            bf.key_type,
            bf.set_sql,
            bf.where_sql,
            bf.cursor is not None,
        )
        return int(conn.execute(text(sql), {"lo": bf.cursor, "hi": hi}).rowcount)

    def fail(self, exc: DBAPIError, attempts: int) -> str:
        """Record the backfill errored with the failing range (the cursor stays before it)."""
        lo, hi = self.range.lo, self.range.hi
        where = f"keys ({'start' if lo is None else lo}, {'?' if hi is None else hi}]"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        message = f"batch over {where} failed{tries}: {describe(exc)}"
        try:
            conn = self.connection()
            with conn.begin():
                bf = ledger.lock_backfill(conn, self.id)
                if bf is None or bf.generation != self.generation:
                    return FENCED
                if ERRORED not in TRANSITIONS[bf.state]:
                    return bf.state
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
    budget_s: float = 2.0,
    max_attempts: int = MAX_ATTEMPTS,
    backoff_s: float = BACKOFF_S,
) -> str:
    """Do batches for about ``budget_s`` seconds as ``generation``.

    Returns CONTINUE (work is left: enqueue the next slice), FENCED (a newer generation owns
    the backfill), or the state it stopped in: succeeded, paused, cancelled, errored (or
    enqueued / any other state it found and left alone).
    """
    walk = _Walk(connector, backfill_id, generation, max_attempts)
    deadline = time.monotonic() + budget_s
    try:
        while True:
            outcome = walk.batch(backoff_s)
            if outcome != CONTINUE:
                return outcome
            walk.sleep()
            if time.monotonic() >= deadline:
                return CONTINUE
    finally:
        walk.close()
