"""Benchmark: how a rollout's bookkeeping scales with the number of members.

    .venv/bin/python bench/bench_fleet_scale.py [--members 10000] [--workers 2]

A catalog group of --members rows (default 10,000) that all name one database already at
head, so that every member is skipped: what is measured is what grows with the fleet, not the
migrations (bench/bench_rollout.py measures those). As a user types them, wall clock:

1. ``runbook rollout --group scale --wait``: the catalog read, the members listed into the
   control database, each member's revision read and the member skipped, every pass a short
   task on one of the ``runbook worker`` processes; reported as members a second;
2. ``runbook status ROLLOUT --json``: the whole fleet's record (its size in bytes too);
3. ``runbook rollouts``: the counts alone.

It reports; it has no target to meet (README "Fleets" quotes it). Exit 2 when PostgreSQL or
Redis is missing. Every database it created is dropped and the workers stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = str(Path(sys.executable).parent / "runbook")
ADMIN_URL = os.environ.get(
    "RUNBOOK_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BROKER = os.environ.get("RUNBOOK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
TAG = uuid.uuid4().hex[:8]

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def db_url(dbname: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname


def admin(sql: str, dbname: str | None = None) -> list[tuple[Any, ...]]:
    import psycopg2

    conn = psycopg2.connect(db_url(dbname) if dbname else ADMIN_URL, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(
                next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
            )
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def timed(args: list[str], env: dict[str, str], timeout: float) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(
        [RUNBOOK, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(
            f"runbook {' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}"
        )
    return wall, out.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    try:
        admin("SELECT 1")
        import redis

        redis.Redis.from_url(BROKER, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001 - any missing service: one line
        print(f"bench_fleet_scale: PostgreSQL or Redis is not reachable ({exc})", file=sys.stderr)
        return 2
    from tests.projects import trivial_history, write_project

    tmp = Path(tempfile.mkdtemp(prefix="rb-scale-"))
    member, catalog, control = (f"rb_scale_{TAG}_{k}" for k in ("member", "catalog", "control"))
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for name in (member, catalog, control):
            admin(f"CREATE DATABASE {name}")
        ini = write_project(tmp / "proj", trivial_history(3))
        head = "r0003"
        admin(
            "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY); "
            + "".join(f"CREATE TABLE t{i:04d} (id int PRIMARY KEY); " for i in (1, 2, 3))
            + f"INSERT INTO alembic_version VALUES ('{head}')",
            member,
        )
        admin(
            "CREATE TABLE tenants (name text PRIMARY KEY, url text NOT NULL, active bool); "
            f"INSERT INTO tenants SELECT 'm' || lpad(g::text, 6, '0'), '{db_url(member)}', true "
            f"FROM generate_series(1, {args.members}) g",
            catalog,
        )
        config = tmp / "runbook.toml"
        config.write_text(
            f'[control]\nurl = "{db_url(control)}"\n\n[groups.scale]\n'
            f'catalog_url = "{db_url(catalog)}"\n'
            'catalog_query = "SELECT name, url FROM tenants WHERE active"\n'
            f'alembic_ini = "{ini}"\nbackup = false\n'
        )
        env = dict(
            os.environ,
            RUNBOOK_CONFIG=str(config),
            RUNBOOK_QUEUE=f"rb-scale-{TAG}",
            CELERY_BROKER_URL=BROKER,
            CELERY_RESULT_BACKEND=BROKER,
            PYTHONUNBUFFERED="1",
        )
        for i in range(args.workers):
            log = (tmp / f"worker{i}.log").open("ab")
            workers.append(
                subprocess.Popen(
                    [RUNBOOK, "worker", "-c", "2", "-n", f"scale{i}-{TAG}@%h"],
                    env=env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 60
        while not all(
            "ready." in (tmp / f"worker{i}.log").read_text(errors="replace")
            for i in range(args.workers)
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not become ready")
            time.sleep(0.2)
        time.sleep(2)  # the pool processes forked
        before = [rss_mb(w.pid) for w in workers]
        wall, out = timed(["rollout", "--group", "scale", "--wait", "--json"], env, 3600)
        found = json.loads(out)
        assert found["counts"] == {"skipped": args.members}, found["counts"]
        status_s, status_out = timed(["status", found["id"], "--json"], env, 600)
        list_s, _ = timed(["rollouts"], env, 600)
        memory = [rss_mb(w.pid) for w in workers]
        print(f"members: {args.members} (all skipped), workers: {args.workers} x -c 2")
        print(f"rollout --wait       {wall:8.1f} s   {args.members / wall:8.0f} members/s")
        print(f"status ROLLOUT --json{status_s:8.2f} s   {len(status_out) / 1e6:8.2f} MB of JSON")
        print(f"rollouts             {list_s:8.2f} s")
        print(
            "worker memory (main + pool), before -> after: "
            + ", ".join(f"{b:.0f} -> {m:.0f} MB" for b, m in zip(before, memory, strict=True))
        )
        return 0
    finally:
        for w in workers:
            try:
                os.killpg(w.pid, signal.SIGTERM)
                w.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(w.pid, signal.SIGKILL)
        for name in (member, catalog, control):
            admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
