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
import logging
import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from jobs.backfill.control import FENCED, Range, get, move_state, settle
from jobs.backfill.keys import UNKNOWN, quote
from jobs.backfill.sizing import next_batch_size
from jobs.backfill.spec import KEY_TYPES, embed
from jobs.errors import BackfillInterrupted, BadSpec, IsolationFailed, UnknownBackfill
from jobs.ledger import backfills, slices
from jobs.pg.sqlstate import QUERY_CANCELED, describe, is_transient, sqlstate
from jobs.states import BACKFILL_TRANSITIONS as TRANSITIONS
from jobs.states import (
    ERRORED,
    RUNNING,
    SliceState,
)

log = logging.getLogger("runbook.backfill")

CONTINUE = "continue"  # the slice's time is up and work is left: enqueue the next slice
MAX_ATTEMPTS = 5
BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
SIGNAL_EVERY_S = 1.0  # how often a slice looks at the database's signals
THROTTLE_STEP_S = 0.5  # how long it waits before looking again
BLOCKED_PAUSE_S = 0.05  # after a batch that made sessions wait: let them run first
STOPPED = "stopped"  # this slice stopped; the backfill's state is another slice's to settle

Connector = Engine | Callable[[], Connection]
# The bound and the UPDATE of every batch, parsed once per text (text() costs ~50 us).
_cached_text = functools.lru_cache(maxsize=256)(text)
OnBatch = Callable[[], None]


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


def set_timeouts(conn: Connection, lock_ms: int, statement_ms: int) -> None:
    """The settings of _session for the caller's transaction (the dry run's)."""
    settings = _session(lock_ms, statement_ms)
    sets = ", ".join(f"set_config(:n{i}, :v{i}, true)" for i in range(len(settings)))
    binds: dict[str, str] = {}
    for i, (name, value) in enumerate(settings.items()):
        binds[f"n{i}"], binds[f"v{i}"] = name, value
    conn.execute(text(f"SELECT {sets}"), binds)


def _lower(key: str, key_type: str, has_lo: bool) -> str:
    return f"{key} > CAST(:lo AS {key_type}) AND " if has_lo else ""


def bound_sql(table: str, key: str, key_type: str, has_lo: bool) -> str:
    """The batch's last key: the ``:n``-th key after ``:lo``, or the last one up to ``:upper``.
    OFFSET steps over the keys without sorting them again (about 1 ms less per batch of
    10,000 keys than taking the largest of the first n); COALESCE evaluates the second
    subquery only when fewer than n keys are left."""
    keys = f"FROM {table} t WHERE {_lower('t.' + key, key_type, has_lo)}"
    keys += f"t.{key} <= CAST(:upper AS {key_type})"
    # The CAST is outside the subqueries: inside, every key stepped over was turned to text.
    return (
        f"SELECT CAST(coalesce((SELECT t.{key} {keys} ORDER BY t.{key} "
        f"OFFSET CAST(:n AS bigint) - 1 LIMIT 1), (SELECT t.{key} {keys} "
        f"ORDER BY t.{key} DESC LIMIT 1)) AS text) AS bound"
    )


def _keys_sql(table: str, key: str, key_type: str, has_lo: bool) -> str:
    """Every key in (``:lo``, ``:hi``], in order (for bisecting a failing batch)."""
    return (
        f"SELECT CAST(t.{key} AS text) FROM {table} t WHERE "
        f"{_lower('t.' + key, key_type, has_lo)}t.{key} <= CAST(:hi AS {key_type}) "
        f"ORDER BY t.{key}"
    )


