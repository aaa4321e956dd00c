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

The batch's statements are built in jobs/backfill/batch_sql.py. The SET and WHERE texts are
SQL fragments interpolated into the UPDATE: validate an operator's input with
jobs/backfill/sqlguard.py before it reaches a Spec.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from jobs.backfill.batch_sql import (
    BLOCKED_SQL,
    bound_sql,
    keys_sql,
    session_settings,
    update_sql,
)
from jobs.backfill.control import FENCED, Range, get, move_state, settle
from jobs.backfill.keys import UNKNOWN, quote
from jobs.backfill.pacing import OnWait, Pacing
from jobs.backfill.replicas import ReplicaWatch
from jobs.backfill.sizing import next_batch_size
from jobs.backfill.spec import KEY_TYPES
from jobs.errors import (
    BackfillInterrupted,
    BadSpec,
    IsolationFailed,
    UnknownBackfill,
)
from jobs.ledger import backfills, records, slices
from jobs.pg import backoff
from jobs.pg.sqlstate import QUERY_CANCELED, describe, is_transient, sqlstate
from jobs.states import BACKFILL_TRANSITIONS as TRANSITIONS
from jobs.states import (
    ERRORED,
    PAUSING,
    RUNNING,
    SliceState,
)

log = logging.getLogger("runbook.backfill")

CONTINUE = "continue"  # the slice's time is up and work is left: enqueue the next slice
MAX_ATTEMPTS = 5
BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
STOPPED = "stopped"  # this slice stopped; the backfill's state is another slice's to settle

Connector = Engine | Callable[[], Connection]
# Integer keys are unique whole numbers, so (lo, lo + n] holds at most n of them: where the
# last bound the index gave showed the keys dense (at least DENSE of the values in its range
# taken), the next batches are stepped by arithmetic instead, without the bound's index scan
# (1.5-2.5 ms of a 50 ms batch here), never holding more rows than a bound would. The index
# is asked again every RECHECK_EVERY batches, and after a stepped batch that updated nothing
# (a gap in the keys, where stepping would crawl).
STEPPED_KEY_TYPES = frozenset({"smallint", "integer", "bigint"})
DENSE = 0.9
RECHECK_EVERY = 20
# The bound and the UPDATE of every batch, parsed once per text (text() costs ~50 us).
_cached_text = functools.lru_cache(maxsize=256)(text)
OnBatch = Callable[[], None]
# A bound statement sent with the batch's opening one: (SQL, binds).
Ahead = tuple[str, dict[str, Any]]


