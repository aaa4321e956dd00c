"""Benchmark: the commands users type. `runbook apply` against `alembic upgrade head`, and
the CLI's start-up against bare Python.

    .venv/bin/python bench/bench_apply.py [--repeats 5] [--revisions 60] [--case mlflow]
        [--cli-repeats 10]

Every timed side is a cold process, timed by wall clock from its start to its exit:

(a) alembic: ``.venv/bin/alembic -c INI upgrade head``;
(b) runbook: ``.venv/bin/runbook apply --target T --to head --wait --no-backup`` (the backup
    step excluded with ``--no-backup``), served by a worker started once up front as a user
    starts one, ``.venv/bin/runbook worker --concurrency 1`` (its own queue via
    RUNBOOK_QUEUE, RUNBOOK_CONFIG naming a runbook.toml this script writes), whose process
    is warmed by one untimed apply first, as a long-running worker is;
(c) CLI start: ``runbook --help`` and ``runbook status RUN`` against ``python -c pass``.

Cases: ``mlflow``, the 67 revisions that ``mlflow-skinny`` ships in mlflow/store/db_migrations
(initial tables from ``mlflow.store.tracking.dbmodels.initial_models``, as MLflow's own
``_initialize_tables`` makes them; an alembic.ini pointing at the package's script directory,
as ``mlflow.store.db.utils._get_alembic_config`` builds it); ``trivial``, ``--revisions`` small
``CREATE TABLE`` revisions. Every repeat of either side gets a fresh database (a copy of the
case's template); sides are interleaved and their order alternates.

Targets: runbook apply <= 2.0x alembic on MLflow's history (stretch 1.5x); CLI start <= 0.3 s
above bare Python. Exit 0 when every target is met, 1 when one is not, 2 when Postgres or
Redis is unreachable or mlflow-skinny is not installed (``make bench`` installs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ADMIN_URL = os.environ.get(
    "RUNBOOK_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("RUNBOOK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
SESSION = uuid.uuid4().hex[:8]
QUEUE = f"runbook-bench-{SESSION}"
APPLY_TARGET = 2.0
APPLY_STRETCH = 1.5
CLI_TARGET_S = 0.3

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def db_url(dbname: str, driver: str = "postgresql") -> str:
    base = ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname
    return base.replace("postgresql://", f"{driver}://", 1)


def admin_exec(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(ADMIN_URL, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def query(dbname: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg2

    conn = psycopg2.connect(db_url(dbname), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


def services_problem() -> str | None:
    """One line naming the first unreachable service, or None."""
    import psycopg2
    import redis

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
    """Scratch databases (templates and per-repeat copies), dropped one by one or at the end."""

    def __init__(self) -> None:
        self.live: list[str] = []
        self.counter = 0

    def create(self, template: str | None = None) -> str:
        self.counter += 1
        name = f"rb_bench_{SESSION}_{self.counter:03d}"
        admin_exec(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        self.live.append(name)
        return name

    def drop(self, name: str) -> None:
        admin_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.live.remove(name)

    def drop_all(self) -> None:
        for name in reversed(list(self.live)):  # copies before their templates
            try:
                self.drop(name)
            except Exception as exc:  # keep dropping the others
                print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)


@dataclass
class Case:
    """One history, as both sides see it."""

    name: str
    script_location: Path
    template: str  # a database at the history's base, copied for every repeat
    revisions: int
    head: str
    alembic_times: list[float] = field(default_factory=list)
    runbook_times: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    last_run: str | None = None
    last_db: str | None = None


def write_ini(root: Path, case: Case, dbname: str) -> Path:
    """A small alembic.ini naming the case's script directory and one database; both sides
    use it (runbook replaces sqlalchemy.url with the target's URL)."""
    ini = root / f"alembic-{case.name}.ini"
    ini.write_text(
        f"[alembic]\nscript_location = {case.script_location}\n"
        f"sqlalchemy.url = {db_url(dbname, 'postgresql+psycopg2').replace('%', '%%')}\n"
    )
    return ini


def write_config(path: Path, targets: dict[str, tuple[str, Path]], backup_dir: Path) -> None:
    """runbook.toml; the worker re-reads it on every task."""
    lines = []
    for name, (dbname, ini) in targets.items():
        lines += [
            f"[targets.{name}]",
            f"url = {json.dumps(db_url(dbname))}",
            f"alembic_ini = {json.dumps(str(ini))}",
            f"backup_dir = {json.dumps(str(backup_dir))}",
            "",
        ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


class Worker:
    """``runbook worker``, as a user starts it, in its own process group."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "runbook"), "worker", "--concurrency", "1", "-n", f"bench-{SESSION}@%h"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_text()[-3000:]}")
            if " ready." in self.log_text():
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


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str, str]:
    """Wall time of one command from its start to its exit; raises when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    return elapsed, proc.stdout, proc.stderr


def at_head(dbname: str, case: Case) -> None:
    found = query(dbname, "SELECT version_num FROM alembic_version")
    if found != [(case.head,)]:
        raise RuntimeError(f"database {dbname} is at {found}, not at {case.head}")


class Bench:
    def __init__(self, root: Path, dbs: Databases) -> None:
        self.root = root
        self.dbs = dbs
        self.config = root / "runbook.toml"
        self.backups = root / "backups"
        self.targets: dict[str, tuple[str, Path]] = {}
        self.env = dict(
            os.environ,
            RUNBOOK_CONFIG=str(self.config),
            RUNBOOK_QUEUE=QUEUE,
            CELERY_BROKER_URL=REDIS_URL,
            CELERY_RESULT_BACKEND=REDIS_URL,
            PYTHONUNBUFFERED="1",
            # MLflow's own switch (both sides import mlflow): its usage upload at import and
            # exit waits on a network this machine does not have.
            MLFLOW_DISABLE_TELEMETRY="true",
        )
        # As on a user's machine, .pyc files are written and read (on both sides).
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        write_config(self.config, {}, self.backups)

    def alembic_once(self, case: Case) -> float:
        name = self.dbs.create(case.template)
        try:
            ini = write_ini(self.root, case, name)
            elapsed, _, _ = timed(
                [str(BIN / "alembic"), "-c", str(ini), "upgrade", "head"], self.env, self.root
            )
            at_head(name, case)
            return elapsed
        finally:
            self.dbs.drop(name)

    def runbook_once(self, case: Case, keep: bool = False) -> tuple[float, dict[str, float]]:
        name = self.dbs.create(case.template)
        try:
            ini = write_ini(self.root, case, name)
            self.targets[case.name] = (name, ini)
            write_config(self.config, self.targets, self.backups)
            cmd = [str(BIN / "runbook"), "apply", "--target", case.name, "--to", "head"]
            cmd += ["--wait", "--no-backup"]
            wall0 = time.time()
            elapsed, stdout, _ = timed(cmd, self.env, self.root)
            run_id = stdout.strip().splitlines()[0]
            at_head(name, case)
            phases = self.phases(name, run_id, case, wall0, wall0 + elapsed)
            if keep:
                if case.last_db:
                    self.dbs.drop(case.last_db)
                case.last_run, case.last_db = run_id, name
            return elapsed, phases
        finally:
            if not keep:
                self.dbs.drop(name)

    def phases(
        self, dbname: str, run_id: str, case: Case, t0: float, t1: float
    ) -> dict[str, float]:
        """Where a run's time went, from the ledger's timestamps (same host, same clock)."""
        (run,) = query(
            dbname,
            "SELECT state, created_at, started_at, finished_at FROM runbook.runs "
            f"WHERE id = '{run_id}'",
        )
        steps = query(
            dbname,
            "SELECT kind, started_at, finished_at FROM runbook.steps "
            f"WHERE run_id = '{run_id}' ORDER BY id",
        )
        state, created, started, finished = run
        if state != "succeeded":
            raise RuntimeError(f"run {run_id} ended {state}")
        kinds = [s[0] for s in steps]
        if kinds.count("upgrade") != case.revisions or kinds.count("verify") != case.revisions:
            raise RuntimeError(f"run {run_id} has unexpected steps: {kinds}")

        def ts(value: datetime) -> float:
            return value.timestamp()

        def span(kind: str) -> float:
            return sum(ts(b) - ts(a) for k, a, b in steps if k == kind)

        gaps = sum(ts(b[1]) - ts(a[2]) for a, b in zip(steps, steps[1:], strict=False))
        return {
            "CLI start -> run admitted (imports, checks)": ts(created) - t0,
            "admitted -> running (task sent, Celery hop)": ts(started) - ts(created),
            "running -> first step (project loaded)": ts(steps[0][1]) - ts(started),
            "preflight step": span("preflight"),
            "last step -> succeeded": ts(finished) - ts(steps[-1][2]),
            "succeeded -> CLI exits": t1 - ts(finished),
            "upgrade steps": span("upgrade"),
            "verify steps": span("verify"),
            "between steps (ledger writes)": gaps,
        }


PER_REVISION = ("upgrade steps", "verify steps", "between steps (ledger writes)")


def mlflow_case(bench: Bench) -> Case:
    try:
        import mlflow.store.db_migrations as migrations
        from mlflow.store.tracking.dbmodels.initial_models import Base
    except ImportError:
        raise SystemExit(
            "mlflow-skinny is not installed; `make bench` installs it (the `bench` extra)"
        ) from None
    import sqlalchemy as sa
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    location = Path(migrations.__file__).parent
    template = bench.dbs.create()
    engine = sa.create_engine(db_url(template, "postgresql+psycopg2"))
    try:
        Base.metadata.create_all(engine)  # what MLflow's _initialize_tables does first
    finally:
        engine.dispose()
    config = Config()
    config.set_main_option("script_location", str(location))
    script = ScriptDirectory.from_config(config)
    revisions = list(script.walk_revisions())
    import mlflow

    print(f"mlflow-skinny {mlflow.__version__}: {len(revisions)} revisions in {location}")
    return Case("mlflow", location, template, len(revisions), str(script.get_current_head()))


def trivial_case(bench: Bench, count: int) -> Case:
    from tests.projects import trivial_history, write_project

    project = bench.root / "trivial"
    write_project(project, trivial_history(count))
    template = bench.dbs.create()
    return Case("trivial", project / "migrations", template, count, f"r{count:04d}")


def cli_start(bench: Bench, case: Case, repeats: int) -> dict[str, list[float]]:
    """Cold starts, interleaved: bare Python, `runbook --help`, `runbook status RUN`."""
    assert case.last_run is not None
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "runbook --help": [str(BIN / "runbook"), "--help"],
        f"runbook status RUN ({case.name})": [str(BIN / "runbook"), "status", case.last_run],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for cmd in commands.values():  # one untimed start each: the page cache, .pyc files
        timed(cmd, bench.env, bench.root)
    for _ in range(repeats):
        for label, cmd in commands.items():
            times[label].append(timed(cmd, bench.env, bench.root)[0])
    return times


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def report_case(case: Case) -> float:
    med_a = statistics.median(case.alembic_times)
    med_r = statistics.median(case.runbook_times)
    ratio = med_r / med_a
    per_repeat = statistics.median(
        r / a for r, a in zip(case.runbook_times, case.alembic_times, strict=True)
    )
    print()
    print(f"== {case.name}: {case.revisions} revisions, {len(case.alembic_times)} repeats")
    print(f"alembic upgrade head       : median {med_a:.3f}s  [{fmt(case.alembic_times)}]")
    print(f"runbook apply --wait       : median {med_r:.3f}s  [{fmt(case.runbook_times)}]")
    print(
        f"ratio of medians           : {ratio:.2f}x (median of per-repeat ratios {per_repeat:.2f}x)"
    )
    print(f"overhead per revision      : {(med_r - med_a) / case.revisions * 1000:.1f} ms")
    print("runbook's time by phase (median over repeats, from the ledger's timestamps):")
    for key in case.phases[0]:
        value = statistics.median(p[key] for p in case.phases)
        per = (
            f"  ({value / case.revisions * 1000:.1f} ms per revision)"
            if key in PER_REVISION
            else ""
        )
        print(f"  {key:<46} {value * 1000:8.1f} ms{per}")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side (5)")
    parser.add_argument("--revisions", type=int, default=60, help="trivial revisions (60)")
    parser.add_argument(
        "--case", choices=["all", "mlflow", "trivial"], default="all", help="history (all)"
    )
    parser.add_argument("--cli-repeats", type=int, default=10, help="timed CLI starts (10)")
    args = parser.parse_args(argv)
    if args.revisions < 1 or args.repeats < 1 or args.cli_repeats < 1:
        parser.error("--revisions, --repeats and --cli-repeats must be at least 1")

    # SIGTERM unwinds like Ctrl-C, so the worker is stopped and the databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    problem = services_problem()
    if problem:
        print(problem)
        return 2

    dbs = Databases()
    worker: Worker | None = None
    cases: list[Case] = []
    cli: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="runbook-bench-") as tmp:
        bench = Bench(Path(tmp), dbs)
        try:
            if args.case in ("all", "mlflow"):
                cases.append(mlflow_case(bench))
            if args.case in ("all", "trivial"):
                cases.append(trivial_case(bench, args.revisions))
            load = os.getloadavg()[0]
            print(
                f"bench: {args.repeats} repeats, worker `runbook worker --concurrency 1`, "
                f"queue {QUEUE}, load {load:.1f} on {os.cpu_count()} cores"
            )
            worker = Worker(bench.env, bench.root / "worker.log")
            t0 = time.perf_counter()
            worker.start()
            print(f"worker ready in {time.perf_counter() - t0:.1f}s (not timed)")
            if os.environ.get("PYTHONDONTWRITEBYTECODE"):
                print("note: PYTHONDONTWRITEBYTECODE is set here; unset for the timed commands")
            for case in cases:
                first, _ = bench.runbook_once(case)  # the worker's first task imports the project
                warm = bench.alembic_once(case)
                print(f"{case.name} warm-up (not timed): runbook {first:.2f}s, alembic {warm:.2f}s")
                for i in range(args.repeats):
                    sides: list[tuple[str, Callable[[], Any]]] = [
                        ("alembic", lambda c=case: bench.alembic_once(c)),
                        ("runbook", lambda c=case: bench.runbook_once(c, keep=True)),
                    ]
                    if i % 2:
                        sides.reverse()
                    for side, fn in sides:
                        value = fn()
                        if side == "alembic":
                            case.alembic_times.append(value)
                        else:
                            case.runbook_times.append(value[0])
                            case.phases.append(value[1])
                    a, r = case.alembic_times[-1], case.runbook_times[-1]
                    print(
                        f"  {case.name} repeat {i + 1}: alembic {a:.2f}s  runbook {r:.2f}s"
                        f"  ({r / a:.2f}x)"
                    )
            cli = cli_start(bench, cases[0], args.cli_repeats)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if worker is not None:
                worker.stop()
            dbs.drop_all()
            _delete_queue()

    met = True
    for case in cases:
        ratio = report_case(case)
        if case.name == "mlflow":
            verdict = "MET" if ratio <= APPLY_TARGET else "NOT MET"
            stretch = "met" if ratio <= APPLY_STRETCH else "not met"
            print(
                f"target runbook <= {APPLY_TARGET:g}x alembic: {verdict}; "
                f"stretch {APPLY_STRETCH:g}x {stretch}"
            )
            met = met and ratio <= APPLY_TARGET
    print()
    print(f"== CLI start, {args.cli_repeats} cold starts each, interleaved")
    bare = statistics.median(cli["python -c pass"])
    for label, values in cli.items():
        med = statistics.median(values)
        above = "" if label.startswith("python") else f"  (+{med - bare:.3f}s above bare Python)"
        print(f"  {label:<32} median {med:.3f}s  [{fmt(values)}]{above}")
        if not label.startswith("python"):
            met = met and med - bare <= CLI_TARGET_S
    worst = max(statistics.median(v) for k, v in cli.items() if not k.startswith("python"))
    verdict = "MET" if worst - bare <= CLI_TARGET_S else "NOT MET"
    print(
        f"target CLI start <= {CLI_TARGET_S:g}s above bare Python: {verdict} (+{worst - bare:.3f}s)"
    )
    return 0 if met else 1


def _delete_queue() -> None:
    import redis

    with contextlib.suppress(redis.RedisError):
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).delete(QUEUE)


if __name__ == "__main__":
    sys.exit(main())
