"""Benchmark: runbook's backup and whole-database restore vs. raw pg_dump / pg_restore.

    .venv/bin/python bench/bench_backup.py [--size-mb 300] [--repeats 3]

One source database of about --size-mb is built once (untimed): three tables filled with
generate_series rows and text payloads, a foreign key, two secondary indexes, then
VACUUM (FREEZE, ANALYZE). Then, interleaved in the same run, medians over the repeats:

1. backup
   (a) raw: ``pg_dump -Fc -f FILE`` then ``pg_restore --list FILE`` (subprocesses);
   (b) runbook as a target takes it by default: ``jobs.vault.take_backup`` with the
       default settings (``verify_restore = true`` below ``verify_restore_max_bytes``):
       dump + per-table row counts and checksums from one snapshot, list check, sha256,
       and the trial restore into a scratch database checked table by table;
   variants that are not the default, reported separately and not judged: (c) with
   ``verify_restore = false`` (no trial restore), and (d) also with
   ``verify_restore_max_bytes = 0`` (no per-table checksum), so (c) - (d) is what the
   checksums cost and (b) - (c) what the trial restore costs.
2. restore, into a database recreated (untimed) before every timed restore as a copy of the
   source (CREATE DATABASE ... TEMPLATE) whose rows and columns were then changed:
   (a) raw: ``pg_restore --clean --if-exists --single-transaction -d DB FILE``;
   (b) runbook: ``jobs.restore.restore_database(target, FILE)``.
   Both end states are checked (untimed) against the source.

Targets: backup (b), the default, <= 1.15x (a); restore (b) <= 1.2x (a). Exit 0 when both
are met, 1 when not, 2 when PostgreSQL or its client tools are missing. Every database
created here is dropped and every dump file deleted at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get(
    "RUNBOOK_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
SESSION = uuid.uuid4().hex[:8]
TARGET_BACKUP = 1.15
TARGET_RESTORE = 1.2
TOOLS = ("pg_dump", "pg_restore", "psql")

# Calibrated on PostgreSQL 15: an empty database is ~7.5 MB, and every unit of ``n`` below
# (one events row, a twentieth of an accounts row, a tenth of a documents row, with their
# indexes) adds ~411 bytes.
EMPTY_DB_BYTES = 7_550_000
BYTES_PER_UNIT = 411

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def db_url(dbname: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname


def admin_exec(sql: str, dbname: str | None = None) -> list[tuple[Any, ...]]:
    import psycopg2

    conn = psycopg2.connect(db_url(dbname) if dbname else ADMIN_URL, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def services_problem() -> str | None:
    """One line naming the first missing service or tool, or None."""
    import psycopg2

    try:
        psycopg2.connect(ADMIN_URL, connect_timeout=3).close()
    except psycopg2.Error:
        return f"PostgreSQL is not reachable at {ADMIN_URL}; start it and run the benchmark again"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH; install the PostgreSQL client tools and retry"
    return None


class Databases:
    """Databases created by this run, dropped one by one or all at the end."""

    def __init__(self) -> None:
        self.live: list[str] = []
        version = admin_exec("SHOW server_version_num")[0][0]
        # FILE_COPY (PostgreSQL 15+) copies the files after a checkpoint: much faster than
        # the default WAL_LOG strategy for a few hundred MB.
        self.strategy = " STRATEGY FILE_COPY" if int(version) >= 150000 else ""

    def create(self, name: str, template: str | None = None) -> str:
        sql = f"CREATE DATABASE {name}"
        if template:
            sql += f" TEMPLATE {template}{self.strategy}"
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


def build_source(dbname: str, size_mb: int) -> dict[str, Any]:
    """Fill ``dbname`` with about ``size_mb`` MiB; returns rows and sizes."""
    n = max(2000, int((size_mb * 1024 * 1024 - EMPTY_DB_BYTES) / BYTES_PER_UNIT))
    accounts, documents = max(1, n // 20), max(1, n // 10)
    admin_exec(
        f"""
        CREATE TABLE accounts (
            id bigint PRIMARY KEY, email text NOT NULL, name text NOT NULL,
            created_at timestamptz NOT NULL, balance numeric(12, 2) NOT NULL);
        CREATE TABLE events (
            id bigint NOT NULL, account_id bigint NOT NULL, kind text NOT NULL,
            created_at timestamptz NOT NULL, payload text NOT NULL);
        CREATE TABLE documents (id bigint PRIMARY KEY, title text NOT NULL, body text NOT NULL);
        INSERT INTO accounts
        SELECT g, 'user' || g || '@example.com', 'User ' || md5(g::text),
               timestamptz '2020-01-01' + g * interval '1 minute', (g % 100000) / 100.0
        FROM generate_series(1, {accounts}) g;
        INSERT INTO events
        SELECT g, 1 + (g::bigint * 7919) % {accounts},
               (ARRAY['login', 'logout', 'view', 'purchase', 'refund'])[1 + g % 5],
               timestamptz '2020-01-01' + g * interval '1 second',
               format('{{"ip": "10.%s.%s.%s", "path": "/items/%s", "token": "%s", "note": "%s"}}',
                      g % 256, (g / 256) % 256, g % 7, g % 10007, md5(g::text),
                      substr(md5((g::bigint * 31)::text) || md5((g::bigint * 97)::text),
                             1, 20 + g % 44))
        FROM generate_series(1, {n}) g;
        INSERT INTO documents
        SELECT g, 'Document ' || g,
               repeat('lorem ipsum dolor sit amet ' || md5(g::text) || ' ', 10 + g % 20)
        FROM generate_series(1, {documents}) g;
        ALTER TABLE events ADD PRIMARY KEY (id);
        ALTER TABLE events ADD FOREIGN KEY (account_id) REFERENCES accounts (id);
        CREATE INDEX events_account_created ON events (account_id, created_at);
        CREATE INDEX documents_title ON documents (title);
        """,
        dbname,
    )
    # Frozen, hinted and analysed: no timed read later sets hint bits or autovacuum runs.
    admin_exec("VACUUM (FREEZE, ANALYZE)", dbname)
    tables = admin_exec(
        "SELECT relname, pg_total_relation_size(oid) FROM pg_class "
        "WHERE relname IN ('accounts', 'events', 'documents') ORDER BY 2 DESC",
        dbname,
    )
    size = admin_exec(f"SELECT pg_database_size('{dbname}')")[0][0]
    rows = {"accounts": accounts, "events": n, "documents": documents}
    return {"size": int(size), "tables": {t: (rows[t], int(b)) for t, b in tables}}


# Changes a failed run could leave behind: rows updated, deleted and inserted, a new column.
MODIFY = """
UPDATE events SET payload = 'changed' WHERE id % 100 = 0;
DELETE FROM documents WHERE id % 50 = 0;
INSERT INTO accounts VALUES (-1, 'new@example.com', 'New', now(), 0);
ALTER TABLE events ADD COLUMN flag boolean;
"""

# What must hold after either restore: the source's rows and columns are back.
CHECK = """
SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM documents),
       (SELECT count(*) FROM accounts),
       (SELECT count(*) FROM events WHERE payload = 'changed'),
       (SELECT count(*) FROM information_schema.columns
        WHERE table_name = 'events' AND column_name = 'flag')