def update_sql(
    table: str, key: str, key_type: str, set_sql: str, where_sql: str | None, has_lo: bool
) -> str:
    """The batch's UPDATE of keys in (``:lo``, ``:hi``]. The fragments sit on lines of their
    own, so that a trailing ``--`` comment in one cannot swallow the key bounds."""
    where = f" AND (\n{embed(where_sql)}\n)" if where_sql else ""
    return (
        f"UPDATE {table} SET\n{embed(set_sql)}\nWHERE {_lower(key, key_type, has_lo)}"
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
        self.settings: backfills.Backfill | None = None
        self.size: int | None = None
        self.min_batch = 1
        self.sleep_ms = 0
        self.range = Range(slice_no)
        self.isolating = False  # the next attempt bisects the batch (on_error = isolate)
        self.pending_throttle_ms = 0.0  # waited since the last batch row; goes into the next
        self.signals_checked = 0.0
        # After a batch of ours: where the next one starts and the slice's last key, so that
        # its bound is taken in the statement that opens it (UNKNOWN: take it on its own).
        self.next_lo: str | None | object = UNKNOWN
        self.upper: str | None = None

    def load(self, conn: Connection) -> backfills.Backfill:
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
        slices.add_throttled(
            self.connection(), self.id, self.slice, round(self.pending_throttle_ms), reason
        )
        self.pending_throttle_ms = 0.0

    def flush_throttle(self) -> None:
        """Waits no batch row recorded go on the slice's counter."""
        if self.pending_throttle_ms >= 1:
            with contextlib.suppress(DBAPIError):
                slices.add_throttled(
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
            if outcome == SliceState.DONE or outcome == STOPPED:
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
        """One try of one batch, in one transaction of three round trips (BEGIN with the
        opening statement and the bound, the UPDATE, the ledger rows with COMMIT), four for a
        task's first batch. The driver is in autocommit meanwhile, so that it sends no BEGIN
        or COMMIT of its own (one round trip each); the statements carry them instead."""
        conn = self.connection()
        driver = conn.connection.dbapi_connection
        assert driver is not None
        driver.autocommit = True
        try:
            return self.transaction(conn, attempt)
        except BaseException:
            # The server's transaction is ours to end: the driver's rollback sends nothing.
            with contextlib.suppress(Exception):
                cursor = driver.cursor()
                cursor.execute("ROLLBACK")
                cursor.close()
            raise
        finally:
            with contextlib.suppress(Exception):
                driver.autocommit = False

    def transaction(self, conn: Connection, attempt: int) -> str:
        """The batch's transaction (see attempt): committed by its last statement, or by a
        COMMIT of its own when it stops before the batch."""
        self.range = Range(self.slice)
        settings = self.settings or self.load(conn)
        expected, ahead = self.next_lo, None
        if expected is not UNKNOWN and self.size and settings.key_type in KEY_TYPES.values():
            lo_guess = None if expected is None else str(expected)
            sql = bound_sql(
                settings.table_name,
                quote(settings.key_column),
                settings.key_type,
                lo_guess is not None,
            )
            ahead = (sql, {"lo": lo_guess, "upper": self.upper, "n": self.size})
        self.next_lo = UNKNOWN  # until this batch commits
        with conn.begin():  # SQLAlchemy's bookkeeping: the driver sends nothing for it
            # One round trip: BEGIN, the timeouts, the slice locked, the backfill's flags and,
            # after a batch of ours, the next bound from where that one ended.
            opened = slices.open_batch(
                conn,
                self.id,
                self.slice,
                _session(settings.lock_timeout_ms, settings.statement_timeout_ms),
                ahead,
                begin=True,
            )
            if opened is None:
                raise UnknownBackfill(f"unknown backfill {self.id!r} or slice {self.slice}")
            piece, bf, bound = opened
            stop = self.verdict(conn, bf, piece)
            if stop is not None:
                conn.exec_driver_sql("COMMIT")
                return stop
            size = self.size = self.size or piece.batch_size
            self.range.lo = lo = piece.position
            if ahead is not None and lo == expected and size == ahead[1]["n"]:
                hi = None if bound is None else str(bound)
            else:  # a first batch, or the cursor moved under us (a duplicate delivery)
                hi = self.bound(conn, bf, piece, size)
            if hi is None:
                slices.set_slice_state(conn, piece, SliceState.DONE)
                conn.exec_driver_sql("COMMIT")
                return SliceState.DONE
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
            # did is counted in the same statement that records the batch (and commits).
            shrunk = max(bf.min_batch, min(grown, size // 2))
            blocked = slices.record_batch(
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
                commit=True,
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

    def verdict(
        self, conn: Connection, bf: backfills.Backfill, piece: backfills.Slice
    ) -> str | None:
        """Why this worker must not do a batch now (fenced, paused, cancelled…), or None."""
        if piece.generation != self.generation:
            return FENCED
        if piece.state != SliceState.ACTIVE:
            return STOPPED
        if bf.state != RUNNING:
            # A pause, a cancel or another slice's error: this slice stops; the last one to
            # stop settles the backfill's state.
            slices.set_slice_state(conn, piece, SliceState.STOPPED)
            return STOPPED
        if bf.key_type not in KEY_TYPES.values():
            raise BadSpec(f"backfill {bf.id}: unsupported key type {bf.key_type!r}")
        return None

    def bound(
        self, conn: Connection, bf: backfills.Backfill, piece: backfills.Slice, size: int
    ) -> str | None:
        """The last key of the next batch; None when the slice's range is walked."""
        lo = piece.position
        sql = bound_sql(bf.table_name, quote(bf.key_column), bf.key_type, lo is not None)
        value = conn.execute(
            _cached_text(sql), {"lo": lo, "upper": piece.upper_key, "n": size}
        ).scalar()
        return None if value is None else str(value)

    def update(self, conn: Connection, bf: backfills.Backfill, lo: str | None, hi: str) -> int:
        """Run the batch's UPDATE over keys in (lo, hi]; the rows it changed."""
        sql = update_sql(
            bf.table_name,
            quote(bf.key_column),
            bf.key_type,
            bf.set_sql,
            bf.where_sql,
            lo is not None,
        )
        return int(conn.execute(_cached_text(sql), {"lo": lo, "hi": hi}).rowcount)

    def bisect(
        self, conn: Connection, bf: backfills.Backfill, lo: str | None, hi: str
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
                bf = backfills.lock_backfill(conn, self.id)
                piece = slices.lock_slice(conn, self.id, self.slice)
                if bf is None or piece is None or piece.generation != self.generation:
                    return FENCED
                slices.set_slice_state(conn, piece, SliceState.STOPPED)
                if ERRORED not in TRANSITIONS[bf.state]:
                    return STOPPED
                move_state(conn, bf, ERRORED, error=message, error_range=self.range.as_dict())
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
