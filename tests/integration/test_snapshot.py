"""Dump and pre-run stats from one snapshot, and the proof by restoring into a scratch database."""

from __future__ import annotations

import copy
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from jobs.backups import snapshot
from jobs.config import Target, normalize_url
from jobs.errors import BackupError, RestoreMismatch
from jobs.pg.db import connect
from tests.integration.conftest import SESSION, Databases, admin_exec, db_url

pytestmark = pytest.mark.integration

SEED = """
CREATE TABLE accounts (id int PRIMARY KEY, name text, born date, seen timestamptz,
    balance numeric(12, 2), ratio float8, photo bytea, tags text[], extra jsonb, took interval);
INSERT INTO accounts
SELECT i, 'name ' || i || ' ☃', date '2020-01-01' + i, timestamptz '2024-03-01 12:00+09' + i * interval '1 hour',
       i * 1.25, i / 7.0, decode(md5(i::text), 'hex'), ARRAY['a', i::text], jsonb_build_object('i', i),
       i * interval '1 minute'
FROM generate_series(1, 500) i;
INSERT INTO accounts (id) VALUES (0);
CREATE TABLE empty_one (id int);
CREATE TABLE events (id int, at date NOT NULL) PARTITION BY RANGE (at);
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO events SELECT i, date '2024-06-01' + i FROM generate_series(1, 300) i;
CREATE SCHEMA "Other";
CREATE TABLE "Other"."Weird Name" ("Id" int, "x y" text);
INSERT INTO "Other"."Weird Name" VALUES (1, 'it''s'), (2, NULL);
CREATE SCHEMA runbook;
CREATE TABLE runbook.runs (id text);
INSERT INTO runbook.runs VALUES ('ledger rows are not backed up');
"""


def target_for(dbname: str, tmp_path: Path, user: str = "postgres", **extra: Any) -> Target:
    return Target(
        name="snap",
        url=normalize_url(db_url(dbname, user)),
        alembic_ini=tmp_path / "alembic.ini",
        backup_dir=tmp_path,
        **extra,
    )


def execute(dbname: str, sql: str, user: str = "postgres") -> None:
    conn = psycopg2.connect(db_url(dbname, user))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def scalar(dbname: str, sql: str) -> Any:
    conn = psycopg2.connect(db_url(dbname))
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            assert row is not None
            return row[0]
    finally:
        conn.close()


