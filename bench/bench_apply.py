"""Benchmark: apply N trivial revisions with plain Alembic vs. through runbook.

    .venv/bin/python bench/bench_apply.py [--revisions 60] [--repeats 5]

(a) alembic: ``python -m alembic -c <ini> upgrade head`` in a subprocess, wall time of the
    whole command;
(b) runbook: a real Celery worker (prefork, -c 1) started once up front, then the time from
    ``jobs.api.enqueue(target, "head", backup=False)`` until ``jobs.api.wait(run_id)`` returns
    the succeeded run (per-step verify and ledger included, no backup).

Every measurement gets a fresh database; one untimed warm-up of each side runs first. The
target is "runbook costs at most 2x plain Alembic". Exit 0 when the target is met, 1 when it
is not, 2 when Postgres or Redis is unreachable.
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get(
    "RUNBOOK_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("RUNBOOK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
SESSION = uuid.uuid4().hex[:8]
QUEUE = f"runbook-bench-{SESSION}"
TARGET_RATIO = 2.0

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def db_url(dbname: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname


def admin_exec(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(ADMIN_URL, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
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
    """Fresh scratch databases, dropped one by one or all at the end."""

    def __init__(self) -> None:
        self.live: list[str] = []
        self.counter = 0

    def create(self) -> str:
        self.counter += 1
        name = f"rb_bench_{SESSION}_{self.counter:03d}"
        admin_exec(f"CREATE DATABASE {name}")
        self.live.append(name)
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


class RunbookConfig:
    """The runbook.toml shared by this process and the worker (re-read on every task)."""

    def __init__(self, path: Path, alembic_ini: Path, backup_dir: Path) -> None:
        self.path = path
        self.alembic_ini = alembic_ini
        self.backup_dir = backup_dir
        self.targets: dict[str, str] = {}
        self.write()

    def set_targets(self, targets: dict[str, str]) -> None:
        self.targets = dict(targets)
        self.write()

    def write(self) -> None:
        lines = []
        for name, url in self.targets.items():
            lines += [
                f"[targets.{name}]",
                f"url = {json.dumps(url)}",
                f"alembic_ini = {json.dumps(str(self.alembic_ini))}",
                f"backup_dir = {json.dumps(str(self.backup_dir))}",
                "backup = false",
                "",
            ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines))
        tmp.replace(self.path)


class Worker:
    """A real Celery worker process, like tests/integration/conftest.py's."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, RUNBOOK_CONFIG=str(self.config), PYTHONUNBUFFERED="1")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "worker.app",
                    "worker",
                    "-Q",
                    QUEUE,
                    "-c",
                    "1",
                    "--pool",
                    "prefork",
                    "--loglevel",
                    "INFO",
                    "-n",
                    f"bench-{SESSION}@%h",
                    "--without-mingle",
                    "--without-gossip",
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


def write_alembic_ini(root: Path, url: str) -> Path:
    """An ini next to the project's own, naming one database (the project's env.py reads
    only sqlalchemy.url)."""
    ini = root / "alembic-bench.ini"
    ini.write_text(
        "[alembic]\nscript_location = %(here)s/migrations\n"
        f"sqlalchemy.url = {url.replace('%', '%%')}\n"
    )
    return ini


def time_alembic(root: Path, dbs: Databases) -> float:
    name = dbs.create()
    try:
        url = db_url(name)
        ini = write_alembic_ini(root, url)
        env = dict(os.environ, DATABASE_URL=url)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"alembic upgrade head failed:\n{proc.stderr[-3000:]}")
        return elapsed
    finally:
        dbs.drop(name)


FIXED_PHASES = (
    "enqueue() until the run is admitted",
    "admitted -> running (Celery hop, run lock)",
    "running -> first step (project load, path)",
    "last step -> succeeded",
    "succeeded -> wait() returns (polling)",
)
PER_REVISION_PHASES = (
    "upgrade step (fingerprint before + alembic)",
    "verify step (current, indexes, fingerprint)",
    "between steps (ledger writes, progress)",
)


def phases_of(run: dict[str, Any], t_enqueue: float, t_done: float) -> dict[str, float]:
    """Where a run's time went, from the ledger's timestamps (same host, same clock)."""
    from datetime import datetime

    def ts(value: str | None) -> float:
        assert value is not None
        return datetime.fromisoformat(value).timestamp()

    def span(kind: str) -> float:
        return sum(
            ts(s["finished_at"]) - ts(s["started_at"]) for s in run["steps"] if s["kind"] == kind
        )

    steps = run["steps"]
    gaps = sum(
        ts(b["started_at"]) - ts(a["finished_at"]) for a, b in zip(steps, steps[1:], strict=False)
    )
    values = (
        ts(run["created_at"]) - t_enqueue,
        ts(run["started_at"]) - ts(run["created_at"]),
        ts(steps[0]["started_at"]) - ts(run["started_at"]),
        ts(run["finished_at"]) - ts(steps[-1]["finished_at"]),
        t_done - ts(run["finished_at"]),
        span("upgrade"),
        span("verify"),
        gaps,
    )
    return dict(zip(FIXED_PHASES + PER_REVISION_PHASES, values, strict=True))


