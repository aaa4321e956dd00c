"""Benchmark: `runbook backfill --wait` vs. one UPDATE through psql vs. the §6.4 loop.

    .venv/bin/python bench/bench_backfill.py [--rows 5000000] [--repeats 3]

Every side is timed as a user times the command: wall clock from the command's start to its
exit, the baseline in the same run.

large_table (id bigserial PRIMARY KEY, payload text NOT NULL, new_column text NULL, payloads
like migrations/seed.py's) with --rows rows is built once, untimed, in a template database,
then VACUUM (FREEZE, ANALYZE) and the runbook ledger created (as on any target runbook has
already worked on). Every measurement runs on a fresh copy of it (CREATE DATABASE ...
TEMPLATE ... STRATEGY FILE_COPY, then CHECKPOINT): the same table state, no bloat, a clean
checkpoint, for every side. Every side sets new_column = 'default_value' on all rows:

single   psql -X -c "UPDATE large_table SET new_column = 'default_value'
         WHERE new_column IS NULL" (one statement, autocommit; the psql process timed);
loop     the runbook's §6.4 loop: UPDATE large_table SET new_column = 'default_value'
         WHERE id IN (SELECT id FROM large_table WHERE new_column IS NULL LIMIT 1000),
         autocommit each, repeated until it updates no row; with synchronous_commit = off
         like runbook's batches (--loop-sync also runs it with the server's default, on);
runbook  .venv/bin/runbook backfill --table large_table --set "new_column = 'default_value'"
         --where "new_column IS NULL" --wait (the installed console script in a subprocess,
         the CLI's defaults), run by a real worker the bench starts as a user does,
         `.venv/bin/runbook worker -c 2` (its own queue through RUNBOOK_QUEUE, RUNBOOK_CONFIG
         naming a runbook.toml the bench writes), timed until the command exits;
slices2  the same with --slices 2.

1. Throughput: rows/s of each side, interleaved, their order rotating every repeat; medians,
   with the WAL each side wrote and the checkpoints meanwhile.
2. Production impact: a writer process updates one random row by id per autocommit
   statement (--writer-rate a second) from 1 s before a side starts until 1 s after it
   ends, recording each write's start, latency and row; p50 / p99 / max during the side,
   also for the writer alone on an idle copy; what the writer waited on (pg_stat_activity),
   which of its stalls hit a row of a runbook batch in flight (row locks) and which came
   near the end of a checkpoint. Drawn to bench/backfill_latency.png.
3. Where runbook's time goes, from runbook.backfill_batches and the backfill's timestamps:
   the command's start until the backfill is recorded (CLI start, checks), until its first
   batch, inside the batch UPDATEs, between them, slice hand-offs, the end, until the
   command exits; and from one more run per runbook side with pg_stat_activity sampled
   every 5 ms.

Targets: runbook >= 0.9x single and >= 1.5x loop (rows/s); writer max <= 100 ms during
runbook's backfill; slices2 >= 1.15x single. Exit 0 all met, 1 not, 2 PostgreSQL or Redis
unreachable (or psql missing). Every database created here (bench_backfill_*) is dropped and
the worker stopped at the end, also on error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get(
    "RUNBOOK_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("RUNBOOK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
SESSION = uuid.uuid4().hex[:8]
QUEUE = f"runbook-bench-backfill-{SESSION}"
PREFIX = f"bench_backfill_{SESSION}"
TEMPLATE_DB = f"{PREFIX}_tpl"
RUN_DB = f"{PREFIX}_run"
TARGET = "bench"
WORKER_CONCURRENCY = 2
POLL_S = 0.02
LEAD_S = 1.0  # the writer runs alone this long before and after each side
STALL_MS = 100.0

TARGET_VS_SINGLE = 0.9
TARGET_VS_LOOP = 1.5
TARGET_MAX_STALL_MS = 100.0
TARGET_SLICES2_VS_SINGLE = 1.15
RUNBOOK = REPO / ".venv" / "bin" / "runbook"

SET_SQL = "new_column = 'default_value'"
WHERE_SQL = "new_column IS NULL"
SINGLE_SQL = f"UPDATE large_table SET {SET_SQL} WHERE {WHERE_SQL}"
LOOP_SQL = (
    f"UPDATE large_table SET {SET_SQL} WHERE id IN "
    f"(SELECT id FROM large_table WHERE {WHERE_SQL} LIMIT 1000)"
)
LABELS = {
    "idle": "writer alone (no backfill)",
    "single": "one UPDATE statement",
    "loop": "§6.4 loop (LIMIT 1000)",
    "loop_sync": "§6.4 loop, synchronous_commit on",
    "runbook": "runbook backfill",
    "slices2": "runbook backfill, slices=2",
}

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def db_url(dbname: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname


def connect(dbname: str | None = None) -> Any:
    import psycopg2

    conn = psycopg2.connect(db_url(dbname) if dbname else ADMIN_URL, connect_timeout=5)
    conn.autocommit = True
    return conn


def admin_exec(sql: str, dbname: str | None = None) -> list[tuple[Any, ...]]:
    conn = connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def services_problem() -> str | None:
    """One line naming the first unreachable service or missing command, or None."""
    import shutil

    import psycopg2
    import redis

    if shutil.which("psql") is None:
        return "psql is not on PATH; install the PostgreSQL client and run the benchmark again"
    if not RUNBOOK.exists():
        return f"{RUNBOOK} is missing; run `make install` first"

    try:
        psycopg2.connect(ADMIN_URL, connect_timeout=3).close()
    except psycopg2.Error:
        return f"PostgreSQL is not reachable at {ADMIN_URL}; start it and run the benchmark again"
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError:
        return f"Redis is not reachable at {REDIS_URL}; start it and run the benchmark again"
    return None


class Databases:
    """Databases created by this run, dropped one by one or all at the end."""

    def __init__(self) -> None:
        self.live: list[str] = []

    def create(self, name: str, template: str | None = None) -> str:
        # FILE_COPY copies the files after a checkpoint: much faster than WAL_LOG for GBs.
        sql = f"CREATE DATABASE {name}"
        if template:
            sql += f" TEMPLATE {template} STRATEGY FILE_COPY"
        self.live.append(name)
        admin_exec(sql)
        return name

    def drop(self, name: str) -> None:
        admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.live.remove(name)

    def drop_all(self) -> None:
        for name in list(self.live):
            try:
                self.drop(name)
            except Exception as exc:  # keep dropping the others
                print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)


def large_table_sql(rows: int) -> str:
    """large_table with ``rows`` rows, payloads like migrations/seed.py's, new_column NULL
    (also bench/bench_replica.py's table)."""
    return f"""
        CREATE TABLE large_table (
            id bigserial PRIMARY KEY, payload text NOT NULL, new_column text);
        INSERT INTO large_table (payload)
        SELECT 'payload-' || g || '-' || md5(g::text) FROM generate_series(1, {rows}) AS g;
        """


def build_template(dbs: Databases, rows: int) -> dict[str, int]:
    """large_table with ``rows`` rows, frozen and analysed, plus the runbook ledger."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from jobs.ledger import schema

    dbs.create(TEMPLATE_DB)
    admin_exec(large_table_sql(rows), TEMPLATE_DB)
    admin_exec("VACUUM (FREEZE, ANALYZE) large_table", TEMPLATE_DB)
    engine = create_engine(
        db_url(TEMPLATE_DB).replace("postgresql://", "postgresql+psycopg2://", 1),
        poolclass=NullPool,
    )
    with engine.connect() as conn:
        schema.ensure(conn)
    engine.dispose()
    size = admin_exec(
        "SELECT pg_relation_size('large_table'), pg_total_relation_size('large_table')",
        TEMPLATE_DB,
    )[0]
    return {"heap": int(size[0]), "total": int(size[1])}


def fresh_copy(dbs: Databases) -> None:
    """RUN_DB as a copy of the template, after a checkpoint (untimed)."""
    if RUN_DB in dbs.live:
        dbs.drop(RUN_DB)
    dbs.create(RUN_DB, template=TEMPLATE_DB)
    admin_exec("CHECKPOINT")


def server_counters() -> tuple[int, int]:
    """The server's WAL position (bytes) and checkpoints so far (whole cluster: other
    databases' work counts too)."""
    lsn, checkpoints = admin_exec(
        "SELECT pg_current_wal_lsn() - '0/0', checkpoints_timed + checkpoints_req "
        "FROM pg_stat_bgwriter"
    )[0]
    return int(lsn), int(checkpoints)


def measured(run: Callable[[], Outcome]) -> Outcome:
    """``run``, with the WAL it wrote and the checkpoints meanwhile in its diag."""
    wal0, ckpt0 = server_counters()
    outcome = run()
    wal1, ckpt1 = server_counters()
    outcome.diag["WAL bytes"] = float(wal1 - wal0)
    outcome.diag["checkpoints"] = float(ckpt1 - ckpt0)
    return outcome


def check_done(rows: int) -> None:
    """Every row got the new value (untimed)."""
    left, total = admin_exec(
        "SELECT count(*) FILTER (WHERE new_column IS DISTINCT FROM 'default_value'), count(*) "
        "FROM large_table",
        RUN_DB,
    )[0]
    if left or total != rows:
        raise RuntimeError(f"{left} of {total} rows were not updated (expected {rows} rows)")


class Worker:
    """``runbook worker`` as a user starts it (the console script), on a queue of this run's
    own (RUNBOOK_QUEUE in the environment)."""

    def __init__(
        self, log: Path, concurrency: int, name: str = f"bench-backfill-{SESSION}"
    ) -> None:
        self.log_path = log
        self.concurrency = concurrency
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(RUNBOOK),
                    "worker",
                    "-c",
                    str(self.concurrency),
                    "-n",
                    f"{self.name}@%h",
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_text()[-3000:]}")
            if "ready." in self.log_text():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker did not become ready:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self.proc = None


