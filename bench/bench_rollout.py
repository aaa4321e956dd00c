"""Benchmark: `runbook rollout --group fleet --to head --wait` vs. the shell loop users write.

    .venv/bin/python bench/bench_rollout.py [--members 100] [--rows 3000] [--repeats 1]
        [--parallel 4] [--high-parallel 8] [--concurrency 2] [--loop-only]

Every side is timed as a user times the command: wall clock from its start to its exit, the
baseline in the same run.

Fixture (untimed): a template database with a small app schema (customers, orders; --rows
orders and a third as many customers), Alembic's version table at the base revision r0 and
the runbook ledger created (as on any fleet runbook already manages; --no-ledger leaves it
out, so the timed rollout also creates it on every member). --members databases are copied
from it (CREATE DATABASE ... TEMPLATE), fresh copies for every side. An Alembic project in a
temporary directory has 5 revisions pending on every member: add a column, create an index,
create a table, a data update, a check constraint. Its env.py takes the connection runbook
hands it, else DATABASE_URL, as many projects' env.py files do.

loop     the loop users write today, run by bash as one command:
         for db in ...; do DATABASE_URL=postgresql://.../$db .venv/bin/alembic -c alembic.ini
         upgrade head || exit 1; done
rollout  .venv/bin/runbook rollout --group fleet --to head --wait --parallel P (the CLI's other
         defaults: one canary, --max-failures 0), served by two `runbook worker -c C`
         processes the bench starts as a user does (their own queue through RUNBOOK_QUEUE,
         RUNBOOK_CONFIG naming a runbook.toml the bench writes: one [targets.NAME] per member,
         [control] url naming a control database the bench creates, [groups.fleet] targets =
         ["<prefix>_*"]). The workers are warmed first by one untimed rollout over a group of
         their own (a long-running worker has loaded the project already).
         Cases: backup = false (verify on, as always) at --parallel and --high-parallel;
         backup = true with verify_restore = false at --parallel.

After the rollouts: each worker's memory, every process of it (the `runbook worker`
supervisor, Celery's main process, its pool), VmRSS and PSS from /proc, after the warm-up
and after the last rollout.

Targets: rollout without backups >= 3x faster than the loop; with backups >= 1.0x. It prints
the table and exits 0 when every target is met, 1 when one is not (as the other benchmarks
do, so that `make bench` says so), 2 when Postgres or Redis is unreachable. Every database it
created (members, template, control) is dropped and the workers stopped at the end, also on
error, Ctrl-C or SIGTERM. The machine may be shared: quote the load average with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The backfill benchmark's services, connections and worker (RUNBOOK_BENCH_ADMIN_URL,
# RUNBOOK_BENCH_REDIS_URL): this script runs from bench/, where it is found.
from bench_backfill import (
    REDIS_URL,
    REPO,
    RUNBOOK,
    Worker,
    admin_exec,
    connect,
    db_url,
    delete_queue,
    services_problem,
)

ALEMBIC = RUNBOOK.parent / "alembic"
SESSION = uuid.uuid4().hex[:8]
QUEUE = f"runbook-bench-rollout-{SESSION}"
PREFIX = f"bench_fleet_{SESSION}"  # member databases and targets: PREFIX_001 ...
TEMPLATE_DB = f"{PREFIX}tpl"
CONTROL_DB = f"{PREFIX}ctl"
WARM_PREFIX = f"{PREFIX}warm"  # not matched by the fleet's "PREFIX_*"
HEAD = "r5"
TARGET_NO_BACKUP = 3.0
TARGET_BACKUP = 1.0
WORKERS = 2

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.projects import ENV_PY as _ENV_PY  # noqa: E402
from tests.projects import Rev, write_project  # noqa: E402

# tests/projects.py's env.py, which takes the connection runbook hands over, reading the URL
# from DATABASE_URL first when it makes its own (as many projects' env.py files do).
_OWN_URL = 'url = config.get_main_option("sqlalchemy.url")'
assert _OWN_URL in _ENV_PY
ENV_PY = "import os\n" + _ENV_PY.replace(
    _OWN_URL, 'url = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")'
)


def schema_sql(rows: int) -> str:
    """The members' tables before r1, with ``rows`` orders and a third as many customers,
    stamped at r0 as Alembic stamps."""
    customers = max(1, rows // 3)
    return f"""
        CREATE TABLE customers (
            id serial PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now());
        CREATE TABLE orders (
            id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers (id),
            amount numeric(10, 2) NOT NULL, status text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now());
        INSERT INTO customers (email, name)
        SELECT 'user' || g || '@example.com', 'Customer ' || g
        FROM generate_series(1, {customers}) AS g;
        INSERT INTO orders (customer_id, amount, status)
        SELECT 1 + g % {customers}, (g % 500) + 0.99,
               (ARRAY['open', 'done', 'cancelled'])[1 + g % 3]
        FROM generate_series(1, {rows}) AS g;
        CREATE TABLE alembic_version (
            version_num varchar(32) NOT NULL,
            CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num));
        INSERT INTO alembic_version VALUES ('r0');
        """


def revisions() -> list[Any]:
    """r1..r5 on top of r0 (an empty base revision, the schema above)."""
    return [
        Rev("r0", "pass", down=None, message="base: customers and orders"),
        Rev(
            "r1",
            'op.add_column("customers", sa.Column("phone", sa.Text(), nullable=True))',
            'op.drop_column("customers", "phone")',
        ),
        Rev(
            "r2",
            'op.create_index("ix_orders_customer_id", "orders", ["customer_id"])',
            'op.drop_index("ix_orders_customer_id", table_name="orders")',
        ),
        Rev(
            "r3",
            """
            op.create_table(
                "invoices",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("order_id", sa.Integer, sa.ForeignKey("orders.id"), nullable=False),
                sa.Column("total", sa.Numeric(10, 2), nullable=False),
            )
            """,
            'op.drop_table("invoices")',
        ),
        Rev(
            "r4",
            "op.execute(\"UPDATE orders SET status = 'closed' WHERE status = 'done'\")",
            "op.execute(\"UPDATE orders SET status = 'done' WHERE status = 'closed'\")",
        ),
        Rev(
            "r5",
            'op.create_check_constraint("ck_orders_amount", "orders", "amount >= 0")',
            'op.drop_constraint("ck_orders_amount", "orders", type_="check")',
        ),
    ]


# -- databases ----------------------------------------------------------------------------------


class Databases:
    """Databases created by this run, on one admin connection, all dropped at the end."""

    def __init__(self) -> None:
        self.live: list[str] = []
        self.conn: Any = None

    def _exec(self, sql: str) -> None:
        if self.conn is None or self.conn.closed:
            self.conn = connect()
        with self.conn.cursor() as cur:
            cur.execute(sql)

    def create(self, name: str, template: str | None = None) -> str:
        self.live.append(name)
        self._exec(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        return name

    def drop(self, name: str) -> None:
        self._exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.live.remove(name)

    def recreate(self, names: list[str], template: str) -> None:
        """Every one of ``names`` a fresh copy of ``template``."""
        for name in names:
            if name in self.live:
                self.drop(name)
            self.create(name, template)

    def drop_all(self) -> None:
        for name in reversed(list(self.live)):  # copies before their template
            try:
                self.drop(name)
            except Exception as exc:  # keep dropping the others
                print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)
        if self.conn is not None:
            self.conn.close()


def build_template(dbs: Databases, rows: int, ledger: bool) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from jobs.ledger import schema

    dbs.create(TEMPLATE_DB)
    admin_exec(schema_sql(rows), TEMPLATE_DB)
    admin_exec("VACUUM ANALYZE", TEMPLATE_DB)
    if ledger:
        engine = create_engine(
            db_url(TEMPLATE_DB).replace("postgresql://", "postgresql+psycopg2://", 1),
            poolclass=NullPool,
        )
        with engine.connect() as conn:
            schema.ensure(conn)
        engine.dispose()


def revisions_of(names: list[str]) -> dict[str, int]:
    """How many of the databases ``names`` are at each revision."""
    mix: dict[str, int] = {}
    for name in names:
        (rev,) = admin_exec("SELECT version_num FROM alembic_version", name)[0]
        mix[rev] = mix.get(rev, 0) + 1
    return mix


# -- config, workers ------------------------------------------------------------------------------


def write_config(path: Path, ini: Path, members: list[str], warm: list[str], backup: bool) -> None:
    """runbook.toml: a target per member (and per warm-up database), the control database,
    groups fleet and warm. ``backup``: backups on with verify_restore off, else off."""
    lines = [
        "[control]",
        f"url = {json.dumps(db_url(CONTROL_DB))}",
        "",
        "[groups.fleet]",
        f"targets = {json.dumps([PREFIX + '_*'])}",
        "",
        "[groups.warm]",
        f"targets = {json.dumps([WARM_PREFIX + '_*'])}",
        "",
    ]
    for name in [*warm, *members]:
        lines += [
            f"[targets.{name}]",
            f"url = {json.dumps(db_url(name))}",
            f"alembic_ini = {json.dumps(str(ini))}",
            f"backup_dir = {json.dumps(str(path.parent / 'backups'))}",
            f"backup = {'true' if backup else 'false'}",
        ]
        if backup:
            lines.append("verify_restore = false")
        lines.append("")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)  # the workers re-read it on every task: never a half-written file


# -- memory -------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (children from /proc/PID/task/*/children)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += process_tree(int(child))
    return found


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) of ``pid`` in kB; PSS shares the pages a fork shares among its sharers."""
    rss = pss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def memory_line(worker: Worker) -> str:
    """One worker's processes: RSS each (supervisor, Celery main, pool) and the totals."""
    if worker.proc is None or worker.proc.poll() is not None:
        return f"{worker.name}: not running"
    pids = process_tree(worker.proc.pid)
    sizes = [memory_kb(p) for p in pids]
    each = " + ".join(f"{rss / 1024:.0f}" for rss, _ in sizes)
    rss_total = sum(r for r, _ in sizes) / 1024
    pss_total = sum(p for _, p in sizes) / 1024
    return (
        f"{worker.name}: {len(pids)} processes (supervisor, Celery main, pool), RSS {each} MB "
        f"= {rss_total:.0f} MB; PSS {pss_total:.0f} MB"
    )


