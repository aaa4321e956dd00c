"""Benchmark: a backfill on a primary whose streaming standby replays slowly, with and without
the replica bound.

    .venv/bin/python bench/bench_replica.py [--rows 2000000] [--batch-size N] [--plot PATH]

The primary and its standby are tests/integration/replication_support.py's
ReplicatedPostgres (imported without pytest): a private PostgreSQL on a free port (fsync off,
wal_receiver_status_interval 1 s) and `standby1`, a pg_basebackup of it streaming on another
port, run as the postgres OS user; both stopped and removed at the end.

large_table (bench/bench_backfill.py's: id bigserial PRIMARY KEY, payload text NOT NULL,
new_column text NULL) with --rows rows is built once, untimed, in a template database on the
primary, then VACUUM (FREEZE, ANALYZE) and the runbook ledger created. Each side runs on a
fresh copy of it (CREATE DATABASE ... TEMPLATE ... STRATEGY FILE_COPY, then CHECKPOINT), and
starts once the standby has replayed everything up to then. Each side is

    .venv/bin/runbook backfill --target SIDE --table large_table
        --set "new_column = 'default_value'" --where "new_column IS NULL" --wait

the installed console script in a subprocess, timed from its start to its exit, worked by
`.venv/bin/runbook worker -c 2` started as a user starts one (RUNBOOK_QUEUE, a queue of its
own on Redis db 12; RUNBOOK_CONFIG naming a runbook.toml the bench writes, one target a side):

free     replicas = "ignore": no replica bound;
bounded  max_replica_lag_bytes = "16MiB", max_replica_lag = "1s", throttle_check = "250ms".
         16 MiB, a quarter of the default (64 MiB), is crossed early in each 2 s pause
         here, so the bound, not the pause, shapes the lag; 1 s, half a pause, so that a
         paused replay crosses the time bound too wherever replay_lag reports it (it reads
         NULL or stale while replay stands still); 250 ms is the default check.

The slow replica: while a side runs, a thread pauses standby1's replay for 2 s of every 4 s
(pg_wal_replay_pause() / pg_wal_replay_resume() on the standby, starting paused), and
another samples every 100 ms, on the primary, pg_current_wal_lsn() and standby1's row of
pg_stat_replication: lag bytes pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), lag
seconds replay_lag; and, on the standby, its own replay delay (now() minus the last replayed
commit's time, 0 when it has replayed all it received), because replay_lag is NULL or stale
once replay has stopped.

Printed per side: wall time, rows/s (and rows/s outside the throttle's waits), max and p95
of each lag, the peak lag of every 4 s cycle, the time the backfill was throttled (from the
ledger: the sum of runbook.backfill_slices.throttled_ms, and of it the waits recorded before
a batch, runbook.backfill_batches.throttled_ms) with the slices' last throttle_reason, and
the largest batch's WAL: estimated as its rows x the side's WAL per row (the primary's WAL
during the side / rows), and beside it the most the WAL position rose over any one batch's
UPDATE (interpolated between the 100 ms samples; other sessions' WAL counts too). Drawn to
bench/replica_lag.png: lag bytes over time, one panel a side, replay_lag on the right axis,
the paused intervals shaded, the bound (and the bound plus one batch's WAL) as lines.

Target: on the bounded side, the max lag bytes <= the bound + the largest batch's WAL (the
estimate). The free side's lag is reported (its max, its per-cycle peaks: it grows with the
backfill), not judged. Exit 0 met, 1 not, 2 Redis, the runbook command or the PostgreSQL
server binaries (or runuser, to run them as the postgres user) missing. The worker is
stopped, the replay resumed and the pair removed at the end, also on error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_backfill as bb

REPO = bb.REPO
SESSION = uuid.uuid4().hex[:8]
QUEUE = f"runbook-bench-replica-{SESSION}"
TEMPLATE_DB = "bench_replica_tpl"
WORKER_CONCURRENCY = 2

PAUSE_S = 2.0  # the standby's replay is paused this long ...
PERIOD_S = 4.0  # ... of every this long
SAMPLE_S = 0.1
BOUND_BYTES = 16 << 20
SIDES = {
    "free": ('replicas = "ignore"\n', "no replica bound, replicas = ignore"),
    "bounded": (
        'max_replica_lag_bytes = "16MiB"\nmax_replica_lag = "1s"\nthrottle_check = "250ms"\n',
        "bound 16 MiB / 1 s, checked before each batch (throttle_check 250 ms while waiting)",
    ),
}

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_db(side: str) -> str:
    return f"bench_replica_{side}"


def services_problem() -> str | None:
    """One line naming the first thing missing, or None."""
    import redis

    from tests.integration.replication_support import unavailable

    if not bb.RUNBOOK.exists():
        return f"{bb.RUNBOOK} is missing; run `make install` first"
    problem = unavailable()
    if problem:
        return f"{problem}; install the PostgreSQL server and run the benchmark again"
    try:
        redis.Redis.from_url(bb.REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError:
        return f"Redis is not reachable at {bb.REDIS_URL}; start it and run the benchmark again"
    return None


def write_config(path: Path, primary: Any) -> None:
    """runbook.toml: a target a side, each on its own copy (no backups: backfills take none)."""
    text = ""
    for side, (settings, _) in SIDES.items():
        text += (
            f"[targets.{side}]\nurl = {json.dumps(primary.url(run_db(side)))}\n"
            f"alembic_ini = {json.dumps(str(REPO / 'alembic.ini'))}\n"
            f"backup_dir = {json.dumps(str(path.parent / 'backups'))}\nbackup = false\n"
            f"{settings}\n"
        )
    path.write_text(text)


def build_template(primary: Any, rows: int) -> int:
    """large_table with ``rows`` rows, frozen and analysed, plus the runbook ledger; its
    heap's bytes."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from jobs.config import normalize_url
    from jobs.ledger import schema

    primary.sql(f"CREATE DATABASE {TEMPLATE_DB}")
    primary.sql(bb.large_table_sql(rows), TEMPLATE_DB)
    primary.sql("VACUUM (FREEZE, ANALYZE) large_table", TEMPLATE_DB)
    engine = create_engine(
        normalize_url(primary.url(TEMPLATE_DB)).sqlalchemy_url(), poolclass=NullPool
    )
    with engine.connect() as conn:
        schema.ensure(conn)
    engine.dispose()
    return int(primary.sql("SELECT pg_relation_size('large_table')", TEMPLATE_DB)[0][0])