def write_config(path: Path) -> None:
    """runbook.toml naming RUN_DB as target ``bench`` (no backups: backfills take none)."""
    path.write_text(
        f"[targets.{TARGET}]\nurl = {json.dumps(db_url(RUN_DB))}\n"
        f"alembic_ini = {json.dumps(str(REPO / 'alembic.ini'))}\n"
        f"backup_dir = {json.dumps(str(path.parent / 'backups'))}\nbackup = false\n"
    )


# -- the sides ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    seconds: float
    rows: int
    start: float  # time.monotonic() when the side started
    end: float
    diag: dict[str, float] = field(default_factory=dict)
    wall0: float = 0.0  # time.time() at ``start``
    backfill_id: str | None = None

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def run_single() -> Outcome:
    """The one UPDATE as a user runs it: a psql process, timed from its start to its exit."""
    start = time.monotonic()
    done = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", db_url(RUN_DB), "-c", SINGLE_SQL],
        capture_output=True,
        text=True,
    )
    end = time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"psql failed: {done.stderr.strip()}")
    rows = int(done.stdout.split()[-1])  # "UPDATE 5000000"
    return Outcome(end - start, rows, start, end)


def run_loop(sync_commit: bool = False) -> Outcome:
    """The §6.4 loop as a script runs it (one connection, autocommit); with
    ``sync_commit`` off, each commit does not wait for its WAL flush, as runbook's batches."""
    start = time.monotonic()
    conn = connect(RUN_DB)
    rows = 0
    try:
        with conn.cursor() as cur:
            if not sync_commit:
                cur.execute("SET synchronous_commit = off")
            while True:
                cur.execute(LOOP_SQL)
                if cur.rowcount == 0:
                    break
                rows += cur.rowcount
            end = time.monotonic()
            return Outcome(end - start, rows, start, end)
    finally:
        conn.close()