# -- the sides ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    seconds: float
    ok: bool
    note: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


def loop_command(ini: Path, members: list[str]) -> str:
    """The shell loop a user writes: one `alembic upgrade head` per database."""
    base = shlex.quote(db_url(""))
    return (
        f"for db in {' '.join(members)}; do "
        f"DATABASE_URL={base}$db {shlex.quote(str(ALEMBIC))} -c {shlex.quote(str(ini))} "
        "upgrade head || exit 1; done"
    )


def run_loop(ini: Path, members: list[str], log: Path) -> Outcome:
    cmd = loop_command(ini, members)
    with log.open("ab") as out:
        start = time.monotonic()
        done = subprocess.run(["bash", "-c", cmd], stdout=out, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - start
    mix = revisions_of(members)
    ok = done.returncode == 0 and mix == {HEAD: len(members)}
    note = "" if ok else f"exit {done.returncode}, revisions {mix} (log {log})"
    return Outcome(seconds, ok, note)


def rollout_args(group: str, parallel: int) -> list[str]:
    return [
        str(RUNBOOK),
        "rollout",
        "--group",
        group,
        "--to",
        "head",
        "--wait",
        "--parallel",
        str(parallel),
    ]


def rollout_id(stdout: str) -> str | None:
    """The rollout's id from the CLI's output: JSON's ``id``, else the first word printed."""
    with contextlib.suppress(ValueError):
        data = json.loads(stdout)
        if isinstance(data, dict) and data.get("id"):
            return str(data["id"])
    words = stdout.split()
    return words[0] if words else None


def rollout_status(rid: str) -> dict[str, Any]:
    done = subprocess.run(
        [str(RUNBOOK), "status", rid, "--json"], capture_output=True, text=True, timeout=120
    )
    try:
        data = json.loads(done.stdout)
    except ValueError:
        return {"error": f"status --json exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return data if isinstance(data, dict) else {"error": f"status --json gave {data!r}"}


MEMBER_RUNS_SQL = """
    SELECT extract(epoch FROM r.created_at), extract(epoch FROM r.started_at),
           extract(epoch FROM r.finished_at), s.kind,
           coalesce(sum(extract(epoch FROM s.finished_at - s.started_at)), 0)
    FROM runbook.runs r LEFT JOIN runbook.steps s ON s.run_id = r.id
    WHERE r.id = (SELECT id FROM runbook.runs WHERE kind = 'apply'
                  ORDER BY created_at DESC LIMIT 1)
    GROUP BY 1, 2, 3, 4
"""


def member_phases(members: list[str], wall0: float, wall_end: float) -> dict[str, float]:
    """Where a rollout's time went, from each member's last apply run in its ledger (the
    server's clock: the same machine's)."""
    created, started, finished, run_s = [], [], [], []
    steps: dict[str, float] = {}
    for name in members:
        rows = admin_exec(MEMBER_RUNS_SQL, name)
        if not rows or rows[0][2] is None:
            continue
        c, st, f = (float(v) for v in rows[0][:3])
        created.append(c)
        started.append(st)
        finished.append(f)
        run_s.append(f - st)
        for *_, kind, seconds in rows:
            if kind:
                steps[kind] = steps.get(kind, 0.0) + float(seconds)
    if not run_s:
        return {}
    busy = max(finished) - min(started)
    phases = {
        "command start -> first member run created": min(created) - wall0,
        "first member run created -> first finished (the canary)": min(finished) - min(created),
        "first member run finished -> last finished": max(finished) - min(finished),
        "last member run finished -> command exit": wall_end - max(finished),
        "member run, started -> finished (median)": statistics.median(run_s),
        "member run, created -> started (median wait in the queue)": statistics.median(
            st - c for st, c in zip(started, created, strict=True)
        ),
        "member runs in flight on average (a count: run time summed / span)": sum(run_s) / busy,
    }
    for kind, seconds in sorted(steps.items()):
        phases[f"{kind} steps per member (mean)"] = seconds / len(run_s)
    return phases


def dead_worker(workers: list[Worker]) -> str | None:
    """Why a worker is gone (its exit and its log's last lines), or None while all run."""
    for w in workers:
        if w.proc is not None and w.proc.poll() is not None:
            tail = w.log_text().strip().splitlines()[-3:]
            return f"worker {w.name} exited ({w.proc.returncode}) during the rollout: {tail}"
    return None


def follow(cmd: list[str], workers: list[Worker], timeout_s: float) -> tuple[int, str, str]:
    """Run ``cmd`` to its exit; stopped early (exit -1) when a worker dies or at the
    deadline, as no rollout can finish then. Its (exit code, stdout, stderr)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout_s
        why = None
        while proc.poll() is None:
            why = dead_worker(workers) or (
                f"timed out after {timeout_s:.0f}s" if time.monotonic() > deadline else None
            )
            if why:
                proc.terminate()
                proc.wait(30)
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        code = -1 if why else proc.returncode
        return code, out.read(), (why + "; " if why else "") + err.read()


# Celery's line for a finished task: its name, seconds and result (the pass's summary).
TASK_DONE = re.compile(r"Task runbook\.(\w+)\[[^\]]+\] succeeded in ([0-9.]+)s: (.*)")


def pass_times(logged: str) -> dict[str, float]:
    """The rollout's advancing passes (one at a time per rollout) from the workers' log
    lines: how many advanced it and their time, how many found another pass at work."""
    advanced, refused = [], 0
    for name, seconds, result in TASK_DONE.findall(logged):
        if name != "advance_rollout":
            continue
        if "another pass is advancing it" in result:
            refused += 1
        else:
            advanced.append(float(seconds))
    if not advanced:
        return {}
    return {
        "advancing passes that advanced it (a count)": len(advanced),
        "advancing pass, task time (median)": statistics.median(advanced),
        "advancing passes, task time summed (one pass at a time)": sum(advanced),
        "passes that found another pass advancing it (a count)": refused,
    }


def run_rollout(
    group: str, parallel: int, members: list[str], workers: list[Worker], timeout_s: float
) -> Outcome:
    wall0, start = time.time(), time.monotonic()
    code, stdout, stderr = follow(rollout_args(group, parallel), workers, timeout_s)
    seconds = time.monotonic() - start
    wall_end = wall0 + seconds
    mix = revisions_of(members)
    rid = rollout_id(stdout)
    status = rollout_status(rid) if rid else {}
    counts = status.get("counts") or {}
    ok = code == 0 and mix == {HEAD: len(members)}
    note = ""
    if not ok:
        note = (
            f"exit {code}, revisions {mix}, state {status.get('state')}, "
            f"error {status.get('error')}; stdout {stdout.strip()[-400:]!r}; "
            f"stderr {stderr.strip()[-600:]!r}"
        )
    phases = member_phases(members, wall0, wall_end) if ok else {}
    return Outcome(seconds, ok, note, counts, phases)


def rollout_available() -> str | None:
    """None when this tree's CLI has `runbook rollout`, else why not."""
    done = subprocess.run(
        [str(RUNBOOK), "rollout", "--help"], capture_output=True, text=True, timeout=60
    )
    if done.returncode == 0 and "--group" in done.stdout:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}, no output"


# -- main -----------------------------------------------------------------------------------------


@dataclass
class Case:
    key: str
    label: str
    backup: bool
    parallel: int
    target: float | None
    results: list[Outcome] = field(default_factory=list)


def cases(args: argparse.Namespace, available: bool) -> list[Case]:
    found = [Case("loop", "shell loop: alembic upgrade head per database", False, 1, None)]
    if not available:
        return found
    p, hp = args.parallel, args.high_parallel
    found.append(Case("p", f"rollout, backup=false, --parallel {p}", False, p, TARGET_NO_BACKUP))
    if hp and hp != p:
        found.append(
            Case("hp", f"rollout, backup=false, --parallel {hp}", False, hp, TARGET_NO_BACKUP)
        )
    found.append(
        Case(
            "bk", f"rollout, backup=true (no trial restore), --parallel {p}", True, p, TARGET_BACKUP
        )
    )
    return found


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path, dbs: Databases) -> None:
        self.args = args
        self.root = root
        self.dbs = dbs
        self.members = [f"{PREFIX}_{i:03d}" for i in range(1, args.members + 1)]
        self.warm = [f"{WARM_PREFIX}_{i}" for i in range(1, WORKERS * args.concurrency + 1)]
        self.config = root / "runbook.toml"
        self.ini = Path()
        self.workers: list[Worker] = []
        self.timeout_s = max(600.0, args.members * 20.0)
        self.fresh = False  # whether the members are untouched copies of the template

    def prepare(self, with_rollout: bool) -> None:
        self.ini = write_project(self.root / "project", revisions(), env_py=ENV_PY)
        t0 = time.monotonic()
        build_template(self.dbs, self.args.rows, ledger=not self.args.no_ledger)
        self.dbs.recreate(self.members, TEMPLATE_DB)
        self.fresh = True
        print(
            f"fixture: template {TEMPLATE_DB} ({self.args.rows} orders, "
            f"{max(1, self.args.rows // 3)} customers, ledger "
            f"{'absent' if self.args.no_ledger else 'created'}), {len(self.members)} members "
            f"copied in {time.monotonic() - t0:.1f}s (not timed); revisions "
            f"{revisions_of(self.members)}"
        )
        if not with_rollout:
            return
        self.dbs.create(CONTROL_DB)
        self.dbs.recreate(self.warm, TEMPLATE_DB)
        write_config(self.config, self.ini, self.members, self.warm, backup=False)
        os.environ["RUNBOOK_CONFIG"] = str(self.config)
        t0 = time.monotonic()
        for i in range(1, WORKERS + 1):
            name = f"bench-rollout-{SESSION}-{i}"
            self.workers.append(Worker(self.root / f"{name}.log", self.args.concurrency, name))
        for w in self.workers:
            w.start()
        print(
            f"{WORKERS} workers (`runbook worker -c {self.args.concurrency}`) ready in "
            f"{time.monotonic() - t0:.1f}s (not timed)"
        )
        warm = run_rollout("warm", len(self.warm), self.warm, self.workers, self.timeout_s)
        print(
            f"warm-up rollout over {len(self.warm)} other databases (not timed): "
            f"{warm.seconds:.2f}s{'' if warm.ok else ' FAILED: ' + warm.note}"
        )
        for w in self.workers:
            print(f"  memory after warm-up: {memory_line(w)}")

    def measure(self, case: Case) -> Outcome:
        t0 = time.monotonic()
        if not self.fresh:
            self.dbs.recreate(self.members, TEMPLATE_DB)
        self.fresh = False
        reset_s = time.monotonic() - t0
        if case.key == "loop":
            outcome = run_loop(self.ini, self.members, self.root / "loop.log")
        else:
            for w in self.workers:
                if w.proc is None or w.proc.poll() is not None:
                    print(f"  {dead_worker([w]) or w.name + ' not running'}: started again")
                    w.start()
            write_config(self.config, self.ini, self.members, self.warm, backup=case.backup)
            marks = [len(w.log_text()) for w in self.workers]
            outcome = run_rollout(
                "fleet", case.parallel, self.members, self.workers, self.timeout_s
            )
            if outcome.ok:
                logged = "".join(w.log_text()[m:] for w, m in zip(self.workers, marks, strict=True))
                outcome.phases.update(pass_times(logged))
        counts = ", ".join(f"{k} {v}" for k, v in sorted(outcome.counts.items()))
        print(
            f"  {case.label}: {outcome.seconds:.2f}s"
            + (f" [{counts}]" if counts else "")
            + ("" if outcome.ok else f" FAILED: {outcome.note}")
            + f" (members reset in {reset_s:.1f}s, not timed)"
        )
        return outcome