def time_runbook(
    config: RunbookConfig, dbs: Databases, revisions: int, poll_s: float
) -> tuple[float, dict[str, float]]:
    from jobs import api

    name = dbs.create()
    target = name
    try:
        config.set_targets({target: db_url(name)})
        wall0 = time.time()
        start = time.perf_counter()
        run_id = api.enqueue(target, "head", backup=False)
        if run_id is None:
            raise RuntimeError("enqueue found nothing to do on a fresh database")
        final = api.wait(run_id, target, timeout_s=300, poll_s=poll_s)
        elapsed = time.perf_counter() - start
        wall1 = wall0 + elapsed
        if final["state"] != "succeeded":
            raise RuntimeError(f"run {run_id} ended {final['state']}: {final['error']}")
        kinds = [s["kind"] for s in final["steps"]]
        if kinds.count("upgrade") != revisions or kinds.count("verify") != revisions:
            raise RuntimeError(f"run {run_id} has unexpected steps: {kinds}")
        return elapsed, phases_of(final, wall0, wall1)
    finally:
        config.set_targets({})
        dbs.drop(name)


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}s" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revisions", type=int, default=60, help="revisions to apply (60)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side (5)")
    parser.add_argument(
        "--poll",
        type=float,
        default=0.25,
        help="jobs.api.wait poll interval in seconds (0.25, the API's and CLI's default)",
    )
    args = parser.parse_args(argv)
    if args.revisions < 1 or args.repeats < 1:
        parser.error("--revisions and --repeats must be at least 1")

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

    from tests.projects import trivial_history, write_project

    dbs = Databases()
    worker: Worker | None = None
    with tempfile.TemporaryDirectory(prefix="runbook-bench-") as tmp:
        root = Path(tmp)
        try:
            project = root / "project"
            alembic_ini = write_project(project, trivial_history(args.revisions))
            config = RunbookConfig(root / "runbook.toml", alembic_ini, root / "backups")
            os.environ["RUNBOOK_CONFIG"] = str(config.path)

            print(
                f"bench: {args.revisions} trivial revisions, {args.repeats} repeats, "
                f"worker prefork -c 1, queue {QUEUE}, wait poll {args.poll}s"
            )
            worker = Worker(config.path, root / "worker.log")
            t0 = time.perf_counter()
            worker.start()
            print(f"worker ready in {time.perf_counter() - t0:.1f}s (not timed)")
            if os.environ.get("PYTHONDONTWRITEBYTECODE"):
                print("note: PYTHONDONTWRITEBYTECODE is set: every load of a revision compiles it")

            def alembic_once() -> float:
                return time_alembic(project, dbs)

            def runbook_once() -> tuple[float, dict[str, float]]:
                return time_runbook(config, dbs, args.revisions, args.poll)

            warm_a = alembic_once()
            warm_r, _ = runbook_once()
            print(f"warm-up (not timed): alembic {warm_a:.3f}s, runbook {warm_r:.3f}s")

            alembic_times: list[float] = []
            runbook_times: list[float] = []
            phases: list[dict[str, float]] = []
            for i in range(args.repeats):  # interleaved, so drift hits both sides alike
                a = alembic_once()
                r, ph = runbook_once()
                alembic_times.append(a)
                runbook_times.append(r)
                phases.append(ph)
                print(f"  repeat {i + 1}: alembic {a:.3f}s  runbook {r:.3f}s  ({r / a:.2f}x)")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if worker is not None:
                worker.stop()
            dbs.drop_all()
            _delete_queue()

    report(args.revisions, alembic_times, runbook_times, phases)
    ratio = statistics.median(runbook_times) / statistics.median(alembic_times)
    return 0 if ratio <= TARGET_RATIO else 1


def _delete_queue() -> None:
    import redis

    with contextlib.suppress(redis.RedisError):
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).delete(QUEUE)


def report(
    revisions: int,
    alembic_times: list[float],
    runbook_times: list[float],
    phases: list[dict[str, float]],
) -> None:
    med_a = statistics.median(alembic_times)
    med_r = statistics.median(runbook_times)
    ratio = med_r / med_a
    overhead_ms = (med_r - med_a) / revisions * 1000
    print()
    print(f"alembic upgrade head : median {med_a:.3f}s  [{fmt(alembic_times)}]")
    print(f"runbook enqueue+wait : median {med_r:.3f}s  [{fmt(runbook_times)}]")
    print(f"ratio runbook/alembic: {ratio:.2f}x")
    print(f"overhead per revision: {overhead_ms:.1f} ms ({revisions} revisions)")
    verdict = "MET" if ratio <= TARGET_RATIO else "NOT MET"
    print(f"target runbook <= {TARGET_RATIO:g}x alembic: {verdict} ({ratio:.2f}x)")

    def median(key: str) -> float:
        return statistics.median(p[key] for p in phases)

    print()
    print("runbook time by phase (median over repeats, from the ledger's timestamps):")
    print("  once per run:")
    for key in FIXED_PHASES:
        print(f"    {key:<46} {median(key) * 1000:8.1f} ms")
    print(f"  per revision (total / {revisions}):")
    for key in PER_REVISION_PHASES:
        print(f"    {key:<46} {median(key) / revisions * 1000:8.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