"""


def mb(nbytes: float) -> str:
    return f"{nbytes / 1024 / 1024:.0f} MB"


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}s" for v in values)


def checkpoint() -> None:
    """Flush dirty buffers (untimed), so that no measurement pays for an earlier one's."""
    admin_exec("CHECKPOINT")


def run_tool(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        first = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[0]
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}): {first}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=300, help="source database size (300)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (3)")
    args = parser.parse_args(argv)
    if args.size_mb < 10 or args.repeats < 1:
        parser.error("--size-mb must be at least 10 and --repeats at least 1")

    # SIGTERM unwinds like Ctrl-C, so the databases are dropped and the dumps deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    problem = services_problem()
    if problem:
        print(problem)
        return 2

    dbs = Databases()
    with tempfile.TemporaryDirectory(prefix="runbook-bench-backup-") as tmp:
        try:
            return run(args, dbs, Path(tmp))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            dbs.drop_all()


def run(args: argparse.Namespace, dbs: Databases, tmp: Path) -> int:
    from jobs.backups import dump, restore, snapshot, vault
    from jobs.config import Target, normalize_url
    from jobs.pg.db import connect

    source = f"rb_bench_bk_{SESSION}_src"
    copy = f"rb_bench_bk_{SESSION}_copy"
    pg_dump, pg_restore = shutil.which("pg_dump") or "", shutil.which("pg_restore") or ""

    def target_for(dbname: str, **extra: Any) -> Target:
        return Target(
            name=f"bench-{dbname}",
            url=normalize_url(db_url(dbname)),
            alembic_ini=Path("alembic.ini"),
            backup_dir=tmp / "runbook",
            **extra,
        )

    version = subprocess.run([pg_dump, "--version"], capture_output=True, text=True).stdout
    print(
        f"bench: backup and restore of a ~{args.size_mb} MB database, {args.repeats} repeats, "
        f"interleaved; {version.strip()}; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    t0 = time.perf_counter()
    dbs.create(source)
    built = build_source(source, args.size_mb)
    print(
        f"source database {source}: pg_database_size {built['size']} bytes "
        f"({mb(built['size'])}), built in {time.perf_counter() - t0:.1f}s (not timed)"
    )
    for table, (rows, nbytes) in built["tables"].items():
        print(f"  {table:<10} {rows:>9} rows  {mb(nbytes):>7} with indexes")

    src_full = target_for(source)  # the default settings
    src = dataclasses.replace(src_full, verify_restore=False)
    src_nosum = dataclasses.replace(src, verify_restore_max_bytes=0)
    src_env = dump.libpq_env(src)

    # ---- backup -----------------------------------------------------------------------
    reference = tmp / "reference.dump"
    t0 = time.perf_counter()
    run_tool([pg_dump, "-Fc", "-f", str(reference)], src_env)  # also warms the page cache
    print(
        f"reference dump (warm-up, not timed): {reference.stat().st_size} bytes "
        f"({mb(reference.stat().st_size)}) in {time.perf_counter() - t0:.2f}s"
    )

    def raw_backup() -> float:
        path = tmp / "raw.dump"
        try:
            start = time.perf_counter()
            run_tool([pg_dump, "-Fc", "-f", str(path)], src_env)
            run_tool([pg_restore, "--list", str(path)], src_env)
            return time.perf_counter() - start
        finally:
            path.unlink(missing_ok=True)

    def runbook_backup(target: Target, checksummed: int | None = None) -> float:
        run_id = uuid.uuid4().hex[:12]
        start = time.perf_counter()
        info = vault.take_backup(target, run_id)
        elapsed = time.perf_counter() - start
        Path(info.path).unlink(missing_ok=True)
        got = sum(1 for s in info.tables.values() if s.get("checksum") is not None)
        if checksummed is not None and got != checksummed:
            raise RuntimeError(f"expected {checksummed} checksummed tables, take_backup made {got}")
        return elapsed

    n_tables = len(built["tables"])
    backup_sides: dict[str, Callable[[], float]] = {
        "raw": raw_backup,
        "runbook": lambda: runbook_backup(src_full, checksummed=n_tables),
        "runbook_list": lambda: runbook_backup(src, checksummed=n_tables),
        "runbook_nosum": lambda: runbook_backup(src_nosum, checksummed=0),
    }

    # Once, untimed: the runbook side's warm-up, and what the default's trial restore checks.
    checkpoint()
    run_id = uuid.uuid4().hex[:12]
    start = time.perf_counter()
    info = vault.take_backup(src_full, run_id)
    full_s = time.perf_counter() - start
    Path(info.path).unlink(missing_ok=True)
    checked = info.verification["restore"]
    print(
        f"runbook take_backup, default settings (warm-up, not timed): {full_s:.2f}s; "
        f"scratch restore checked {checked['tables']} tables, {checked['rows']} rows, "
        f"{checked['checksummed']} checksummed"
    )

    times: dict[str, list[float]] = {k: [] for k in backup_sides}
    order = list(backup_sides)
    print("backup (pg_dump -Fc + pg_restore --list  vs  vault.take_backup):")
    for i in range(args.repeats):
        rotated = order[i % len(order) :] + order[: i % len(order)]  # no side always first
        got: dict[str, float] = {}
        for side in rotated:
            checkpoint()
            got[side] = backup_sides[side]()
            times[side].append(got[side])
        print(
            f"  repeat {i + 1}: raw {got['raw']:.2f}s  runbook default {got['runbook']:.2f}s "
            f"({got['runbook'] / got['raw']:.2f}x)  no trial restore "
            f"{got['runbook_list']:.2f}s ({got['runbook_list'] / got['raw']:.2f}x)  nor "
            f"checksums {got['runbook_nosum']:.2f}s ({got['runbook_nosum'] / got['raw']:.2f}x)"
        )

    # ---- restore ----------------------------------------------------------------------
    expected = admin_exec(CHECK, source)[0]

    def fresh_copy() -> None:
        if copy in dbs.live:
            dbs.drop(copy)
        dbs.create(copy, template=source)
        admin_exec(MODIFY, copy)
        checkpoint()

    def check_copy(side: str) -> None:
        got = admin_exec(CHECK, copy)[0]
        if got != expected:
            raise RuntimeError(f"{side} restore left {got}, expected {expected}")

    copy_target = target_for(copy)

    def raw_restore() -> float:
        env = dict(src_env, PGDATABASE=copy)
        start = time.perf_counter()
        cmd = [pg_restore, "--clean", "--if-exists", "--single-transaction", "-d", copy]
        run_tool([*cmd, str(reference)], env)
        return time.perf_counter() - start

    def runbook_restore() -> float:
        start = time.perf_counter()
        restore.restore_database(copy_target, reference)
        return time.perf_counter() - start

    restore_sides: dict[str, Callable[[], float]] = {
        "raw": raw_restore,
        "runbook": runbook_restore,
    }
    rtimes: dict[str, list[float]] = {k: [] for k in restore_sides}
    print("restore (pg_restore --clean --if-exists --single-transaction  vs  restore_database):")
    for i in range(args.repeats):
        rotated = list(restore_sides) if i % 2 == 0 else list(reversed(restore_sides))
        got = {}
        for side in rotated:
            fresh_copy()
            got[side] = restore_sides[side]()
            check_copy(side)
            rtimes[side].append(got[side])
        print(
            f"  repeat {i + 1}: raw {got['raw']:.2f}s  runbook {got['runbook']:.2f}s "
            f"({got['runbook'] / got['raw']:.2f}x)"
        )

    # ---- where runbook's time goes (once, untimed for the ratios) ------------------------
    def timed(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def stats(max_bytes: int | None) -> None:
        with connect(src) as conn, conn.begin():
            snapshot.table_stats(conn, max_checksum_bytes=max_bytes)

    checkpoint()
    parts = {
        "table_stats with checksums, alone": timed(lambda: stats(src.verify_restore_max_bytes)),
        "table_stats row counts only, alone": timed(lambda: stats(0)),
        "pg_restore --list": timed(lambda: dump.list_entries(src, reference)),
        "sha256 of the dump": timed(lambda: dump.sha256_file(reference)),
    }
    # What coordinator.restore runs after restore_database, on the restored copy.
    with connect(copy_target) as conn, conn.begin():
        start = time.perf_counter()
        snapshot.table_stats(conn)
        parts["check_restored's table_stats after a restore"] = time.perf_counter() - start

    print(f"load average at the end: {os.getloadavg()[0]:.1f} (shared machine: quote medians)")
    return report(built["size"], times, rtimes, parts)


def report(
    size: int,
    times: dict[str, list[float]],
    rtimes: dict[str, list[float]],
    parts: dict[str, float],
) -> int:
    med = {k: statistics.median(v) for k, v in times.items()}
    rmed = {k: statistics.median(v) for k, v in rtimes.items()}

    def paired(side: list[float], raw: list[float]) -> str:
        """Median of the per-repeat ratios: each pair ran back to back, so it is less
        exposed to load drifting across the run than the ratio of the medians."""
        ratios = [r / a for r, a in zip(side, raw, strict=True)]
        return f"median of per-repeat ratios {statistics.median(ratios):.2f}x"

    b_ratio = med["runbook"] / med["raw"]
    list_ratio = med["runbook_list"] / med["raw"]
    nosum_ratio = med["runbook_nosum"] / med["raw"]
    r_ratio = rmed["runbook"] / rmed["raw"]
    print()
    print(f"source database: {size} bytes ({mb(size)})")
    print("backup:")
    print(f"  raw pg_dump + --list          median {med['raw']:.2f}s  [{fmt(times['raw'])}]")
    print(
        f"  runbook take_backup, default  median {med['runbook']:.2f}s  "
        f"[{fmt(times['runbook'])}]  {b_ratio:.2f}x ({paired(times['runbook'], times['raw'])})"
    )
    print("  not the default (verify_restore = false), not judged:")
    print(
        f"  runbook, no trial restore     median {med['runbook_list']:.2f}s  "
        f"[{fmt(times['runbook_list'])}]  {list_ratio:.2f}x "
        f"({paired(times['runbook_list'], times['raw'])})"
    )
    print(
        f"  runbook, nor table checksums  median {med['runbook_nosum']:.2f}s  "
        f"[{fmt(times['runbook_nosum'])}]  {nosum_ratio:.2f}x "
        f"({paired(times['runbook_nosum'], times['raw'])})"
    )
    print(
        f"  the trial restore costs       {med['runbook'] - med['runbook_list']:+.2f}s, "
        f"the per-table checksums {med['runbook_list'] - med['runbook_nosum']:+.2f}s"
    )
    print("restore:")
    print(f"  raw pg_restore --clean        median {rmed['raw']:.2f}s  [{fmt(rtimes['raw'])}]")
    print(
        f"  runbook restore_database      median {rmed['runbook']:.2f}s  "
        f"[{fmt(rtimes['runbook'])}]  {r_ratio:.2f}x "
        f"({paired(rtimes['runbook'], rtimes['raw'])})"
    )
    print("parts of runbook's path, timed alone once (not in the ratios):")
    for name, seconds in parts.items():
        print(f"  {name:<52} {seconds:6.2f}s")
    ok_b, ok_r = b_ratio <= TARGET_BACKUP, r_ratio <= TARGET_RESTORE
    print()
    print(
        f"target backup  <= {TARGET_BACKUP:g}x raw, default settings: "
        f"{'MET' if ok_b else 'NOT MET'} (ratio of medians {b_ratio:.2f}x)"
    )
    print(
        f"target restore <= {TARGET_RESTORE:g}x raw: {'MET' if ok_r else 'NOT MET'} "
        f"(ratio of medians {r_ratio:.2f}x)"
    )
    return 0 if ok_b and ok_r else 1


if __name__ == "__main__":
    sys.exit(main())