def existing(names: list[str]) -> list[str]:
    conn = psycopg2.connect(db_url("postgres"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (names,))
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


@pytest.fixture
def scratch_names(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the scratch databases created during the test; all must be gone at its end."""
    names: list[str] = []
    real = snapshot.scratch_db_name

    def recording(*args: Any) -> str:
        names.append(real(*args))
        return names[-1]

    monkeypatch.setattr(snapshot, "scratch_db_name", recording)
    yield names
    assert existing(names) == [], "a scratch database was left behind"


@pytest.fixture
def source(databases: Databases) -> str:
    name = databases.create()
    execute(name, SEED)
    # Settings a scratch database does not inherit must not change the checksums.
    execute(name, f"ALTER DATABASE {name} SET timezone = 'Asia/Tokyo'")
    execute(name, f"ALTER DATABASE {name} SET datestyle = 'SQL, DMY'")
    execute(name, f"ALTER DATABASE {name} SET extra_float_digits = -3")
    return name


def dump_file(tmp_path: Path) -> Path:
    path = tmp_path / f"{uuid.uuid4().hex[:8]}.dump"
    path.touch(mode=0o600)
    return path


def test_stats_equal_between_source_and_restored_copy(
    source: str, databases: Databases, tmp_path: Path, scratch_names: list[str]
) -> None:
    target = target_for(source, tmp_path)
    with connect(target) as conn:
        before = snapshot.table_stats(conn)
        conn.rollback()

    assert set(before) == {
        "public.accounts",
        "public.empty_one",
        "public.events",
        "public.events_2024",
        "public.events_2025",
        "Other.Weird Name",
    }
    assert before["public.accounts"]["rows"] == 501
    assert before["public.events"]["rows"] == 0  # a partitioned parent holds no rows itself
    assert before["public.events_2024"]["rows"] + before["public.events_2025"]["rows"] == 300
    assert before["public.empty_one"] == {"rows": 0, "checksum": "h64:0"}

    path = dump_file(tmp_path)
    dumped = snapshot.dump_with_stats(target, path, max_checksum_bytes=None)
    assert dumped["tables"] == before
    assert dumped["snapshot"]
    assert path.stat().st_mode & 0o777 == 0o600

    summary = snapshot.verify_by_restore(target, path, dumped["tables"])
    assert summary == {"tables": 6, "rows": 803, "checksummed": 6, "scratch_restore": "ok"}
    assert len(scratch_names) == 1

    # The same stats from a plain pg_restore into a database of different settings.
    copy_db = databases.create()
    execute(copy_db, f"ALTER DATABASE {copy_db} SET timezone = 'America/Los_Angeles'")
    subprocess.run(
        ["pg_restore", "--no-owner", "--exit-on-error", "-d", db_url(copy_db), str(path)],
        check=True,
        capture_output=True,
    )
    with connect(target_for(copy_db, tmp_path)) as conn:
        assert snapshot.table_stats(conn) == before
    assert scalar(copy_db, "SELECT to_regclass('runbook.runs') IS NULL")  # ledger excluded


def test_table_stats_leaves_the_session_as_it_was(source: str, tmp_path: Path) -> None:
    target = target_for(source, tmp_path)
    with connect(target) as conn:
        conn.exec_driver_sql("SET LOCAL timezone = 'Europe/Paris'")
        snapshot.table_stats(conn)
        assert conn.exec_driver_sql("SHOW timezone").scalar() == "Europe/Paris"
        conn.rollback()
    with connect(target, autocommit=True) as conn:
        conn.exec_driver_sql("SET search_path = public")
        stats = snapshot.table_stats(conn)
        assert conn.exec_driver_sql("SHOW search_path").scalar() == "public"
        assert conn.exec_driver_sql("SHOW timezone").scalar() == "Asia/Tokyo"
    assert stats["public.accounts"]["rows"] == 501


class Writer(threading.Thread):
    """Keeps inserting rows into public.hot, one committed row at a time."""

    def __init__(self, dbname: str) -> None:
        super().__init__(daemon=True)
        self.dbname = dbname
        self.inserted = 0
        self.stop = threading.Event()

    def run(self) -> None:
        conn = psycopg2.connect(db_url(self.dbname))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not self.stop.is_set():
                    cur.execute("INSERT INTO hot (v) VALUES (md5(random()::text))")
                    self.inserted += 1
        finally:
            conn.close()


def test_dump_taken_while_rows_are_inserted_still_verifies(
    source: str, tmp_path: Path, scratch_names: list[str]
) -> None:
    execute(
        source,
        "CREATE TABLE hot (id bigserial PRIMARY KEY, v text);"
        "CREATE TABLE big AS SELECT i, md5(i::text) AS v FROM generate_series(1, 100000) i;",
    )
    target = target_for(source, tmp_path)
    writer = Writer(source)
    writer.start()
    try:
        while writer.inserted < 50:
            time.sleep(0.01)
        during_start = writer.inserted
        path = dump_file(tmp_path)
        dumped = snapshot.dump_with_stats(target, path, max_checksum_bytes=None)
        during_end = writer.inserted
        time.sleep(0.1)
    finally:
        writer.stop.set()
        writer.join(10)

    recorded = dumped["tables"]["public.hot"]["rows"]
    assert during_end > during_start, "no row was inserted while the dump ran"
    assert during_start <= recorded <= during_end
    assert scalar(source, "SELECT count(*) FROM hot") > recorded  # writes went on after it
    summary = snapshot.verify_by_restore(target, path, dumped["tables"])  # the dump holds it
    assert summary["scratch_restore"] == "ok"


def test_rows_committed_after_the_snapshot_are_in_neither_dump_nor_stats(
    source: str, tmp_path: Path, scratch_names: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = target_for(source, tmp_path)
    real_popen = subprocess.Popen

    def popen_after_writes(cmd: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(cmd[0]).name == "pg_dump":
            # The snapshot is exported; pg_dump and the stats have not read anything yet.
            execute(source, "INSERT INTO accounts (id) SELECT generate_series(1000, 1099)")
            execute(source, "UPDATE accounts SET name = 'changed' WHERE id = 1")
        return real_popen(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen_after_writes)
    path = dump_file(tmp_path)
    dumped = snapshot.dump_with_stats(target, path, max_checksum_bytes=None)
    monkeypatch.undo()

    assert dumped["tables"]["public.accounts"]["rows"] == 501
    assert scalar(source, "SELECT count(*) FROM accounts") == 601
    snapshot.verify_by_restore(target, path, dumped["tables"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t: t["public.accounts"].update(rows=500),
            "table public.accounts has 501 rows, expected 500",
        ),
        (
            lambda t: t["Other.Weird Name"].update(checksum="h64:12345"),
            "table Other.Weird Name has 2 rows as expected but different content",
        ),
        (
            lambda t: t.pop("public.empty_one"),
            "table public.empty_one was not there before the run",
        ),
        (
            lambda t: t.update({"public.gone": {"rows": 1, "checksum": None}}),
            "table public.gone is missing",
        ),
    ],
)
def test_a_dump_that_does_not_match_the_expected_stats_is_refused(
    source: str, tmp_path: Path, scratch_names: list[str], change: Any, message: str
) -> None:
    target = target_for(source, tmp_path)
    path = dump_file(tmp_path)
    dumped = snapshot.dump_with_stats(target, path, max_checksum_bytes=None)
    expected = copy.deepcopy(dumped["tables"])
    change(expected)
    with pytest.raises(RestoreMismatch) as err:
        snapshot.verify_by_restore(target, path, expected)
    text = str(err.value)
    assert message in text
    assert text.startswith(f"backup {path.name} does not restore to the pre-run state")
    assert "\n" not in text
    assert len(scratch_names) == 1


def test_large_tables_are_counted_but_not_checksummed(
    source: str, tmp_path: Path, scratch_names: list[str]
) -> None:
    target = target_for(source, tmp_path)
    path = dump_file(tmp_path)
    limit = 64 * 1024  # accounts (with its index and toast) is above, the others below
    dumped = snapshot.dump_with_stats(target, path, max_checksum_bytes=limit)
    tables = dumped["tables"]
    assert tables["public.accounts"] == {"rows": 501, "checksum": None}
    assert tables["Other.Weird Name"]["checksum"]
    summary = snapshot.verify_by_restore(target, path, tables)
    assert summary["checksummed"] == 5
    assert summary["rows"] == 803
    # A row count mismatch is still caught on an unhashed table.
    tables["public.accounts"]["rows"] = 1
    with pytest.raises(RestoreMismatch, match="public.accounts has 501 rows"):
        snapshot.verify_by_restore(target, path, tables)


def test_a_corrupt_dump_fails_verification_and_drops_the_scratch_database(
    source: str, tmp_path: Path, scratch_names: list[str]
) -> None:
    target = target_for(source, tmp_path)
    path = dump_file(tmp_path)
    dumped = snapshot.dump_with_stats(target, path, max_checksum_bytes=None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        BackupError,
        match=rf"^backup {path.name} does not restore into a scratch database \(pg_restore exit 1\): pg_restore: error: ",
    ):
        snapshot.verify_by_restore(target, path, dumped["tables"])
    assert len(scratch_names) == 1


def test_pg_dump_failure_is_one_line_and_removes_the_file(source: str, tmp_path: Path) -> None:
    fake = tmp_path / "pg_dump"
    fake.write_text(
        "#!/bin/sh\necho 'pg_dump: error: query failed: boom' >&2\necho more >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    target = target_for(source, tmp_path, pg_dump=str(fake))
    path = dump_file(tmp_path)
    with pytest.raises(BackupError) as err:
        snapshot.dump_with_stats(target, path, max_checksum_bytes=None)
    assert str(err.value) == "pg_dump failed (exit 1): pg_dump: error: query failed: boom"
    assert not path.exists()


@pytest.fixture
def role(services: None) -> Iterator[str]:
    """A login role of the test's own; dropped with every database it owns."""
    name = f"rb_{SESSION}_{uuid.uuid4().hex[:6]}"
    admin_exec(f"CREATE ROLE {name} LOGIN")
    yield name
    conn = psycopg2.connect(db_url("postgres"))
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT datname FROM pg_database WHERE datdba = (SELECT oid FROM pg_roles WHERE rolname = %s)",
                (name,),
            )
            owned = [r[0] for r in cur.fetchall()]
    finally:
        conn.close()
    for db in owned:
        admin_exec(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    admin_exec(f"DROP ROLE IF EXISTS {name}")


def test_a_role_without_createdb_gets_one_line(
    role: str, databases: Databases, tmp_path: Path, scratch_names: list[str]
) -> None:
    db = databases.create(owner=role)
    execute(db, "CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2);", user=role)
    target = target_for(db, tmp_path, user=role)
    path = dump_file(tmp_path)
    dumped = snapshot.dump_with_stats(target, path, max_checksum_bytes=None)
    assert dumped["tables"]["public.t"]["rows"] == 2
    with pytest.raises(BackupError) as err:
        snapshot.verify_by_restore(target, path, dumped["tables"])
    assert str(err.value) == (
        "cannot create a scratch database on 127.0.0.1:5432 to verify the backup "
        "(permission denied); grant CREATEDB to the target's role or set verify_restore = false"
    )


def test_a_non_superuser_with_createdb_verifies(
    role: str, databases: Databases, tmp_path: Path, scratch_names: list[str]
) -> None:
    admin_exec(f"ALTER ROLE {role} CREATEDB")
    db = databases.create(owner=role)
    execute(
        db,
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 10) i;"
        "CREATE SCHEMA app; CREATE TABLE app.u (id int REFERENCES public.t); INSERT INTO app.u VALUES (3);",
        user=role,
    )
    target = target_for(db, tmp_path, user=role)
    path = dump_file(tmp_path)
    dumped = snapshot.dump_with_stats(target, path, max_checksum_bytes=None)
    summary = snapshot.verify_by_restore(target, path, dumped)  # the whole result is accepted
    assert summary == {"tables": 2, "rows": 11, "checksummed": 2, "scratch_restore": "ok"}


def test_a_table_locked_by_another_session_fails_fast_in_one_line(
    source: str, tmp_path: Path
) -> None:
    target = target_for(source, tmp_path, lock_timeout_ms=300)
    holder = psycopg2.connect(db_url(source))
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        path = dump_file(tmp_path)
        started = time.monotonic()
        with pytest.raises(BackupError) as err:
            snapshot.dump_with_stats(target, path, max_checksum_bytes=None)
        assert time.monotonic() - started < 5
    finally:
        holder.rollback()
        holder.close()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot read the tables of 127.0.0.1:5432/")
    assert message.endswith(
        "canceling statement due to lock timeout; another session holds a lock on that table; "
        "retry when it is released"
    )
    assert not path.exists()