class _Walk:
    """One slice's batches on its own connection, as one generation."""

    def __init__(
        self,
        connector: Connector,
        backfill_id: str,
        slice_no: int,
        generation: int,
        max_attempts: int,
        watch: ReplicaWatch | None = None,
        on_wait: OnWait | None = None,
    ) -> None:
        self.connector = connector
        self.id = backfill_id
        self.slice = slice_no
        self.generation = generation
        self.max_attempts = max_attempts
        self.conn: Connection | None = None
        self.settings: records.Backfill | None = None
        self.size: int | None = None
        self.min_batch = 1
        self.sleep_ms = 0
        self.range = Range(slice_no)
        self.isolating = False  # the next attempt bisects the batch (on_error = isolate)
        self.pacing = Pacing(backfill_id, slice_no, watch, on_wait)
        self.last_rows = 0  # of the last batch, for the WAL pacer's bytes per row
        # After a batch of ours: where the next one starts and the slice's last key, so that
        # its bound is taken in the statement that opens it (UNKNOWN: take it on its own).
        self.next_lo: str | None | object = UNKNOWN
        self.upper: str | None = None
        self.steps_left = 0  # batches that may still be stepped by arithmetic (STEPPED_…)

    def load(self, conn: Connection) -> records.Backfill:
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

    def settings_of(self, conn: Connection) -> backfills.Backfill:
        return self.settings or self.load(conn)

    # The waits between batches are jobs/backfill/pacing.py's.

    def sleep(self) -> None:
        self.pacing.sleep(self.sleep_ms)
        self.pacing.pace_wal(self.connection, self.last_rows)

    def throttle(self, deadline: float) -> bool:
        return self.pacing.throttle(deadline, self.connection, self.settings_of)

    def after_throttle(self) -> str:
        """The slice's time ran out waiting, or the throttle held past max_throttle: pause
        for it, or stop if a pause or cancel came meanwhile (no batch shows it), else
        CONTINUE."""
        if self.pacing.held_too_long is not None:
            return self.pause_itself(self.pacing.held_too_long)
        conn = self.connection()
        with conn.begin():
            piece = slices.lock_slice(conn, self.id, self.slice)
            bf = backfills.read_backfill(conn, self.id)
            if piece is None or bf is None:
                raise UnknownBackfill(f"unknown backfill {self.id!r} or slice {self.slice}")
            stop = self.verdict(conn, bf, piece)
        if stop == STOPPED:
            return settle(conn, self.id) or STOPPED
        return stop or CONTINUE

    def stop_own(self, conn: Connection) -> records.Backfill | None:
        """Within the caller's transaction: this slice stopped, and the backfill's row locked
        (in that order: the backfill's row first) for its state change; None when either is
        gone or a newer generation owns the slice."""
        bf = backfills.lock_backfill(conn, self.id)
        piece = slices.lock_slice(conn, self.id, self.slice)
        if bf is None or piece is None or piece.generation != self.generation:
            return None
        if piece.state == SliceState.ACTIVE:
            slices.set_slice_state(conn, piece, SliceState.STOPPED)
        return bf

    def pause_itself(self, reason: str) -> str:
        """Pause the backfill (pausing, paused once every slice stopped) with ``reason``."""
        log.warning("backfill %s slice %d: pausing: %s", self.id, self.slice, reason)
        conn = self.connection()
        with conn.begin():
            bf = self.stop_own(conn)
            if bf is None:
                return FENCED
            if bf.state == RUNNING:
                move_state(conn, bf, PAUSING)
                backfills.set_pause_reason(conn, self.id, reason)
        return settle(conn, self.id) or STOPPED

    def flush_throttle(self) -> None:
        self.pacing.flush(self.connection)

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
                time.sleep(backoff.delay(attempt, backoff_s, MAX_BACKOFF_S))
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
        settings = self.settings_of(conn)
        expected, ahead = self.next_lo, self.bound_ahead(settings)
        self.next_lo = UNKNOWN  # until this batch commits
        with conn.begin():  # SQLAlchemy's bookkeeping: the driver sends nothing for it
            # One round trip: BEGIN, the timeouts, the slice locked, the backfill's flags and,
            # after a batch of ours, the next bound from where that one ended.
            opened = slices.open_batch(
                conn,
                self.id,
                self.slice,
                session_settings(settings.lock_timeout_ms, settings.statement_timeout_ms),
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
            self.range.lo = piece.position
            stepped = self.stepping(bf, piece)
            if stepped:
                hi = self.step(piece, size)
            elif ahead is not None and piece.position == expected and size == ahead[1]["n"]:
                hi = None if bound is None else str(bound)
            else:  # a first batch, or the cursor moved under us (a duplicate delivery)
                hi = self.bound(conn, bf, piece, size)
            if hi is None:
                slices.set_slice_state(conn, piece, SliceState.DONE)
                conn.exec_driver_sql("COMMIT")
                return SliceState.DONE
            self.range.hi = hi
            lo = piece.position  # before apply moves the cursor to hi
            blocked = self.apply(conn, bf, piece, size, hi, attempt)
        self.committed(hi, piece.upper_key, blocked)
        self.judge_density(bf.key_type, lo, hi, size, stepped)
        return CONTINUE

    def stepping(self, bf: records.Backfill, piece: records.Slice) -> bool:
        """Whether this batch's bound is stepped by arithmetic (see STEPPED_KEY_TYPES)."""
        return (
            self.steps_left > 0
            and bf.key_type in STEPPED_KEY_TYPES
            and piece.position is not None
            and piece.upper_key is not None
            and not self.isolating
        )

    def step(self, piece: records.Slice, size: int) -> str | None:
        """The stepped bound: ``size`` key values on from the cursor, at most the slice's
        last key; None when the slice's range is walked."""
        lo, upper = int(str(piece.position)), int(str(piece.upper_key))
        return None if lo >= upper else str(min(lo + size, upper))

    def judge_density(
        self, key_type: str, lo: str | None, hi: str, size: int, stepped: bool
    ) -> None:
        """After a committed batch: whether the next ones may be stepped."""
        if stepped:
            self.steps_left = 0 if self.last_rows == 0 else self.steps_left - 1
        elif key_type in STEPPED_KEY_TYPES and lo is not None:
            # The index gave this bound: ``size`` keys over hi - lo values.
            dense = size >= DENSE * (int(hi) - int(lo))
            self.steps_left = RECHECK_EVERY if dense else 0

    def bound_ahead(self, settings: backfills.Backfill) -> Ahead | None:
        """After a batch of ours: the next batch's bound, to be taken in the statement that
        opens it (None: the bound is taken on its own, as for a task's first batch)."""
        expected = self.next_lo
        if expected is UNKNOWN or not self.size or settings.key_type not in KEY_TYPES.values():
            return None
        if self.steps_left > 0 and settings.key_type in STEPPED_KEY_TYPES:
            return None  # stepped, most likely (stepping decides once the slice is read)
        lo_guess = None if expected is None else str(expected)
        sql = bound_sql(
            settings.table_name,
            quote(settings.key_column),
            settings.key_type,
            lo_guess is not None,
        )
        return sql, {"lo": lo_guess, "upper": self.upper, "n": self.size}

    def apply(
        self,
        conn: Connection,
        bf: backfills.Backfill,
        piece: backfills.Slice,
        size: int,
        hi: str,
        attempt: int,
    ) -> int:
        """The batch's UPDATE over (cursor, hi], then its batch row and cursor move in the
        statement that commits; how many sessions it made wait. Sizes the next batch."""
        lo = piece.position
        started = time.monotonic()
        if self.isolating:
            rows, skipped = self.bisect(conn, bf, lo, hi)
        else:
            rows, skipped = self.update(conn, bf, lo, hi), []
        ms = (time.monotonic() - started) * 1000
        self.last_rows = rows
        grown = next_batch_size(
            size,
            ms,
            target_ms=bf.target_batch_ms,
            min_batch=bf.min_batch,
            max_batch=bf.max_batch,
            wal_cap=self.pacing.wal_cap(bf.target_batch_ms),
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
            throttled_ms=round(self.pacing.pending_ms),
            blocked_sql=BLOCKED_SQL,
            next_if_blocked=shrunk,
            commit=True,
        )
        self.size = shrunk if blocked else grown
        return blocked

    def committed(self, hi: str, upper: str | None, blocked: int) -> None:
        """After the batch's COMMIT: the next one starts at ``hi``; slow down if it blocked."""
        self.next_lo, self.upper = hi, upper
        self.pacing.pending_ms = 0.0
        self.isolating = False
        if blocked:
            self.pacing.after_blocking(blocked)

    def verdict(self, conn: Connection, bf: records.Backfill, piece: records.Slice) -> str | None:
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
        self, conn: Connection, bf: records.Backfill, piece: records.Slice, size: int
    ) -> str | None:
        """The last key of the next batch; None when the slice's range is walked."""
        lo = piece.position
        sql = bound_sql(bf.table_name, quote(bf.key_column), bf.key_type, lo is not None)
        value = conn.execute(
            _cached_text(sql), {"lo": lo, "upper": piece.upper_key, "n": size}
        ).scalar()
        return None if value is None else str(value)

    def update(self, conn: Connection, bf: records.Backfill, lo: str | None, hi: str) -> int:
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
        self, conn: Connection, bf: records.Backfill, lo: str | None, hi: str
    ) -> tuple[int, list[tuple[str, str]]]:
        """The batch's UPDATE in halves (each under a savepoint) down to the single rows that
        fail; rows updated, and [(key, error)] of the rows left alone."""
        sql = keys_sql(bf.table_name, quote(bf.key_column), bf.key_type, lo is not None)
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
                bf = self.stop_own(conn)
                if bf is None:
                    return FENCED
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
    watch: ReplicaWatch | None = None,
) -> str:
    """Do one slice's batches for about ``budget_s`` seconds as ``generation``. ``watch``:
    the target's replicas (jobs/backfill/replicas.py; default: check, no replica_urls);
    ``on_batch`` also runs while a throttle holds, so that progress shows it.

    Returns CONTINUE (work is left: enqueue the next task), FENCED (a newer generation owns
    the slice), the state this slice moved the backfill to (succeeded, paused, cancelled,
    errored), or STOPPED (the slice stopped or is done and the backfill's state is not its to
    settle yet: other slices are still active, or it was not running).
    """
    walk = _Walk(connector, backfill_id, slice_no, generation, max_attempts, watch, on_batch)
    deadline = time.monotonic() + budget_s
    try:
        while True:
            if not walk.throttle(deadline):
                return walk.after_throttle()
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