def fresh_copy(pair: Any, side: str) -> float:
    """The side's database as a copy of the template, after a checkpoint, replayed by the
    standby (untimed); the seconds the standby took to catch up."""
    db = run_db(side)
    pair.primary.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    pair.primary.sql(f"CREATE DATABASE {db} TEMPLATE {TEMPLATE_DB} STRATEGY FILE_COPY")
    pair.primary.sql("CHECKPOINT")
    return caught_up(pair)


def caught_up(pair: Any, timeout_s: float = 60) -> float:
    """Until the primary sees standby1 replayed all the WAL written before this call; the
    seconds that took."""
    from tests.integration.replication_support import STANDBY_NAME

    start = time.monotonic()
    (target,) = pair.primary.sql("SELECT pg_current_wal_lsn()")[0]
    while True:
        rows = pair.primary.sql(
            f"SELECT replay_lsn >= '{target}'::pg_lsn FROM pg_stat_replication "
            f"WHERE application_name = '{STANDBY_NAME}'"
        )
        if rows and rows[0][0]:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"the standby did not replay up to {target} in {timeout_s:g}s")
        time.sleep(0.1)


def start_pair() -> Any:
    """A started ReplicatedPostgres; one that fails half-way (or Ctrl-C meanwhile) is stopped
    and removed, not left running."""
    from tests.integration.replication_support import ReplicatedPostgres

    # __init__ sets root, primary and standby before it starts anything: stop() can undo it.
    pair = ReplicatedPostgres.__new__(ReplicatedPostgres)
    try:
        pair.__init__()
    except BaseException:
        if hasattr(pair, "standby"):
            pair.stop()
        raise
    return pair


def left_undone(server: Any, side: str, rows: int) -> str | None:
    """What is wrong with the side's table on ``server`` after its backfill, or None."""
    left, total = server.sql(
        "SELECT count(*) FILTER (WHERE new_column IS DISTINCT FROM 'default_value'), count(*) "
        "FROM large_table",
        run_db(side),
    )[0]
    if left or total != rows:
        return f"{left} of {total} rows were not updated (expected {rows} rows)"
    return None