def cli_args(slices: int, batch_size: int | None, table: str) -> list[str]:
    args = [str(RUNBOOK), "backfill", "--table", table, "--set", SET_SQL, "--where", WHERE_SQL]
    if slices != 1:
        args += ["--slices", str(slices)]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    return [*args, "--wait"]


def run_runbook(
    slices: int, batch_size: int | None, timeout_s: float, table: str = "large_table"
) -> Outcome:
    """`runbook backfill ... --wait` in a subprocess, timed from its start to its exit; then
    the backfill's record read from the ledger (untimed)."""
    args = cli_args(slices, batch_size, table)
    wall0 = time.time()
    start = time.monotonic()
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`runbook backfill` still running after {timeout_s:.0f}s") from None
    end = time.monotonic()
    backfill_id = done.stdout.split()[0] if done.stdout.split() else ""
    if done.returncode != 0 or not backfill_id:
        raise RuntimeError(
            f"`runbook backfill` exited {done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    conn = connect(RUN_DB)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT b.state, (SELECT coalesce(sum(rows_done), 0) FROM "
                "runbook.backfill_slices s WHERE s.backfill_id = b.id) "
                "FROM runbook.backfills b WHERE b.id = %s",
                (backfill_id,),
            )
            state, rows_done = cur.fetchone()
            if state != "succeeded":
                raise RuntimeError(f"backfill {backfill_id} is {state} after the command exited")
            diag = analyse(cur, backfill_id, wall0, wall0 + (end - start))
    finally:
        conn.close()
    return Outcome(
        end - start, int(rows_done), start, end, diag, wall0=wall0, backfill_id=backfill_id
    )


# -- where runbook's time goes --------------------------------------------------------------


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


DIAG_ORDER = (
    "command start -> backfill recorded (CLI start, checks)",
    "recorded -> first batch's UPDATE starts (queue, worker)",
    "inside the batch UPDATEs",
    "between batches, same task (commit, ledger, next bound)",
    "between slice tasks (hand-off, Celery hop)",
    "last batch -> ledger finished_at",
    "finished_at -> command exit (--wait sees it, exits)",
)


def analyse(cur: Any, backfill_id: str, wall0: float, wall_end: float) -> dict[str, float]:
    """Split the backfill's wall time using runbook.backfill_batches (committed_at is taken
    right after each batch's UPDATE, duration_ms is the UPDATE alone). With several slices,
    the per-slice spans are summed (they overlap in wall time)."""
    cur.execute(
        "SELECT to_jsonb(b) FROM runbook.backfill_batches b WHERE backfill_id = %s ORDER BY id",
        (backfill_id,),
    )
    batches = [r[0] for r in cur.fetchall()]
    cur.execute("SELECT to_jsonb(f) FROM runbook.backfills f WHERE id = %s", (backfill_id,))
    bf = cur.fetchone()[0]
    if not batches:
        return {}
    slice_key = next((k for k in ("slice_no", "slice", "slice_id") if k in batches[0]), None)
    by_slice: dict[Any, list[dict[str, Any]]] = {}
    for b in batches:
        by_slice.setdefault(b.get(slice_key) if slice_key else 0, []).append(b)

    first_start = math.inf
    last_commit = -math.inf
    update_s = between_s = handoff_s = 0.0
    handoffs = 0
    gaps_ms: list[float] = []
    for group in by_slice.values():
        prev: dict[str, Any] | None = None
        for b in group:
            committed = _ts(b["committed_at"])
            started = committed - b["duration_ms"] / 1000
            first_start = min(first_start, started)
            last_commit = max(last_commit, committed)
            update_s += b["duration_ms"] / 1000
            if prev is not None:
                gap = max(0.0, started - _ts(prev["committed_at"]))
                if b["generation"] == prev["generation"]:
                    between_s += gap
                    gaps_ms.append(gap * 1000)
                else:
                    handoff_s += gap
                    handoffs += 1
            prev = b
    finished = _ts(bf["finished_at"]) if bf.get("finished_at") else last_commit
    created = _ts(bf["created_at"])
    rows = sum(int(b["rows"]) for b in batches)
    sizes = [int(b["batch_size"]) for b in batches]
    durations = [float(b["duration_ms"]) for b in batches]
    return {
        "command start -> backfill recorded (CLI start, checks)": created - wall0,
        "recorded -> first batch's UPDATE starts (queue, worker)": first_start - created,
        "inside the batch UPDATEs": update_s,
        "between batches, same task (commit, ledger, next bound)": between_s,
        "between slice tasks (hand-off, Celery hop)": handoff_s,
        "last batch -> ledger finished_at": finished - last_commit,
        "finished_at -> command exit (--wait sees it, exits)": wall_end - finished,
        "slices seen": float(len(by_slice)),
        "batches": float(len(batches)),
        "slice tasks (hand-offs + slices)": float(handoffs + len(by_slice)),
        "batch size, median": statistics.median(sizes),
        "batch size, max": float(max(sizes)),
        "UPDATE ms per batch, median": statistics.median(durations),
        "UPDATE ms per batch, max": max(durations),
        "gap ms between batches, median": statistics.median(gaps_ms) if gaps_ms else 0.0,
        "gap ms between batches, p99": percentile(gaps_ms, 99) if gaps_ms else 0.0,
        "rows/s inside the UPDATEs": rows / update_s if update_s else 0.0,
    }


