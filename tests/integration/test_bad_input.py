"""Bad input: one line on stderr, exit 2, nothing enqueued and nothing changed.

Table-driven: each case writes its own runbook.toml for one scratch database sitting at
revision a2 of a three-revision project (plus a few tables to backfill: ``items``, whose
``code`` is not unique, ``nokey`` without any usable key, ``empty``), runs the real CLI, and
compares the database (schema, alembic_version, the ledger or its absence) before and after.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as redis_lib
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.engine import make_url

from jobs import api
from jobs.config import load_settings
from jobs.ledger import runs, schema
from jobs.pg import db
from jobs.states import RUNNING, SUCCEEDED
from tests.integration.conftest import (
    REDIS_URL,
    Config,
    Databases,
    PrivatePostgres,
    Worker,
    db_url,
    missing,
    query,
    runbook_cli,
)
from tests.projects import Rev, write_project

pytestmark = pytest.mark.integration

REVS = [
    Rev("a1", "op.execute('CREATE TABLE t1 (id int PRIMARY KEY)')", "op.execute('DROP TABLE t1')"),
    Rev("a2", "op.execute('CREATE TABLE t2 (id int PRIMARY KEY)')", "op.execute('DROP TABLE t2')"),
    Rev("a3", "op.execute('CREATE TABLE t3 (id int PRIMARY KEY)')", "op.execute('DROP TABLE t3')"),
]


def toml(targets: dict[str, dict[str, object]]) -> str:
    lines = []
    for name, options in targets.items():
        lines.append(f"[targets.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def fake_pg_dump(tmp: Path, script: str) -> str:
    path = tmp / "fake_pg_dump"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return str(path)


# Tables every case's database has besides t1 and t2, for the backfill cases.
TABLES = """
CREATE TABLE items (id int PRIMARY KEY, code int NOT NULL, v int);
INSERT INTO items SELECT g, g % 5, 0 FROM generate_series(1, 50) g;
CREATE TABLE nokey (v int, w text);
INSERT INTO nokey VALUES (1, 'a'), (1, 'b');
CREATE TABLE empty (id int PRIMARY KEY, v int);
"""
# A password a case's URL holds; it must never be echoed.
WRONG_PASSWORD = "Wr0ng-" + secrets.token_hex(8)
# setpriv runs the CLI as root without the capabilities that let root read any file.
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", "--"]


@dataclass
class Case:
    name: str
    args: list[str]
    expect: str
    options: Callable[[Path], dict[str, object]] = lambda tmp: {}
    raw_config: Callable[[Path], str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Prepares the state the case needs (given the config file); what to put in its args.
    setup: Callable[[Path], dict[str, str]] | None = None
    # Options for a target on the private, password-checking Postgres.
    private_pg: Callable[[PrivatePostgres], dict[str, object]] | None = None
    # Run the CLI without root's power to read any file (chmod 000 binds root too).
    no_dac: bool = False
    marks: tuple[pytest.MarkDecorator, ...] = ()


def finished_run(config: Path) -> dict[str, str]:
    """A run that ended (succeeded), recorded as a worker would have."""
    target = load_settings(config).target("x")
    with db.connect(target) as conn:
        schema.ensure(conn)
        run_id = runs.admit(
            conn,
            target="x",
            kind="apply",
            from_revision="a1",
            to_revision="a2",
            options={"backup": False},
        )
        run = runs.get_run(conn, run_id)
        runs.transition(conn, run, RUNNING)
        runs.update_run(conn, run, current_revision="a2")
        runs.transition(conn, run, SUCCEEDED)
    return {"run": run_id}


def finished_backfill(config: Path) -> dict[str, str]:
    """A backfill that ended (succeeded at once: its table is empty)."""
    settings = load_settings(config)
    backfill_id = api.enqueue_backfill("empty", "v = 1", target="x", settings=settings)
    assert api.backfill_status(backfill_id, "x", settings=settings)["state"] == "succeeded"
    return {"backfill": backfill_id}


def wrong_password(pg: PrivatePostgres) -> dict[str, object]:
    suffix = secrets.token_hex(4)
    role, dbname = f"bad_{suffix}", f"baddb_{suffix}"
    pg.admin(f"CREATE ROLE {role} LOGIN PASSWORD 'right-{secrets.token_hex(8)}'")
    pg.admin(f"CREATE DATABASE {dbname} OWNER {role}")
    return {"url": f"postgresql://{role}:{WRONG_PASSWORD}@127.0.0.1:{pg.port}/{dbname}"}


def _unreadable(tmp: Path) -> str:
    path = tmp / "runbook-000.toml"
    path.write_text(toml({"x": {"url": "postgresql://u@127.0.0.1/db"}}))
    path.chmod(0o000)
    return str(path)


def _in_closed_dir(tmp: Path) -> str:
    closed = tmp / "closed"
    closed.mkdir()
    (closed / "runbook.toml").write_text(toml({"x": {"url": "postgresql://u@127.0.0.1/db"}}))
    closed.chmod(0o000)
    return str(closed / "runbook.toml")


def _not_utf8(tmp: Path) -> str:
    path = tmp / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n[targets.x]\n")
    return str(path)


CASES = [
    Case("unknown target", ["apply", "--target", "nope"], "unknown target 'nope'"),
    Case("unknown revision", ["apply", "--to", "zzz"], "unknown revision 'zzz'"),
    Case("--to behind current", ["apply", "--to", "a1"], "behind the current revision a2"),
    Case(
        "malformed URL",
        ["apply"],
        "url is malformed",
        options=lambda tmp: {"url": "postgresql://u@127.0.0.1:notaport/db"},
    ),
    Case(
        "URL of another database kind",
        ["apply"],
        "not a PostgreSQL URL",
        options=lambda tmp: {"url": "mysql://root@127.0.0.1/db"},
    ),
    Case(
        "database unreachable",
        ["apply"],
        "is unreachable",
        options=lambda tmp: {"url": "postgresql://postgres@127.0.0.1:1/db"},
    ),
    Case(
        "database missing",
        ["apply"],
        "does not exist",
        options=lambda tmp: {"url": db_url("rb_no_such_database")},
    ),
    Case(
        "missing alembic.ini",
        ["apply"],
        "alembic.ini not found",
        options=lambda tmp: {"alembic_ini": str(tmp / "nowhere" / "alembic.ini")},
    ),
    Case(
        "missing script directory",
        ["apply"],
        "script directory",
        options=lambda tmp: {
            "alembic_ini": str(_ini(tmp, "[alembic]\nscript_location = /nonexistent/migrations\n"))
        },
    ),
    Case(
        "multiple heads",
        ["apply"],
        "has 2 heads",
        options=lambda tmp: {
            "alembic_ini": str(write_project(tmp / "heads", [*REVS, Rev("b1", "pass", down="a2")]))
        },
    ),
    Case(
        "pg_dump missing",
        ["apply"],
        "pg_dump not found",
        options=lambda tmp: {"pg_dump": "/nonexistent/pg_dump"},
    ),
    Case(
        "pg_dump failing",
        ["apply"],
        "does not run (exit 3)",
        options=lambda tmp: {"pg_dump": fake_pg_dump(tmp, "exit 3")},
    ),
    Case(
        "pg_dump older than the server",
        ["apply"],
        "cannot dump a PostgreSQL",
        options=lambda tmp: {"pg_dump": fake_pg_dump(tmp, "echo 'pg_dump (PostgreSQL) 9.6.24'")},
    ),
    Case(
        "backup dir not writable",
        ["apply"],
        "is not writable",
        options=lambda tmp: {"backup_dir": str(_file(tmp) / "sub")},
    ),
    Case("invalid TOML", ["apply"], "invalid TOML", raw_config=lambda tmp: "[targets.x\nurl = 1\n"),
    Case(
        "unknown option",
        ["apply"],
        "unknown option 'lock_timout'",
        options=lambda tmp: {"lock_timout": "2s"},
    ),
    Case(
        "bad lock_timeout",
        ["apply"],
        "lock_timeout: expected a duration",
        options=lambda tmp: {"lock_timeout": "fast"},
    ),
    Case(
        "url_env not set",
        ["apply"],
        "environment variable RB_UNSET_URL (url_env) is not set",
        raw_config=lambda tmp: toml({"x": {"url_env": "RB_UNSET_URL"}}),
    ),
    Case(
        "config file missing",
        ["apply"],
        "does not exist (RUNBOOK_CONFIG)",
        env={"RUNBOOK_CONFIG": "/nonexistent/runbook.toml"},
    ),
    Case(
        "broker unreachable",
        ["apply"],
        "broker at redis://127.0.0.1:1/0 is unreachable",
        env={"CELERY_BROKER_URL": "redis://127.0.0.1:1/0"},
    ),
    Case(
        "wrong password",
        ["apply"],
        "(password authentication failed); check the credentials in the target's URL",
        private_pg=wrong_password,
    ),
    Case(
        "config is a directory",
        ["apply"],
        "cannot be read (Is a directory)",
        env={"RUNBOOK_CONFIG": "{tmp}"},
    ),
    Case(
        "config unreadable (chmod 000)",
        ["apply"],
        "cannot be read (Permission denied)",
        setup=lambda config: {"config": _unreadable(config.parent)},
        env={"RUNBOOK_CONFIG": "{config}"},
        no_dac=True,
    ),
    Case(
        "config in a directory that cannot be searched",
        ["apply"],
        "Permission denied",
        setup=lambda config: {"config": _in_closed_dir(config.parent)},
        env={"RUNBOOK_CONFIG": "{config}"},
        no_dac=True,
    ),
    Case(
        "config not UTF-8",
        ["apply"],
        "UTF-8",
        setup=lambda config: {"config": _not_utf8(config.parent)},
        env={"RUNBOOK_CONFIG": "{config}"},
    ),
    Case(
        "unknown backup id",
        ["restore", "--backup", "0123456789abcdef"],
        "unknown backup '0123456789abcdef' for target 'x'; `runbook backups --target x` lists them",
    ),
    Case(
        "resume a finished run",
        ["resume", "{run}"],
        "already ended (succeeded); nothing to resume",
        setup=finished_run,
    ),
    Case(
        "cancel a finished run",
        ["cancel", "{run}"],
        "already ended (succeeded); nothing to cancel",
        setup=finished_run,
    ),
    Case(
        "resume a finished backfill",
        ["resume", "{backfill}"],
        "already ended (succeeded); nothing to resume",
        setup=finished_backfill,
    ),
    Case(
        "cancel a finished backfill",
        ["cancel", "{backfill}"],
        "already ended (succeeded); nothing to cancel",
        setup=finished_backfill,
    ),
    Case(
        "pause a finished backfill",
        ["pause", "{backfill}"],
        "already ended (succeeded); nothing to pause",
        setup=finished_backfill,
    ),
    Case(
        "unknown run (status)",
        ["status", "0123456789abcdef"],
        "unknown run or backfill '0123456789abcdef'",
    ),
    Case(
        "unknown run (resume)",
        ["resume", "0123456789abcdef"],
        "unknown run or backfill '0123456789abcdef'",
    ),
    Case(
        "unknown run (cancel)",
        ["cancel", "0123456789abcdef"],
        "unknown run or backfill '0123456789abcdef'",
    ),
    Case(
        "unknown backfill (pause)",
        ["pause", "0123456789abcdef"],
        "unknown run or backfill '0123456789abcdef'",
    ),
    Case(
        "zero batch size",
        ["backfill", "--table", "t1", "--set", "v = 1", "--batch-size", "0"],
        "--batch-size must be a positive number of rows, got 0",
    ),
    Case(
        "backfill SQL with a second statement",
        ["backfill", "--table", "t1", "--set", "v = 1; DROP TABLE t1"],
        "--set",
    ),
    Case(
        "backfill key column missing",
        ["backfill", "--table", "t1", "--set", "v = 1", "--key", "v"],
        "table public.t1 has no column 'v'; choose --key id",
    ),
    Case(
        "backfill key that is not unique",
        ["backfill", "--table", "items", "--set", "v = 1", "--key", "code"],
        "column code of table public.items is not unique (no unique index on it alone); "
        "choose --key id",
    ),
    Case(
        "backfill table without a usable key",
        ["backfill", "--table", "nokey", "--set", "v = 1"],
        "table nokey has no usable key (a unique NOT NULL column)",
    ),
    Case(
        "backfill table that does not exist",
        ["backfill", "--table", "nope", "--set", "v = 1"],
        'table "nope" does not exist; name it as table or schema.table',
    ),
    Case(
        "negative batch size",
        ["backfill", "--table", "items", "--set", "v = 1", "--batch-size", "-5"],
        "--batch-size must be a positive number of rows, got -5",
    ),
    Case(
        "backfill replica lag that is not a duration",
        ["backfill", "--table", "items", "--set", "v = 1", "--max-replica-lag", "soon"],
        "--max-replica-lag: expected a duration such as 2s or 500ms, got 'soon'",
    ),
    Case(
        "backfill WAL rate that is not a rate",
        ["backfill", "--table", "items", "--set", "v = 1", "--max-wal-rate", "fast", "--dry-run"],
        "--max-wal-rate: expected a rate such as 20 (MB/s) or 512kB/s, got 'fast'",
    ),
    Case(
        "table name with a semicolon",
        ["backfill", "--table", "x;drop", "--set", "v = 1"],
        "--table 'x;drop' is not a plain name",
    ),
    Case(
        "table name with a quote",
        ["backfill", "--table", 'it"ems', "--set", "v = 1"],
        "--table 'it\"ems' is not a plain name",
    ),
    Case(
        "key with a quote",
        ["backfill", "--table", "items", "--set", "v = 1", "--key", 'a"b'],
        "table public.items has no column 'a\"b'; choose --key id",
    ),
    Case(
        "key with a semicolon",
        ["backfill", "--table", "items", "--set", "v = 1", "--key", "id;drop table items"],
        "has no column 'id;drop table items'",
    ),
    Case(
        "backfill --where with a second statement",
        ["backfill", "--table", "items", "--set", "v = 1", "--where", "v = 0; DROP TABLE items"],
        "--where contains ';': give one expression, not statements",
    ),
    Case(
        "zero slices",
        ["backfill", "--table", "t1", "--set", "v = 1", "--slices", "0"],
        "--slices must be between 1 and 64, got 0",
    ),
    Case(
        "unknown on-error policy",
        ["backfill", "--table", "t1", "--set", "v = 1", "--on-error", "ignore"],
        "--on-error",
    ),
    Case(
        "dry run of SQL with a comment trick",
        [
            "backfill",
            "--table",
            "t1",
            "--set",
            "v = 1 -- x",
            "--where",
            "1=1) OR (1=1",
            "--dry-run",
        ],
        "--set contains an SQL comment",
    ),
]


def _ini(tmp: Path, text: str) -> Path:
    path = tmp / "bad" / "alembic.ini"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _file(tmp: Path) -> Path:
    path = tmp / "a-file"
    path.write_text("not a directory")
    return path


def snapshot(dbname: str, pg: PrivatePostgres | None = None) -> str:
    """The whole database, schema and rows, the ledger's included (alembic_version too); on
    the private server ``pg`` when given."""
    where = ["-d", db_url(dbname)]
    if pg is not None:
        where = ["-h", str(pg.root), "-p", str(pg.port), "-U", "postgres", "-d", dbname]
    out = subprocess.run(["pg_dump", *where], capture_output=True, text=True, check=True).stdout
    # pg_dump 15.14+ brackets its output with \\restrict lines holding a random key.
    skip = ("--", "\\restrict", "\\unrestrict")
    return "\n".join(line for line in out.splitlines() if not line.startswith(skip))


def upgrade(ini: Path, dbname: str, rev: str, user: str = "postgres") -> None:
    cfg = AlembicConfig(str(ini))
    cfg.set_main_option(
        "sqlalchemy.url",
        db_url(dbname, user=user).replace("postgresql://", "postgresql+psycopg2://"),
    )
    command.upgrade(cfg, rev)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    case: Case, databases: Databases, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    prefix: list[str] = []
    if case.no_dac and os.geteuid() == 0:
        if not shutil.which("setpriv"):
            missing("root reads any file; setpriv (util-linux) is needed to drop that power")
        prefix = NO_DAC
    dbname = databases.create()
    ini = write_project(tmp_path / "project", REVS)
    upgrade(ini, dbname, "a2")
    query(dbname, TABLES)
    options: dict[str, object] = {
        "url": db_url(dbname),
        "alembic_ini": str(ini),
        "backup_dir": str(tmp_path / "backups"),
    }
    options.update(case.options(tmp_path))
    named: list[tuple[str, PrivatePostgres | None]] = [(dbname, None)]
    if case.private_pg:
        pg = request.getfixturevalue("private_pg")
        options.update(case.private_pg(pg))
        named.append((make_url(str(options["url"])).database or "", pg))  # the bad URL's own
    config = tmp_path / "runbook.toml"
    config.write_text(case.raw_config(tmp_path) if case.raw_config else toml({"x": options}))
    subs = {"tmp": str(tmp_path), **(case.setup(config) if case.setup else {})}
    before = [snapshot(name, pg) for name, pg in named]
    # A queue of the case's own, which no worker reads: whatever the CLI sent stays in it.
    queue = f"bad-input-{uuid.uuid4().hex[:8]}"
    env = {
        "RUNBOOK_CONFIG": str(config),
        "RUNBOOK_QUEUE": queue,
        **{k: v.format(**subs) for k, v in case.env.items()},
    }
    args = [a.format(**subs) for a in case.args]

    result = runbook_cli(*args, env=env, timeout=60, prefix=prefix)

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("runbook: error: "), (
        result.stderr
    )
    assert case.expect in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert WRONG_PASSWORD not in result.stderr
    assert result.stdout == ""
    # The ledger too (or its absence): nothing was recorded, in any database named.
    assert [snapshot(name, pg) for name, pg in named] == before
    assert redis_lib.Redis.from_url(REDIS_URL).llen(queue) == 0, "a message was sent"


def test_worker_meeting_bad_configuration_fails_the_run_with_the_same_line(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    dbname = databases.create()
    ini = write_project(tmp_path / "project", REVS)
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), alembic_ini=str(ini), backup_dir=str(tmp_path / "b"))
    # Enqueue onto a queue no worker reads, then break the configuration, then resume the
    # run onto the live worker: it meets the problem the CLI would have refused.
    settings = load_settings()
    parked = dataclasses.replace(settings, queue=f"{settings.queue}-parked")
    run_id = api.enqueue(name, settings=parked)
    assert run_id
    config.add(
        name,
        url=db_url(dbname),
        alembic_ini=str(tmp_path / "gone" / "alembic.ini"),
        backup_dir=str(tmp_path / "b"),
    )
    cli = runbook_cli("apply", "--target", name)
    assert cli.returncode == 2
    assert runbook_cli("resume", run_id, "--target", name).returncode == 0
    run = api.wait(run_id, name, timeout_s=60)
    assert run["state"] == "failed"
    assert f"runbook: error: {run['error']}\n" == cli.stderr
    assert run["steps"] == []
    redis_lib.Redis.from_url(REDIS_URL).delete(parked.queue)


def test_a_malformed_entry_in_the_workers_configuration_stops_only_its_own_target(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    dbname = databases.create()
    ini = write_project(tmp_path / "project", REVS)
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), alembic_ini=str(ini), backup_dir=str(tmp_path / "b"))
    # The shared configuration, which the running worker re-reads, gains a malformed entry.
    broken = f"broken_{dbname}"
    config.add(broken, url="postgresql://u@127.0.0.1:notaport/db")
    try:
        result = runbook_cli("apply", "--target", name, "--wait")
        assert result.returncode == 0, result.stderr
        assert query(dbname, "SELECT version_num FROM alembic_version") == [("a3",)]
        refused = runbook_cli("apply", "--target", broken)
        assert refused.returncode == 2
        assert refused.stderr == (
            f"runbook: error: target {broken!r}: url is malformed "
            "(expected postgresql://user:password@host:port/dbname)\n"
        )
    finally:
        del config.targets[broken]
        config.write()


def test_cancel_an_enqueued_run_frees_the_target(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    dbname = databases.create()
    ini = write_project(tmp_path / "project", REVS)
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), alembic_ini=str(ini), backup=False)
    settings = load_settings()
    lost = api.enqueue(name, settings=dataclasses.replace(settings, queue="nobody-reads-this"))
    assert lost
    busy = runbook_cli("apply", "--target", name)
    assert busy.returncode == 2 and f"run {lost} is enqueued" in busy.stderr
    done = runbook_cli("cancel", lost)
    assert done.returncode == 0 and "cancelled" in done.stderr
    again = runbook_cli("cancel", lost)
    assert again.returncode == 2 and "already ended (cancelled)" in again.stderr
    run_id = api.enqueue(name)
    assert run_id and api.wait(run_id, name, timeout_s=60)["state"] == "succeeded"
    assert api.status(lost, name)["state"] == "cancelled"
    redis_lib.Redis.from_url(REDIS_URL).delete("nobody-reads-this")


@pytest.mark.parametrize("owns_schema", [True, False], ids=["no CREATEDB", "no privilege"])
def test_a_role_without_the_rights_it_needs_is_refused_up_front(
    owns_schema: bool, databases: Databases, tmp_path: Path
) -> None:
    from tests.integration.conftest import admin_exec

    role = f"rb_weak_{tmp_path.name[-6:].replace('-', '_')}"
    admin_exec(f"DROP ROLE IF EXISTS {role}")
    admin_exec(f"CREATE ROLE {role} LOGIN")
    try:
        dbname = databases.create(owner=role)
        ini = write_project(tmp_path / "project", REVS)
        upgrade(ini, dbname, "a2", user=role if owns_schema else "postgres")
        before = snapshot(dbname)
        config = tmp_path / "runbook.toml"
        options = {
            "url": db_url(dbname, user=role),
            "alembic_ini": str(ini),
            "backup_dir": str(tmp_path / "b"),
        }
        config.write_text(toml({"x": options}))
        result = runbook_cli("apply", env={"RUNBOOK_CONFIG": str(config)}, timeout=60)
        assert result.returncode == 2
        if owns_schema:
            expected = (
                f"role {role} cannot create the scratch database a backup is verified "
                "in (no CREATEDB); grant it, or set verify_restore = false"
            )
        else:
            expected = (
                f"role {role} may not read alembic_version (permission denied); use "
                "the role that owns the schema"
            )
        assert result.stderr == f"runbook: error: target 'x': {expected}\n"
        assert snapshot(dbname) == before
    finally:
        databases.drop_all()
        databases.created.clear()
        admin_exec(f"DROP ROLE IF EXISTS {role}")