def report(all_cases: list[Case], members: int, workers: list[Worker]) -> bool:
    """Print the table; whether every target was met."""
    met = True
    loop = statistics.median(o.seconds for o in all_cases[0].results)
    print()
    print(f"{members} members, 5 pending revisions each (medians; ratio = loop s / case s):")
    print(f"  {'case':<58} {'wall s':>8} {'vs loop':>8} {'target':>8}  verdict")
    for case in all_cases:
        wall = statistics.median(o.seconds for o in case.results)
        ratio = loop / wall
        if case.target is None:
            target, verdict = "-", "baseline"
        else:
            target = f">= {case.target:g}x"
            failed = [o for o in case.results if not o.ok]
            if failed:
                verdict = f"not met (failed {len(failed)} of {len(case.results)})"
            else:
                verdict = "met" if ratio >= case.target else "not met"
            met = met and verdict == "met"
        print(f"  {case.label:<58} {wall:8.2f} {ratio:7.2f}x {target:>8}  {verdict}")
    for case in all_cases[1:]:
        runs = [o.phases for o in case.results if o.phases]
        if not runs:
            continue
        print(f"where the time of {case.label} went (s, median over repeats; member ledgers):")
        for key in runs[0]:
            print(f"  {key:<68} {statistics.median(r.get(key, 0.0) for r in runs):7.2f}")
    for w in workers:
        print(f"memory after the rollouts: {memory_line(w)}")
    return met