# -- the slow replica and the lag -------------------------------------------------------------


class Background:
    """A thread running ``loop`` until stop(); stop() raises what the thread raised."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self._error is not None:
            raise RuntimeError(f"{type(self).__name__} failed: {self._error}") from self._error

    def _main(self) -> None:
        try:
            self.loop(self._stop)
        except BaseException as exc:  # surfaced by stop(), in the main thread
            self._error = exc

    def loop(self, stop: threading.Event) -> None:
        raise NotImplementedError


class SlowReplica(Background):
    """Pauses the standby's replay for PAUSE_S of every PERIOD_S, paused first; the paused
    intervals (time.time() pairs) in ``paused``. Replay is resumed when it stops."""

    def __init__(self, standby: Any) -> None:
        super().__init__()
        self.standby = standby
        self.paused: list[tuple[float, float]] = []

    def loop(self, stop: threading.Event) -> None:
        conn = self.standby.connect()
        try:
            with conn.cursor() as cur:
                origin = time.monotonic()
                cycle = 0
                while not stop.is_set():
                    cur.execute("SELECT pg_wal_replay_pause()")
                    since = time.time()
                    try:
                        stop.wait(max(0.0, origin + cycle * PERIOD_S + PAUSE_S - time.monotonic()))
                    finally:
                        cur.execute("SELECT pg_wal_replay_resume()")
                        self.paused.append((since, time.time()))
                    cycle += 1
                    stop.wait(max(0.0, origin + cycle * PERIOD_S - time.monotonic()))
        finally:
            conn.close()


@dataclass
class Sample:
    t: float  # time.time()
    wal: int  # the primary's WAL position, bytes
    lag_bytes: int | None  # pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)
    lag_s: float | None  # replay_lag, as the primary sees it
    delay_s: float | None  # the standby's own: now() - its last replayed commit


PRIMARY_SAMPLE = (
    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, "
    "pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::bigint, "
    "extract(epoch FROM r.replay_lag)::float8 "
    "FROM (SELECT 1) AS one LEFT JOIN pg_stat_replication AS r "
    "ON r.application_name = %s"
)
# jobs/pg/replication.py asks a replica_urls standby the same.
STANDBY_SAMPLE = (
    "SELECT CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END"
)


class LagSampler(Background):
    """Samples the primary-standby lag every SAMPLE_S into ``samples``."""

    def __init__(self, pair: Any, standby_name: str) -> None:
        super().__init__()
        self.pair = pair
        self.standby_name = standby_name
        self.samples: list[Sample] = []

    def loop(self, stop: threading.Event) -> None:
        primary, standby = self.pair.primary.connect(), self.pair.standby.connect()
        try:
            with primary.cursor() as p_cur, standby.cursor() as s_cur:
                tick = time.monotonic()
                while not stop.is_set():
                    t = time.time()
                    p_cur.execute(PRIMARY_SAMPLE, (self.standby_name,))
                    wal, lag_bytes, lag_s = p_cur.fetchone()
                    s_cur.execute(STANDBY_SAMPLE)
                    (delay_s,) = s_cur.fetchone()
                    self.samples.append(Sample(t, int(wal), lag_bytes, lag_s, delay_s))
                    tick += SAMPLE_S
                    stop.wait(max(0.0, tick - time.monotonic()))
        finally:
            primary.close()
            standby.close()


# -- a side -------------------------------------------------------------------------------------


@dataclass
class Batch:
    rows: int
    duration_ms: float
    throttled_ms: float
    committed: float  # time.time() of committed_at


@dataclass
class Side:
    name: str
    seconds: float
    wall0: float  # time.time() when the command started
    rows: int
    backfill_id: str
    throttled_s: float  # the slices' throttled_ms, summed
    throttled_before_batches_s: float  # the batches' throttled_ms, summed
    reasons: list[str]
    batches: list[Batch]
    samples: list[Sample]
    paused: list[tuple[float, float]]
    catch_up_s: float = 0.0  # after the command exited, until the standby replayed all
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def cli_args(side: str, batch_size: int | None, table: str = "large_table") -> list[str]:
    args = [str(bb.RUNBOOK), "backfill", "--target", side, "--table", table]
    args += ["--set", bb.SET_SQL, "--where", bb.WHERE_SQL]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    return [*args, "--wait"]


def run_side(pair: Any, side: str, batch_size: int | None, timeout_s: float) -> Side:
    """One `runbook backfill ... --wait` with the replica slowed and the lag sampled; then the
    backfill's record read from the ledger (untimed)."""
    from tests.integration.replication_support import STANDBY_NAME

    sampler = LagSampler(pair, STANDBY_NAME)
    slow = SlowReplica(pair.standby)
    sampler.start()
    slow.start()
    try:
        wall0 = time.time()
        start = time.monotonic()
        try:
            done = subprocess.run(
                cli_args(side, batch_size), capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`runbook backfill` still running after {timeout_s:.0f}s") from None
        seconds = time.monotonic() - start
    finally:
        slow.stop()
        sampler.stop()
    backfill_id = done.stdout.split()[0] if done.stdout.split() else ""
    if done.returncode != 0 or not backfill_id:
        raise RuntimeError(
            f"`runbook backfill` exited {done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    ledger = read_ledger(pair.primary, side, backfill_id)
    return Side(
        name=side,
        seconds=seconds,
        wall0=wall0,
        backfill_id=backfill_id,
        samples=sampler.samples,
        paused=slow.paused,
        **ledger,
    )


def read_ledger(primary: Any, side: str, backfill_id: str) -> dict[str, Any]:
    """The backfill's rows, throttled time and reasons, and batches (jobs/ledger/queries/
    backfills.sql and slices.sql name the columns)."""
    conn = primary.connect(run_db(side))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT b.state, coalesce(sum(s.rows_done), 0), coalesce(sum(s.throttled_ms), 0), "
                "coalesce(array_agg(DISTINCT s.throttle_reason) "
                "FILTER (WHERE s.throttle_reason IS NOT NULL), '{}') "
                "FROM runbook.backfills b LEFT JOIN runbook.backfill_slices s "
                "ON s.backfill_id = b.id WHERE b.id = %s GROUP BY b.state",
                (backfill_id,),
            )
            state, rows, throttled_ms, reasons = cur.fetchone()
            if state != "succeeded":
                raise RuntimeError(f"backfill {backfill_id} is {state} after the command exited")
            cur.execute(
                "SELECT rows, duration_ms, throttled_ms, extract(epoch FROM committed_at) "
                "FROM runbook.backfill_batches WHERE backfill_id = %s ORDER BY id",
                (backfill_id,),
            )
            batches = [Batch(int(r), float(d), float(t), float(c)) for r, d, t, c in cur]
    finally:
        conn.close()
    return {
        "rows": int(rows),
        "throttled_s": float(throttled_ms) / 1000,
        "throttled_before_batches_s": sum(b.throttled_ms for b in batches) / 1000,
        "reasons": list(reasons),
        "batches": batches,
    }


# -- what the samples say ------------------------------------------------------------------------


def wal_at(samples: list[Sample], t: float) -> float:
    """The primary's WAL position at ``t``, interpolated between the samples around it."""
    times = [s.t for s in samples]
    i = bisect.bisect_left(times, t)
    if i == 0:
        return float(samples[0].wal)
    if i == len(samples):
        return float(samples[-1].wal)
    a, b = samples[i - 1], samples[i]
    return a.wal + (b.wal - a.wal) * (t - a.t) / (b.t - a.t)


def cycle_peaks(side: Side) -> list[float]:
    """The peak lag bytes of every PERIOD_S cycle: from each pause until the next one."""
    starts = [p[0] for p in side.paused] + [math.inf]
    peaks = []
    for lo, hi in zip(starts, starts[1:], strict=False):
        lags = [s.lag_bytes for s in side.samples if lo <= s.t < hi and s.lag_bytes is not None]
        if lags:
            peaks.append(float(max(lags)))
    return peaks


def analyse(side: Side) -> dict[str, float]:
    def known(values: list[Any]) -> list[float]:
        return [float(v) for v in values if v is not None]

    lag_b = known([s.lag_bytes for s in side.samples])
    lag_s = known([s.lag_s for s in side.samples])
    delay = known([s.delay_s for s in side.samples])
    wal = side.samples[-1].wal - side.samples[0].wal if side.samples else 0
    largest = max(side.batches, key=lambda b: b.rows)
    measured = max(
        wal_at(side.samples, b.committed) - wal_at(side.samples, b.committed - b.duration_ms / 1000)
        for b in side.batches
    )
    walking_s = max(side.seconds - side.throttled_s, 1e-9)

    def peak(values: list[float], p: float) -> float:
        return bb.percentile(values, p) if values else math.nan

    return {
        "lag bytes max": peak(lag_b, 100),
        "lag bytes p95": peak(lag_b, 95),
        "replay_lag s max": peak(lag_s, 100),
        "replay_lag s p95": peak(lag_s, 95),
        "standby delay s max": peak(delay, 100),
        "standby delay s p95": peak(delay, 95),
        "WAL bytes": float(wal),
        "WAL bytes per row": wal / side.rows if side.rows else 0.0,
        "largest batch rows": float(largest.rows),
        "largest batch WAL, estimated": largest.rows * wal / side.rows if side.rows else 0.0,
        "batch WAL, measured max": measured,
        "rows/s outside throttle waits": side.rows / walking_s,
        "samples without the standby": float(sum(1 for s in side.samples if s.lag_bytes is None)),
    }


def mb(value: float) -> str:
    return f"{value / 2**20:.1f} MB"


def report(sides: dict[str, Side]) -> int:
    print()
    print(
        f"{'side':<8} {'wall s':>7} {'rows/s':>8} {'lag max':>10} {'p95':>10} "
        f"{'replay_lag max/p95':>19} {'standby delay max/p95':>22} {'throttled':>10} "
        f"{'rows/s unthrottled':>18}"
    )
    for name, side in sides.items():
        st = side.stats
        print(
            f"{name:<8} {side.seconds:7.2f} {side.rate / 1000:7.0f}k {mb(st['lag bytes max']):>10} "
            f"{mb(st['lag bytes p95']):>10} "
            f"{st['replay_lag s max']:8.2f} / {st['replay_lag s p95']:4.2f} s "
            f"{st['standby delay s max']:11.2f} / {st['standby delay s p95']:4.2f} s "
            f"{side.throttled_s:8.2f} s {st['rows/s outside throttle waits'] / 1000:17.0f}k"
        )
    for name, side in sides.items():
        st = side.stats
        print(f"\n{name} ({SIDES[name][1]}), backfill {side.backfill_id}:")
        print(
            f"  WAL {mb(st['WAL bytes'])} ({st['WAL bytes per row']:.0f} B/row), "
            f"{len(side.batches)} batches; largest {st['largest batch rows']:.0f} rows, its WAL "
            f"{mb(st['largest batch WAL, estimated'])} estimated (rows x B/row); a batch's WAL "
            f"from the 100 ms samples: at most {mb(st['batch WAL, measured max'])}"
        )
        print(
            f"  throttled {side.throttled_s:.2f} s of {side.seconds:.2f} s "
            f"({side.throttled_before_batches_s:.2f} s recorded before a batch); last reasons: "
            f"{'; '.join(side.reasons) or 'none'}"
        )
        peaks = ", ".join(f"{p / 2**20:.0f}" for p in cycle_peaks(side))
        print(f"  peak lag of each {PERIOD_S:g} s cycle (MB): {peaks or 'none'}")
        print(
            f"  replay paused {len(side.paused)} times for up to {PAUSE_S:g} s; after the command "
            f"exited the standby took {side.catch_up_s:.1f} s to catch up"
        )
        if st["samples without the standby"]:
            print(f"  {st['samples without the standby']:.0f} samples found no standby1 row")

    bounded, free = sides["bounded"], sides["free"]
    allowance = bounded.stats["largest batch WAL, estimated"]
    limit = BOUND_BYTES + allowance
    worst = bounded.stats["lag bytes max"]
    ok = not math.isnan(worst) and worst <= limit
    print()
    print(
        f"free side: max lag {mb(free.stats['lag bytes max'])}, "
        f"{free.stats['lag bytes max'] / BOUND_BYTES:.1f}x the bound (not judged); "
        f"bounded side: {bounded.rate / 1000:.0f}k rows/s with the throttle holding "
        f"{bounded.throttled_s:.1f} s of {bounded.seconds:.1f} s "
        f"(free side {free.rate / 1000:.0f}k rows/s)"
    )
    print(
        f"target bounded max lag <= bound {mb(BOUND_BYTES)} + largest batch's WAL "
        f"{mb(allowance)} = {mb(limit)}: {'MET' if ok else 'NOT MET'} ({mb(worst)})"
    )
    return 0 if ok else 1


def plot(sides: dict[str, Side], path: Path, rows: int) -> None:
    """Lag bytes over time, a panel a side: the paused intervals shaded, the bound (and the
    bound plus the largest batch's WAL) as lines, the lag in seconds on the right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sides), 1, figsize=(10, 3.3 * len(sides)), sharex=True)
    longest = max(side.seconds for side in sides.values())
    for ax, side in zip(axes, sides.values(), strict=True):
        t0 = side.wall0
        for lo, hi in side.paused:
            ax.axvspan(lo - t0, hi - t0, color="0.88", lw=0)
        known = [s for s in side.samples if s.lag_bytes is not None]
        ax.plot(
            [s.t - t0 for s in known],
            [s.lag_bytes / 2**20 for s in known if s.lag_bytes is not None],
            color="tab:blue",
            lw=1.1,
            label="lag, MB (pg_current_wal_lsn() - replay_lsn)",
        )
        ax.axhline(BOUND_BYTES / 2**20, color="tab:red", lw=0.9, ls="--", label="the bound")
        if side.name == "bounded":
            limit = BOUND_BYTES + side.stats["largest batch WAL, estimated"]
            ax.axhline(
                limit / 2**20, color="tab:red", lw=0.9, ls=":", label="bound + largest batch's WAL"
            )
        ax.axvline(side.seconds, color="0.3", lw=0.8)
        ax.set_ylabel("MB behind", fontsize=8)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.4)  # headroom above the lines for the legend
        ax.tick_params(labelsize=7.5)
        secs = ax.twinx()
        for attr, colour, label in (
            ("lag_s", "tab:orange", "replay_lag, s"),
            ("delay_s", "tab:green", "standby's replay delay, s"),
        ):
            pts = [(s.t - t0, getattr(s, attr)) for s in side.samples]
            pts = [(t, v) for t, v in pts if v is not None]
            secs.plot([t for t, _ in pts], [v for _, v in pts], color=colour, lw=0.7, label=label)
        secs.set_ylabel("seconds behind", fontsize=8)
        secs.set_ylim(0, max(secs.get_ylim()[1], 0.1) * 1.4)
        secs.tick_params(labelsize=7.5)
        st = side.stats
        ax.set_title(
            f"{side.name}, {SIDES[side.name][1]}: {side.seconds:.1f} s, {side.rate / 1000:.0f}k "
            f"rows/s, max lag {st['lag bytes max'] / 2**20:.0f} MB / {st['replay_lag s max']:.1f} "
            f"s, throttled {side.throttled_s:.1f} s",
            fontsize=8.5,
            loc="left",
        )
        handles = ax.get_legend_handles_labels()
        more = secs.get_legend_handles_labels()
        ax.legend(
            handles[0] + more[0],
            handles[1] + more[1],
            fontsize=7,
            loc="upper left",
            ncol=3,
        )
    axes[-1].set_xlim(0, longest * 1.02)
    axes[-1].set_xlabel(
        f"seconds since the command started (grey: the standby's replay paused, {PAUSE_S:g} s "
        f"of every {PERIOD_S:g} s; vertical line: the command exited)",
        fontsize=8,
    )
    fig.suptitle(f"Standby lag during a backfill of {rows:,} rows", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows (2000000)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="runbook's first batch size (default: the CLI's own)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=REPO / "bench" / "replica_lag.png",
        help="where to draw the lag (bench/replica_lag.png)",
    )
    args = parser.parse_args(argv)
    if args.rows < 10_000:
        parser.error("--rows must be at least 10000")

    # SIGTERM unwinds like Ctrl-C, so the worker is stopped and the pair removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    problem = services_problem()
    if problem:
        print(problem)
        return 2

    os.environ["CELERY_BROKER_URL"] = bb.REDIS_URL
    os.environ["CELERY_RESULT_BACKEND"] = bb.REDIS_URL
    os.environ["RUNBOOK_QUEUE"] = QUEUE

    pair: Any = None
    worker: bb.Worker | None = None
    with tempfile.TemporaryDirectory(prefix="runbook-bench-replica-") as tmp:
        root = Path(tmp)
        try:
            t0 = time.monotonic()
            try:
                pair = start_pair()
            except RuntimeError as exc:
                print(f"could not start a primary and a standby: {str(exc).splitlines()[0]}")
                return 2
            print(f"primary and standby streaming in {time.monotonic() - t0:.1f}s (not timed)")
            config = root / "runbook.toml"
            write_config(config, pair.primary)
            os.environ["RUNBOOK_CONFIG"] = str(config)
            worker = bb.Worker(root / "worker.log", WORKER_CONCURRENCY, f"bench-replica-{SESSION}")
            return run(args, pair, worker)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if worker is not None:
                worker.stop()
            if pair is not None:
                pair.stop()
            bb.delete_queue(QUEUE)


def run(args: argparse.Namespace, pair: Any, worker: Any) -> int:
    timeout_s = max(900.0, args.rows / 1000)
    (version,) = pair.primary.sql("SHOW server_version")[0]
    print(
        f"bench: backfill of {args.rows:,} rows on a primary (PostgreSQL {version}, port "
        f"{pair.primary.port}) streaming to standby1 (port {pair.standby.port}), its replay "
        f"paused {PAUSE_S:g} s of every {PERIOD_S:g} s; lag sampled every {SAMPLE_S * 1000:.0f} "
        f"ms; sides {', '.join(SIDES)}; worker prefork -c {WORKER_CONCURRENCY}, queue {QUEUE}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print("runbook: " + shlex.join(cli_args("SIDE", args.batch_size)))
    for name, (settings, _) in SIDES.items():
        print(f"  target {name}: {settings.strip().replace(chr(10), ', ')}")
    t0 = time.monotonic()
    worker.start()
    print(f"worker ready in {time.monotonic() - t0:.1f}s (not timed)")
    t0 = time.monotonic()
    heap = build_template(pair.primary, args.rows)
    print(
        f"template {TEMPLATE_DB}: large_table heap {heap / 2**20:.0f} MB, built in "
        f"{time.monotonic() - t0:.1f}s (not timed); each side runs on a fresh FILE_COPY of it "
        "after a CHECKPOINT, once the standby has replayed it"
    )

    # Warm-up (untimed): the worker's imports and first tasks, on a small table of its own.
    fresh_copy(pair, "free")
    pair.primary.sql(
        "CREATE TABLE warm_up AS SELECT * FROM large_table WHERE id <= 20000; "
        "ALTER TABLE warm_up ADD PRIMARY KEY (id)",
        run_db("free"),
    )
    t0 = time.monotonic()
    warm = subprocess.run(
        cli_args("free", args.batch_size, "warm_up"), capture_output=True, text=True, timeout=300
    )
    if warm.returncode:
        raise RuntimeError(f"warm-up backfill exited {warm.returncode}: {warm.stderr[-2000:]}")
    print(f"warm-up backfill (not timed): {time.monotonic() - t0:.2f}s")

    sides: dict[str, Side] = {}
    for name in SIDES:
        ready_s = fresh_copy(pair, name)
        side = run_side(pair, name, args.batch_size, timeout_s)
        side.catch_up_s = caught_up(pair, timeout_s)
        for server in (pair.primary, pair.standby):
            problem = left_undone(server, name, args.rows)
            if problem:
                raise RuntimeError(f"{name}, {server.data.name}: {problem}")
        side.stats = analyse(side)
        sides[name] = side
        print(
            f"  {name}: {side.seconds:.2f}s {side.rate / 1000:.0f}k rows/s, max lag "
            f"{mb(side.stats['lag bytes max'])}, throttled {side.throttled_s:.1f}s "
            f"(standby caught up {ready_s:.1f}s before, {side.catch_up_s:.1f}s after)"
        )
    plot(sides, args.plot, args.rows)
    print(f"plot: {args.plot} ({args.plot.stat().st_size / 1024:.0f} KB)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (shared machine)")
    return report(sides)


if __name__ == "__main__":
    sys.exit(main())