# -- what the worker's database sessions are doing ------------------------------------------


def statement_kind(query: str) -> str:
    """What a runbook statement is, from its text."""
    q = " ".join(query.split())
    upper = q.upper()
    if upper.startswith("COMMIT"):
        return "COMMIT"
    if upper.startswith(("BEGIN", "ROLLBACK")):
        return upper.split()[0]
    if "AS bf_col_0" in q:  # the open statement (its end may be cut off in pg_stat_activity)
        return "open: set_config, lock the slice, read the backfill (+ next bound)"
    if "set_config" in q:
        return "set_config (timeouts, application_name)"
    if "ORDER BY s.k" in q or q.startswith("SELECT coalesce((SELECT CAST"):
        return "bound query (the batch's last key)"
    if "WITH blocked AS" in q:
        return "close: blocked check, batch row, cursor (one statement)"
    if "pg_blocking_pids" in q:
        return "blocked check (pg_blocking_pids, after each batch)"
    if "oldest_xact_s" in q:
        return "signals check (oldest transaction, autovacuum)"
    if "runbook." in q and "FOR UPDATE" in upper:
        return "ledger: lock the backfill/slice row"
    if "INSERT INTO runbook.backfill_batches" in q:
        return "ledger: insert the batch row"
    if "runbook." in q and upper.startswith("UPDATE"):
        return "ledger: move the cursor, counters"
    if "runbook." in q:
        return "ledger: read"
    if upper.startswith("UPDATE"):
        return "batch UPDATE"
    return "other: " + q[:50]


def classify(state: str | None, wait: str | None, query: str) -> str:
    """One sample of a runbook session in pg_stat_activity, as a line of the profile."""
    kind = statement_kind(query)
    if state == "idle":
        return f"idle between transactions, after {kind}"
    if state and state.startswith("idle in transaction"):
        return f"idle in transaction (worker Python), after {kind}"
    return f"{kind} [{wait or 'on CPU'}]"


class Sampler:
    """Samples pg_stat_activity for the target's runbook sessions every ``interval_s``.

    A session that ran a batch UPDATE is a slice's walk; the others (the task's progress
    connection, the API's) are reported apart."""

    def __init__(self, dbname: str, interval_s: float = 0.005) -> None:
        import threading

        self.dbname = dbname
        self.interval_s = interval_s
        self.rows: list[tuple[int, int, str]] = []  # (sample, pid, label)
        self.samples = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(10)

    def run(self) -> None:
        conn = connect(self.dbname)
        try:
            with conn.cursor() as cur:
                while not self.stop_event.is_set():
                    cur.execute(
                        "SELECT pid, state, wait_event_type || ':' || wait_event, query "
                        "FROM pg_stat_activity WHERE datname = %s "
                        "AND application_name LIKE 'runbook%%' AND pid <> pg_backend_pid()",
                        (self.dbname,),
                    )
                    for pid, state, wait, query in cur.fetchall():
                        self.rows.append((self.samples, pid, classify(state, wait, query or "")))
                    self.samples += 1
                    time.sleep(self.interval_s)
        finally:
            conn.close()

    def report(self, wall_s: float, title: str) -> None:
        walks = {pid for _, pid, label in self.rows if label.startswith("batch UPDATE")}
        walk_counts: dict[str, int] = {}
        other_counts: dict[str, int] = {}
        busy = set()
        for i, pid, label in self.rows:
            counts = walk_counts if pid in walks else other_counts
            counts[label] = counts.get(label, 0) + 1
            if pid in walks:
                busy.add(i)
        none = self.samples - len(busy)
        if none:
            walk_counts["no walk session connected (before, between or after slice tasks)"] = none
        per_sample = wall_s / max(1, self.samples)
        print(
            f"{title}: {self.samples} samples of pg_stat_activity over {wall_s:.2f}s, "
            f"{len(walks)} walk session(s); share of the walk sessions' samples, and seconds "
            "(summed over slices):"
        )
        total = sum(walk_counts.values())
        for label, n in sorted(walk_counts.items(), key=lambda kv: -kv[1]):
            if n / total >= 0.003:
                print(f"  {n / total * 100:5.1f}%  {n * per_sample:6.2f}s  {label}")
        active = {k: v for k, v in other_counts.items() if not k.startswith("idle")}
        if active:
            print("  other runbook sessions (progress, API), when not idle:")
            for label, n in sorted(active.items(), key=lambda kv: -kv[1])[:6]:
                print(f"          {n * per_sample:6.2f}s  {label}")


# -- the writer -----------------------------------------------------------------------------


WRITER_APP = "bench writer"