def run(args: argparse.Namespace, root: Path, dbs: Databases, bench: Bench) -> bool:
    why_not = rollout_available()
    if why_not:
        print(f"`runbook rollout` is not available on this tree ({why_not}): the loop only")
    if args.loop_only:
        why_not = why_not or "--loop-only"
    all_cases = cases(args, why_not is None)
    print(
        f"bench: {args.members} members, {args.rows} orders each, {args.repeats} repeat(s); "
        f"cases {', '.join(c.key for c in all_cases)}; queue {QUEUE}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"loop: bash -c {shlex.quote(loop_command(Path('alembic.ini'), ['<db>', '...']))}")
    if why_not is None:
        print("rollout: " + " ".join(rollout_args("fleet", args.parallel)))
    bench.prepare(with_rollout=why_not is None)
    for i in range(args.repeats):
        print(f"repeat {i + 1}:")
        rotated = all_cases[i % len(all_cases) :] + all_cases[: i % len(all_cases)]
        for case in rotated:
            case.results.append(bench.measure(case))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (shared machine: numbers are noisy)")
    return report(all_cases, args.members, bench.workers) and why_not is None


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--members", type=int, default=100, help="member databases (100)")
    parser.add_argument("--rows", type=int, default=3000, help="orders per member (3000)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each case (1)")
    parser.add_argument("--parallel", type=int, default=4, help="rollout --parallel (4)")
    parser.add_argument(
        "--high-parallel", type=int, default=8, help="a second --parallel, 0 for none (8)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=2, help="each worker's pool processes (2)"
    )
    parser.add_argument("--no-ledger", action="store_true", help="members without the ledger")
    parser.add_argument("--loop-only", action="store_true", help="time the shell loop alone")
    parser.add_argument(
        "--logs", type=Path, default=None, help="copy the workers' logs into this directory"
    )
    args = parser.parse_args(argv)
    if args.members < 2 or args.rows < 1 or args.repeats < 1:
        parser.error("--members must be at least 2, --rows and --repeats at least 1")
    if args.parallel < 1 or args.high_parallel < 0 or args.concurrency < 1:
        parser.error("--parallel and --concurrency must be at least 1, --high-parallel >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # SIGTERM unwinds like Ctrl-C, so the workers are stopped and the databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    problem = services_problem() or (
        None if ALEMBIC.exists() else f"{ALEMBIC} is missing; run `make install` first"
    )
    if problem:
        print(problem)
        return 2
    # Shared by the CLI and the workers (the environment they inherit).
    os.environ["CELERY_BROKER_URL"] = REDIS_URL
    os.environ["CELERY_RESULT_BACKEND"] = REDIS_URL
    os.environ["RUNBOOK_QUEUE"] = QUEUE
    os.environ.pop("DATABASE_URL", None)
    dbs = Databases()
    with tempfile.TemporaryDirectory(prefix="runbook-bench-rollout-") as tmp:
        bench = Bench(args, Path(tmp), dbs)
        try:
            met = run(args, Path(tmp), dbs, bench)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            for w in bench.workers:
                w.stop()
                if args.logs and w.log_path.exists():
                    args.logs.mkdir(parents=True, exist_ok=True)
                    shutil.copy(w.log_path, args.logs / w.log_path.name)
            dbs.drop_all()
            delete_queue(QUEUE)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