def writer_main(url: str, max_id: int, rate: float, ready: Any, stop: Any, out: str) -> None:
    """Update one random row by id per autocommit statement, ``rate`` a second, until
    ``stop``; write (start, latency, id) triples (time.monotonic() seconds) to ``out``."""
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5, application_name=WRITER_APP)
    conn.autocommit = True
    rnd = random.Random(os.getpid())
    interval = 1.0 / rate
    samples = array("d")
    with conn.cursor() as cur:
        cur.execute("SET statement_timeout = '600s'")
        for _ in range(20):  # warm the connection and the plan
            cur.execute("SELECT payload FROM large_table WHERE id = %s", (rnd.randint(1, max_id),))
        ready.set()
        due = time.monotonic()
        n = 0
        while not stop.is_set():
            n += 1
            row_id = rnd.randint(1, max_id)
            t = time.monotonic()
            cur.execute(
                "UPDATE large_table SET payload = %s WHERE id = %s", (f"written-{n}", row_id)
            )
            samples.append(t)
            samples.append(time.monotonic() - t)
            samples.append(row_id)
            due += interval
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                due = now  # late: no burst to catch up
    conn.close()
    Path(out).write_bytes(samples.tobytes())


@dataclass
class Impact:
    side: str
    outcome: Outcome
    starts: list[float]  # seconds since the side started
    latencies_ms: list[float]
    interval_ms: float
    ids: list[int] = field(default_factory=list)
    waits: dict[str, int] = field(default_factory=dict)  # the writer's samples while active
    in_batch: int | None = None  # stalls whose row was in a batch in flight at the time
    checkpoints: list[tuple[float, float]] = field(default_factory=list)  # since the start

    def near_checkpoint_end(self) -> int:
        """Stalls that started within 2 s before a checkpoint was seen ending (its sync
        phase) or 0.5 s after."""
        return sum(
            1
            for s, lat in zip(self.starts, self.latencies_ms, strict=True)
            if lat > STALL_MS
            and 0 <= s <= self.outcome.end - self.outcome.start
            and any(end - 2.0 <= s <= end + 0.5 for _, end in self.checkpoints)
        )

    def window(self) -> list[float]:
        """Latencies of the writes started while the side ran."""
        end = self.outcome.end - self.outcome.start
        return [lat for s, lat in zip(self.starts, self.latencies_ms, strict=True) if 0 <= s <= end]

    def stats(self) -> dict[str, float]:
        lat = self.window()
        if not lat:
            return {"writes": 0}
        return {
            "writes": len(lat),
            "p50": percentile(lat, 50),
            "p99": percentile(lat, 99),
            "max": max(lat),
            "stalls": sum(1 for v in lat if v > STALL_MS),
            "p99_corrected": percentile(corrected(lat, self.interval_ms), 99),
        }


def corrected(latencies: list[float], interval_ms: float) -> list[float]:
    """Latencies plus the writes a stalled writer could not send (coordinated omission):
    a write that took L ms stood for L/interval writes waiting L - k*interval ms each."""
    out = list(latencies)
    for lat in latencies:
        k = 1
        while lat - k * interval_ms > 0 and k < 100_000:
            out.append(lat - k * interval_ms)
            k += 1
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[rank]


def with_writer(
    side: str, run: Callable[[], Outcome] | None, rows: int, rate: float, tmp: Path, idle_s: float
) -> Impact:
    """Run ``run`` (None: sleep ``idle_s``) while a writer process updates random rows by id;
    the writer's latencies around it."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    out = tmp / f"writer-{side}.bin"
    proc = ctx.Process(
        target=writer_main, args=(db_url(RUN_DB), rows, rate, ready, stop, str(out)), daemon=True
    )
    proc.start()
    waits = WaitSampler(RUN_DB)
    try:
        if not ready.wait(60):
            raise RuntimeError("the writer process did not start")
        time.sleep(LEAD_S)
        with waits:
            if run is None:
                start = time.monotonic()
                time.sleep(idle_s)
                outcome = Outcome(idle_s, 0, start, time.monotonic())
            else:
                outcome = measured(run)
        time.sleep(LEAD_S)
    finally:
        stop.set()
        proc.join(120)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    raw = array("d")
    raw.frombytes(out.read_bytes())
    out.unlink()
    starts = [t - outcome.start for t in raw[0::3]]
    latencies = [v * 1000 for v in raw[1::3]]
    ids = [int(v) for v in raw[2::3]]
    imp = Impact(side, outcome, starts, latencies, 1000.0 / rate, ids, waits.counts)
    imp.checkpoints = [(a - outcome.start, b - outcome.start) for a, b in waits.checkpoints]
    if outcome.backfill_id:
        imp.in_batch = stalls_in_batches(imp)
    return imp


class WaitSampler:
    """What the writer's session waits on while it runs a statement (pg_stat_activity,
    every ``interval_s``), and the checkpoints meanwhile: (start, end) as time.monotonic(),
    the start from pg_control_checkpoint(), the end when it changed (polled every ~0.1 s)."""

    def __init__(self, dbname: str, interval_s: float = 0.005) -> None:
        import threading

        self.dbname = dbname
        self.interval_s = interval_s
        self.counts: dict[str, int] = {}
        self.checkpoints: list[tuple[float, float]] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> WaitSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(10)

    def run(self) -> None:
        conn = connect(self.dbname)
        last: float | None = None
        loops = 0
        try:
            with conn.cursor() as cur:
                while not self.stop_event.is_set():
                    if loops % 20 == 0:
                        cur.execute(
                            "SELECT extract(epoch FROM checkpoint_time) "
                            "FROM pg_control_checkpoint()"
                        )
                        started = float(cur.fetchone()[0])
                        if last is not None and started != last:
                            now = time.monotonic()
                            self.checkpoints.append((now - (time.time() - started), now))
                        last = started
                    loops += 1
                    cur.execute(
                        "SELECT coalesce(wait_event_type || ':' || wait_event, 'on CPU') "
                        "FROM pg_stat_activity WHERE datname = %s AND application_name = %s "
                        "AND state = 'active'",
                        (self.dbname, WRITER_APP),
                    )
                    for (wait,) in cur.fetchall():
                        self.counts[wait] = self.counts.get(wait, 0) + 1
                    time.sleep(self.interval_s)
        finally:
            conn.close()


def stalls_in_batches(imp: Impact) -> int:
    """How many of the writer's stalls (> STALL_MS) updated a row of a batch that was in
    flight meanwhile (from its UPDATE's start to 50 ms after its batch row): row-lock waits."""
    conn = connect(RUN_DB)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT lo, hi, extract(epoch FROM committed_at), duration_ms "
                "FROM runbook.backfill_batches WHERE backfill_id = %s",
                (imp.outcome.backfill_id,),
            )
            batches = [
                (-math.inf if lo is None else int(lo), int(hi), float(c) - ms / 1000, float(c))
                for lo, hi, c, ms in cur.fetchall()
            ]
    finally:
        conn.close()
    hits = 0
    for s, lat, row_id in zip(imp.starts, imp.latencies_ms, imp.ids, strict=True):
        if lat <= STALL_MS or not 0 <= s <= imp.outcome.end - imp.outcome.start:
            continue
        ws = imp.outcome.wall0 + s
        we = ws + lat / 1000
        if any(lo < row_id <= hi and b0 < we and b1 + 0.05 > ws for lo, hi, b0, b1 in batches):
            hits += 1
    return hits


def plot(impacts: list[Impact], path: Path, rows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(impacts),
        1,
        figsize=(9, 1.55 * len(impacts) + 0.6),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    longest = max(imp.outcome.end - imp.outcome.start for imp in impacts)
    for ax, imp in zip(axes[:, 0], impacts, strict=True):
        duration = imp.outcome.end - imp.outcome.start
        ax.axvspan(0, duration, color="tab:orange", alpha=0.12, lw=0)
        for begin, end in imp.checkpoints:
            ax.axvspan(begin, end, color="0.5", alpha=0.12, lw=0)
            ax.axvline(end, color="0.4", lw=0.8)
        ax.scatter(imp.starts, imp.latencies_ms, s=2, color="tab:blue", rasterized=True)
        # A stalled write as a bar from its start to its end: the time the writer was stuck.
        stalled = [
            (s, v) for s, v in zip(imp.starts, imp.latencies_ms, strict=True) if v > STALL_MS
        ]
        if stalled:
            ax.hlines(
                [v for _, v in stalled],
                [s for s, _ in stalled],
                [s + v / 1000 for s, v in stalled],
                color="tab:blue",
                lw=1.5,
            )
        ax.axhline(TARGET_MAX_STALL_MS, color="tab:red", lw=0.8, ls="--")
        st = imp.stats()
        what = LABELS[imp.side]
        if imp.side != "idle":
            what += f", {duration:.1f} s"
        ax.set_title(
            f"{what}: p50 {st.get('p50', math.nan):.1f} ms, p99 {st.get('p99', math.nan):.1f} "
            f"ms, max {st.get('max', math.nan):.0f} ms",
            fontsize=8.5,
            loc="left",
        )
        ax.set_yscale("log")
        ax.set_xlim(-LEAD_S, longest + LEAD_S)
        ax.tick_params(labelsize=7.5)
        ax.set_ylabel("ms", fontsize=8)
    axes[-1, 0].set_xlabel(
        "seconds since the backfill started (orange: while it ran; grey: a checkpoint, the line "
        "its end; a bar: a write stalled that long; dashed: 100 ms)",
        fontsize=8,
    )
    fig.suptitle(
        f"Latency of single-row UPDATEs by id during a backfill of {rows:,} rows",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows (5000000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (3)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="runbook's first batch size (default: enqueue_backfill's own default)",
    )
    parser.add_argument(
        "--writer-rate", type=float, default=200.0, help="writes a second in part 2 (200)"
    )
    parser.add_argument(
        "--impact-repeats", type=int, default=1, help="runs of each side with the writer (1)"
    )
    parser.add_argument("--no-loop", action="store_true", help="skip the §6.4 loop")
    parser.add_argument(
        "--loop-sync",
        action="store_true",
        help="also run the §6.4 loop with synchronous_commit on (the server's default)",
    )
    parser.add_argument("--no-impact", action="store_true", help="skip part 2 (the writer)")
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the pg_stat_activity-sampled run"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=REPO / "bench" / "backfill_latency.png",
        help="where to draw the writer's latency (bench/backfill_latency.png)",
    )
    args = parser.parse_args(argv)
    if args.rows < 10_000 or args.repeats < 1 or args.impact_repeats < 1:
        parser.error("--rows must be at least 10000, --repeats and --impact-repeats at least 1")
    if args.writer_rate <= 0:
        parser.error("--writer-rate must be positive")

    # SIGTERM unwinds like Ctrl-C, so the worker is stopped and the databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    problem = services_problem()
    if problem:
        print(problem)
        return 2

    # Shared by this process and the worker; set before worker.app is first imported.
    os.environ["CELERY_BROKER_URL"] = REDIS_URL
    os.environ["CELERY_RESULT_BACKEND"] = REDIS_URL
    os.environ["RUNBOOK_QUEUE"] = QUEUE

    dbs = Databases()
    worker: Worker | None = None
    with tempfile.TemporaryDirectory(prefix="runbook-bench-backfill-") as tmp:
        root = Path(tmp)
        try:
            config = root / "runbook.toml"
            write_config(config)
            os.environ["RUNBOOK_CONFIG"] = str(config)
            worker = Worker(root / "worker.log", WORKER_CONCURRENCY)
            return run(args, dbs, worker, root)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if worker is not None:
                worker.stop()
            dbs.drop_all()
            delete_queue()


def delete_queue(queue: str = QUEUE) -> None:
    """The run's queue and its bindings, gone from Redis."""
    import redis

    with contextlib.suppress(redis.RedisError):
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).delete(
            queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
        )


def run(args: argparse.Namespace, dbs: Databases, worker: Worker, root: Path) -> int:
    timeout_s = max(600.0, args.rows / 2000)
    sides: dict[str, Callable[[], Outcome]] = {
        "single": run_single,
        "runbook": lambda: run_runbook(1, args.batch_size, timeout_s),
        "slices2": lambda: run_runbook(2, args.batch_size, timeout_s),
    }
    if not args.no_loop:
        sides["loop"] = run_loop
        if args.loop_sync:
            sides["loop_sync"] = lambda: run_loop(sync_commit=True)
    print(
        f"bench: backfill of {args.rows:,} rows, {args.repeats} repeats, sides "
        f"{', '.join(sides)}; worker prefork -c {WORKER_CONCURRENCY}, queue {QUEUE}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        "runbook: " + " ".join(shlex.quote(a) for a in cli_args(1, args.batch_size, "large_table"))
    )
    print(f"single: psql -X -c {shlex.quote(SINGLE_SQL)}")
    t0 = time.monotonic()
    worker.start()
    print(f"worker ready in {time.monotonic() - t0:.1f}s (not timed)")
    t0 = time.monotonic()
    size = build_template(dbs, args.rows)
    print(
        f"template {TEMPLATE_DB}: large_table heap {size['heap'] / 2**20:.0f} MB, with its "
        f"index {size['total'] / 2**20:.0f} MB, built in {time.monotonic() - t0:.1f}s "
        "(not timed); each side runs on a fresh FILE_COPY of it after a CHECKPOINT"
    )

    # Warm-up (untimed): the worker's imports and first tasks, on a small table of its own.
    fresh_copy(dbs)
    admin_exec(
        "CREATE TABLE warm_up AS SELECT * FROM large_table WHERE id <= 20000; "
        "ALTER TABLE warm_up ADD PRIMARY KEY (id)",
        RUN_DB,
    )
    warm = run_runbook(1, args.batch_size, timeout_s, table="warm_up")
    print(f"warm-up backfill on a copy (not timed): {warm.seconds:.2f}s")

    # ---- 1 and 3: throughput ---------------------------------------------------------------
    results: dict[str, list[Outcome]] = {k: [] for k in sides}
    order = list(sides)
    print("throughput (rows/s; each side on a fresh copy):")
    for i in range(args.repeats):
        rotated = order[i % len(order) :] + order[: i % len(order)]
        line = []
        for side in rotated:
            fresh_copy(dbs)
            outcome = measured(sides[side])
            check_done(args.rows)
            results[side].append(outcome)
            line.append(
                f"{side} {outcome.seconds:.2f}s {outcome.rate / 1000:.0f}k/s "
                f"({outcome.diag['WAL bytes'] / 2**30:.1f} GB WAL)"
            )
        print(f"  repeat {i + 1}: " + "  ".join(line))

    # ---- 2: production impact --------------------------------------------------------------
    impacts: list[Impact] = []
    if not args.no_impact:
        single_s = statistics.median(o.seconds for o in results["single"])
        impact_sides = [
            "idle",
            *[s for s in ("runbook", "slices2", "single", "loop") if s in sides],
        ]
        print(
            f"production impact: a writer process updating one random row by id per "
            f"autocommit statement, {args.writer_rate:g}/s, {LEAD_S:g}s before and after:"
        )
        for i in range(args.impact_repeats):
            for side in impact_sides:
                fresh_copy(dbs)
                imp = with_writer(
                    side, sides.get(side), args.rows, args.writer_rate, root, single_s
                )
                if side != "idle":
                    check_done(args.rows)
                impacts.append(imp)
                st = imp.stats()
                print(
                    f"  {i + 1} {side:<8} {imp.outcome.seconds:6.2f}s  writes {st['writes']:5.0f}  "
                    f"p50 {st['p50']:7.1f} ms  p99 {st['p99']:8.1f} ms  max {st['max']:8.1f} ms"
                )
        plot(impacts[: len(impact_sides)], args.plot, args.rows)
        print(f"plot: {args.plot} ({args.plot.stat().st_size / 1024:.0f} KB)")

    # ---- where runbook's time goes, sampled (one more run each, not in the ratios) ---------
    profiles: list[tuple[str, Sampler, Outcome]] = []
    if not args.no_profile:
        for side in ("runbook", "slices2"):
            if side not in sides:
                continue
            fresh_copy(dbs)
            with Sampler(RUN_DB) as sampler:
                outcome = sides[side]()
            check_done(args.rows)
            profiles.append((side, sampler, outcome))
            print(
                f"profiled {side} run (pg_stat_activity sampled, not in the ratios): "
                f"{outcome.seconds:.2f}s {outcome.rate / 1000:.0f}k/s"
            )

    print(f"load average at the end: {os.getloadavg()[0]:.1f} (shared machine: quote medians)")
    return report(args, results, impacts, profiles)


def fmt_rates(outcomes: list[Outcome]) -> str:
    return ", ".join(f"{o.rate / 1000:.0f}k" for o in outcomes)


def report(
    args: argparse.Namespace,
    results: dict[str, list[Outcome]],
    impacts: list[Impact],
    profiles: list[tuple[str, Sampler, Outcome]],
) -> int:
    med = {k: statistics.median(o.rate for o in v) for k, v in results.items()}
    med_s = {k: statistics.median(o.seconds for o in v) for k, v in results.items()}
    single = med["single"]
    print()
    print(f"throughput on {args.rows:,} rows (median of {args.repeats}; rows/s per repeat):")
    for side, outcomes in results.items():
        # Each repeat ran the sides back to back: the median of the per-repeat ratios is
        # less exposed to load drifting across the run than the ratio of the medians.
        paired = statistics.median(
            o.rate / s.rate for o, s in zip(outcomes, results["single"], strict=True)
        )
        wal = statistics.median(o.diag["WAL bytes"] for o in outcomes) / 2**30
        ckpt = statistics.median(o.diag["checkpoints"] for o in outcomes)
        print(
            f"  {LABELS[side]:<30} {med[side] / 1000:7.0f}k rows/s  {med_s[side]:7.2f}s  "
            f"{med[side] / single:5.2f}x single (per-repeat {paired:.2f}x)  "
            f"[{fmt_rates(outcomes)}]  WAL {wal:.2f} GB, {ckpt:.0f} checkpoints"
        )
    verdicts: list[tuple[str, bool, str]] = []
    r_single = med["runbook"] / single
    verdicts.append(
        (
            f"runbook >= {TARGET_VS_SINGLE:g}x single",
            r_single >= TARGET_VS_SINGLE,
            f"{r_single:.2f}x",
        )
    )
    if "loop" in med:
        r_loop = med["runbook"] / med["loop"]
        verdicts.append(
            (f"runbook >= {TARGET_VS_LOOP:g}x loop", r_loop >= TARGET_VS_LOOP, f"{r_loop:.2f}x")
        )
    if "slices2" in med:
        r_s2 = med["slices2"] / single
        r_s1 = med["slices2"] / med["runbook"]
        verdicts.append(
            (
                f"slices=2 >= {TARGET_SLICES2_VS_SINGLE:g}x single",
                r_s2 >= TARGET_SLICES2_VS_SINGLE,
                f"{r_s2:.2f}x; {r_s1:.2f}x slices=1",
            )
        )

    if impacts:
        print()
        print(
            f"writer latency while each side ran (ms; {args.writer_rate:g} writes/s asked; "
            "p99* adds the writes a stalled writer could not send):"
        )
        print(f"  {'side':<30} {'writes':>6} {'p50':>7} {'p99':>8} {'p99*':>8} {'max':>8} >100ms")
        worst: dict[str, float] = {}
        for imp in impacts:
            st = imp.stats()
            worst[imp.side] = max(worst.get(imp.side, 0.0), st.get("max", 0.0))
            print(
                f"  {LABELS[imp.side]:<30} {st['writes']:6.0f} {st['p50']:7.1f} {st['p99']:8.1f} "
                f"{st['p99_corrected']:8.1f} {st['max']:8.1f} {st['stalls']:6.0f}"
            )
        print(
            "  what the writer's statements waited on (share of its samples while active; "
            "stalls on a row of a batch in flight):"
        )
        for imp in impacts:
            total = sum(imp.waits.values()) or 1
            top = sorted(imp.waits.items(), key=lambda kv: -kv[1])[:5]
            waits = ", ".join(f"{k} {v / total * 100:.0f}%" for k, v in top)
            row_locks = ""
            if "WAL bytes" in imp.outcome.diag:
                mb_s = imp.outcome.diag["WAL bytes"] / 2**20 / imp.outcome.seconds
                row_locks += f"; WAL {mb_s:.0f} MB/s"
            if imp.checkpoints:
                row_locks += (
                    f"; {len(imp.checkpoints)} checkpoints, "
                    f"{imp.near_checkpoint_end()} stalls near their end"
                )
            if imp.in_batch is not None:
                row_locks += f"; {imp.in_batch} of {imp.stats()['stalls']:.0f} stalls in a batch"
            print(f"    {LABELS[imp.side]:<30} {waits}{row_locks}")
        stall = worst["runbook"]
        verdicts.append(
            (
                f"writer max <= {TARGET_MAX_STALL_MS:g} ms under runbook",
                stall <= TARGET_MAX_STALL_MS,
                f"{stall:.0f} ms",
            )
        )

    for side in ("runbook", "slices2"):
        if side not in results:
            continue
        diags = [o.diag for o in results[side] if o.diag]
        if not diags:
            continue
        print()
        print(
            f"where {LABELS[side]}'s time goes (median over repeats; wall {med_s[side]:.2f}s; "
            "spans of several slices are summed):"
        )
        shown = ("WAL bytes", "checkpoints")  # in the throughput table already
        keys = [k for k in DIAG_ORDER if k in diags[0]] + [
            k for k in diags[0] if k not in DIAG_ORDER and k not in shown
        ]
        for key in keys:
            value = statistics.median(d.get(key, 0.0) for d in diags)
            if key in DIAG_ORDER:
                print(f"  {key:<58} {value:8.2f} s")
            else:
                print(f"  {key:<58} {value:10.0f}")

    for side, sampler, outcome in profiles:
        print()
        sampler.report(outcome.seconds, f"what {LABELS[side]}'s database sessions were doing")

    print()
    for name, ok, value in verdicts:
        print(f"target {name}: {'MET' if ok else 'NOT MET'} ({value})")
    return 0 if all(ok for _, ok, _ in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
