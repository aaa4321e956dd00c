"""Projects made by Alembic's own templates (`alembic init -t generic|async`), run unchanged.

Their env.py builds its own engine from ``sqlalchemy.url`` (the async one with
``async_engine_from_config`` and ``connection.run_sync``) and ignores the connection runbook
hands over; the one from ``async`` needs an async driver. The alembic.ini keeps a
developer's URL naming another database and user: runbook takes only its driver, and the
target's host, port, database, user and password. Every run goes through the installed
`runbook` command and a real worker.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg2
import pytest

from tests.integration.conftest import (
    Config,
    Databases,
    PrivatePostgres,
    Worker,
    db_url,
    query,
)
from tests.integration.test_secrets import ledger_dump, make_role_db
from tests.projects import REVISION, Rev

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
RUNBOOK = BIN / "runbook"
PLACEHOLDER = "sqlalchemy.url = driver://user:pass@localhost/dbname"
# What a developer's alembic.ini holds: the driver is the project's; the rest is not the target.
INI_URLS = {
    "generic": "postgresql+psycopg2://dev:devpass@127.0.0.1:5432/dev_only_db",
    "async": "postgresql+asyncpg://dev:devpass@127.0.0.1:5432/dev_only_db",
}
DRIVERS = {"generic": "psycopg2", "async": "asyncpg", "async-cookbook": "psycopg2"}

# The settings the migration's own session runs with, and the driver it runs on.
SEEN = Rev(
    "m1",
    """
    op.execute("CREATE TABLE seen (lock_timeout text, statement_timeout text, app text, driver text)")
    op.execute(
        sa.text(
            "INSERT INTO seen SELECT current_setting('lock_timeout'), "
            "current_setting('statement_timeout'), current_setting('application_name'), :driver"
        ).bindparams(driver=op.get_bind().dialect.driver)
    )
    """,
    "op.drop_table('seen')",
    extra='verify = "SELECT count(*) = 1 FROM seen"',
)
ACCOUNTS = Rev(
    "m2",
    "op.create_table('accounts', sa.Column('id', sa.Integer, primary_key=True), sa.Column('email', sa.Text))",
    "op.drop_table('accounts')",
)
NICKNAME = Rev(
    "m3",
    "op.add_column('accounts', sa.Column('nickname', sa.Text))",
    "op.drop_column('accounts', 'nickname')",
)
FAILING = Rev(
    "m4",
    "op.add_column('accounts', sa.Column('doomed', sa.Integer))\nop.execute('SELECT 1 / 0')",
    "op.drop_column('accounts', 'doomed')",
)


def add_revisions(root: Path, revisions: list[Rev], down: str | None = None) -> None:
    """Revision files in the project's versions/ folder, each on top of the one before."""
    for rev in revisions:
        body = REVISION.format(
            message=rev.id,
            rev=rev.id,
            down=down,
            extra=rev.extra,
            upgrade=_indent(rev.upgrade),
            downgrade=_indent(rev.downgrade),
        )
        (root / "migrations" / "versions" / f"{rev.id}.py").write_text(body)
        down = rev.id


def _indent(body: str) -> str:
    import textwrap

    return textwrap.indent(textwrap.dedent(body).strip(), "    ")


def alembic_init(root: Path, template: str, revisions: list[Rev]) -> Path:
    """`alembic init -t TEMPLATE migrations` in ``root``, as a user starts a project, with
    the developer's URL in alembic.ini and ``revisions`` added; the ini's path."""
    root.mkdir(parents=True)
    subprocess.run(
        [str(BIN / "alembic"), "init", "-t", template, "migrations"],
        cwd=root,
        check=True,
        capture_output=True,
    )
    ini = root / "alembic.ini"
    text = ini.read_text()
    assert PLACEHOLDER in text, "the template's alembic.ini changed"
    ini.write_text(text.replace(PLACEHOLDER, f"sqlalchemy.url = {INI_URLS[template]}"))
    assert "async_engine_from_config" in (root / "migrations" / "env.py").read_text() or (
        template == "generic"
    )
    add_revisions(root, revisions)
    return ini


def runbook(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed `runbook` command, as a user types it (not from the project's folder)."""
    return subprocess.run(
        [str(RUNBOOK), *args],
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=180,
    )


def run_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def columns(dbname: str, table: str) -> list[str]:
    rows = query(
        dbname,
        f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}' "
        "ORDER BY ordinal_position",
    )
    return [r[0] for r in rows]


# The Alembic cookbook's async recipe for a shared connection: runbook's, when given.
COOKBOOK_ONLINE = """def run_migrations_online() -> None:
    connectable = config.attributes.get("connection", None)
    if connectable is None:
        asyncio.run(run_async_migrations())
    else:
        do_run_migrations(connectable)
"""


@pytest.mark.parametrize("template", ["generic", "async", "async-cookbook"])
def test_template_project_is_migrated_verified_and_rolled_back(
    template: str, worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    dbname = databases.create()
    root = tmp_path / "app"
    ini = alembic_init(root, template.split("-")[0], [SEEN, ACCOUNTS])
    if template == "async-cookbook":
        env_py = root / "migrations" / "env.py"
        text = env_py.read_text()
        start = text.index("def run_migrations_online")
        end = text.index("if context.is_offline_mode()")
        env_py.write_text(text[:start] + COOKBOOK_ONLINE + "\n\n" + text[end:])
    name = f"{template}_{dbname}"
    config.add(
        name,
        url=db_url(dbname),
        alembic_ini=str(ini),
        backup=False,
        lock_timeout="750ms",
        statement_timeout="5min",
    )

    first = runbook("apply", "--target", name, "--wait", "--json", cwd=tmp_path)
    run = run_json(first)
    assert first.returncode == 0 and run["state"] == "succeeded", (run["error"], first.stderr)
    assert (run["from_revision"], run["current_revision"]) == (None, "m2")
    assert [(s["kind"], s["revision"], s["state"]) for s in run["steps"][1:]] == [
        (kind, rev, "succeeded") for rev in ("m1", "m2") for kind in ("upgrade", "verify")
    ]
    assert run["steps"][2]["detail"]["revision_check"] == "passed"  # m1's own verify
    # The migration ran on the project's own driver, with runbook's session settings.
    assert query(dbname, "SELECT * FROM seen") == [
        ("750ms", "5min", f"runbook:{name}", DRIVERS[template])
    ]
    assert query(dbname, "SELECT version_num FROM alembic_version") == [("m2",)]

    # m3 goes up, m4 fails: m3 is downgraded through the same env.py, the run rolls back.
    add_revisions(root, [NICKNAME, FAILING], down="m2")
    second = runbook("apply", "--target", name, "--wait", "--json", cwd=tmp_path)
    run = run_json(second)
    assert second.returncode != 0 and run["state"] == "rolled_back", run
    assert "division by zero" in run["error"]
    assert ("downgrade", "m3", "succeeded") in [
        (s["kind"], s["revision"], s["state"]) for s in run["steps"]
    ]
    assert run["current_revision"] == "m2"
    assert query(dbname, "SELECT version_num FROM alembic_version") == [("m2",)]
    assert columns(dbname, "accounts") == ["id", "email"]


MODELS = """
import sqlalchemy as sa

metadata = sa.MetaData()
sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.Text),
    sa.Column("nickname", sa.Text),
)
"""


@pytest.mark.parametrize("template", ["generic", "async"])
def test_plan_rehearse_check_and_stamp_run_the_template_env_py(
    template: str, worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    dbname = databases.create()
    root = tmp_path / "app"
    ini = alembic_init(root, template, [ACCOUNTS, NICKNAME])
    # What a user does for autogenerate: the models module next to alembic.ini, imported
    # through the template's `prepend_sys_path = .` (the worker's own folder is elsewhere).
    module = f"models_{uuid.uuid4().hex[:8]}"
    (root / f"{module}.py").write_text(MODELS)
    env_py = root / "migrations" / "env.py"
    env_py.write_text(
        env_py.read_text().replace(
            "target_metadata = None", f"from {module} import metadata as target_metadata"
        )
    )
    name = f"{template}_{dbname}"
    config.add(
        name, url=db_url(dbname), alembic_ini=str(ini), backup_dir=str(tmp_path / "b"), backup=False
    )
    assert runbook("apply", "--target", name, "--to", "m2", "--wait", cwd=tmp_path).returncode == 0

    # plan renders m3 offline through env.py's offline branch (no driver needed).
    planned = runbook("plan", "--target", name, "--json", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    (m3,) = json.loads(planned.stdout)["revisions"][1:]
    assert m3["render_error"] is None
    assert "ALTER TABLE accounts ADD COLUMN nickname TEXT" in m3["sql"]

    # rehearse: up, down, up on a scratch copy, through the same env.py.
    rehearsed = run_json(runbook("rehearse", "--target", name, "--wait", "--json", cwd=tmp_path))
    assert rehearsed["state"] == "succeeded", rehearsed
    (entry,) = rehearsed["steps"][-1]["detail"]["revisions"]
    assert (entry["revision"], entry["reversible"], entry["up_error"]) == ("m3", True, None)
    assert columns(dbname, "accounts") == ["id", "email"]  # the target was not touched

    # check: env.py's target_metadata against the live schema.
    assert runbook("apply", "--target", name, "--wait", cwd=tmp_path).returncode == 0
    clean = runbook("check", "--target", name, "--json", cwd=tmp_path)
    assert clean.returncode == 0 and json.loads(clean.stdout)["drift"] is False, clean.stderr
    query(dbname, "ALTER TABLE accounts ADD COLUMN sneaky int")
    drifted = runbook("check", "--target", name, "--json", cwd=tmp_path)
    assert drifted.returncode == 1, drifted.stderr
    assert any("sneaky" in line for line in json.loads(drifted.stdout)["schema"])

    # stamp: the version table rewritten through env.py's own connection.
    stamped = run_json(runbook("stamp", "m2", "--target", name, "--wait", "--json", cwd=tmp_path))
    assert stamped["state"] == "succeeded", stamped
    assert query(dbname, "SELECT version_num FROM alembic_version") == [("m2",)]


ENV_URL_ASYNC = """
import asyncio
import os

from alembic import context
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config
URL = os.environ["{var}"]


def do_run_migrations(connection):
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def main():
    engine = create_async_engine(URL, poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=URL, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(main())
"""


def test_env_py_reading_its_own_url_from_the_environment(
    config: Config, databases: Databases, tmp_path: Path
) -> None:
    """The FastAPI shape: env.py takes its URL from an environment variable, whatever
    sqlalchemy.url says. Pointing at the target it runs with runbook's settings; pointing at
    another database it is refused before it connects, and neither database changes."""
    same, other, elsewhere = databases.create(), databases.create(), databases.create()
    tag = uuid.uuid4().hex[:6].upper()
    env = {
        f"APP_URL_SAME_{tag}": db_url(same).replace("postgresql://", "postgresql+asyncpg://"),
        f"APP_URL_OTHER_{tag}": db_url(elsewhere).replace("postgresql://", "postgresql+asyncpg://"),
        "RUNBOOK_QUEUE": f"{os.environ['RUNBOOK_QUEUE']}-envurl-{tag.lower()}",
    }
    targets = {}
    for label, dbname in (("SAME", same), ("OTHER", other)):
        root = tmp_path / label.lower()
        ini = alembic_init(root, "async", [SEEN])
        (root / "migrations" / "env.py").write_text(
            ENV_URL_ASYNC.format(var=f"APP_URL_{label}_{tag}")
        )
        targets[label] = config.add(
            f"envurl_{label.lower()}_{dbname}",
            url=db_url(dbname),
            alembic_ini=str(ini),
            backup=False,
        )

    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(  # `runbook worker` as a user starts it, with the app's variables
        [
            str(RUNBOOK),
            "worker",
            "-c",
            "1",
            "-n",
            f"envurl-{tag}@%h",
            "--without-mingle",
            "--without-gossip",
        ],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONUNBUFFERED="1", RUNBOOK_RECONCILE_S="0", **env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "ready." not in (tmp_path / "worker.log").read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "worker.log"
            ).read_text(errors="replace")[-3000:]
            time.sleep(0.2)

        ok = run_json(
            runbook("apply", "--target", targets["SAME"], "--wait", "--json", cwd=tmp_path, env=env)
        )
        assert ok["state"] == "succeeded", ok
        assert query(same, "SELECT lock_timeout, app, driver FROM seen") == [
            ("2s", f"runbook:{targets['SAME']}", "asyncpg")
        ]
        # A rehearsal runs on a scratch copy: this env.py would migrate the real database.
        add_revisions(tmp_path / "same", [ACCOUNTS], down="m1")
        rehearsed = run_json(
            runbook(
                "rehearse", "--target", targets["SAME"], "--wait", "--json", cwd=tmp_path, env=env
            )
        )
        assert rehearsed["state"] != "succeeded", rehearsed
        assert (
            f"the project's env.py connects to 127.0.0.1:5432/{same}, not to the target's "
            "127.0.0.1:5432/runbook_scratch_"
        ) in rehearsed["error"]
        assert columns(same, "accounts") == []
        assert query(same, "SELECT version_num FROM alembic_version") == [("m1",)]

        refused = runbook(
            "apply", "--target", targets["OTHER"], "--wait", "--json", cwd=tmp_path, env=env
        )
        run = run_json(refused)
        assert refused.returncode != 0 and run["state"] in ("rolled_back", "failed"), run
        assert (
            f"the project's env.py connects to 127.0.0.1:5432/{elsewhere}, not to the target's"
            in run["error"]
        )
        assert "Traceback" not in refused.stdout + refused.stderr
        for dbname in (other, elsewhere):  # nothing ran anywhere
            assert query(dbname, "SELECT to_regclass('seen'), to_regclass('alembic_version')") == [
                (None, None)
            ]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def test_async_project_with_a_password_role(
    private_pg: PrivatePostgres, worker: Worker, config: Config, tmp_path: Path
) -> None:
    """On a server that checks passwords (scram), the target's password reaches the async
    driver, and appears in no ledger row, CLI output or worker log."""
    password = "Pw-" + secrets.token_hex(10) + "/@:%"
    role, dbname = make_role_db(private_pg, password)
    url = f"postgresql://{role}:{quote(password, safe='')}@127.0.0.1:{private_pg.port}/{dbname}"
    ini = alembic_init(tmp_path / "app", "async", [SEEN, ACCOUNTS, NICKNAME, FAILING])
    name = config.add(f"async_secret_{dbname}", url=url, alembic_ini=str(ini), backup=False)

    result = runbook("apply", "--target", name, "--wait", "--json", cwd=tmp_path)
    run = run_json(result)
    assert run["state"] == "rolled_back" and "division by zero" in run["error"], run
    assert [s["revision"] for s in run["steps"] if s["kind"] == "downgrade"] == ["m3", "m2", "m1"]

    conn = psycopg2.connect(
        host="127.0.0.1", port=private_pg.port, user=role, password=password, dbname=dbname
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('seen'), to_regclass('accounts')")
            assert cur.fetchall() == [(None, None)]
        ledger = ledger_dump(conn)
    finally:
        conn.close()
    assert ledger["runs"] and ledger["steps"]
    seen_text = "\n".join([*ledger.values(), result.stdout, result.stderr, worker.log_text()])
    for form in {password, quote(password, safe=""), quote(password)}:
        assert form not in seen_text


def test_async_project_ddl_waits_lock_timeout_and_is_retried(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    """An application transaction holds a lock on the table: the async env.py's ALTER gives
    up after lock_timeout (asyncpg's SQLSTATE 55P03), is retried with backoff, and goes
    through once the application lets go."""
    dbname = databases.create()
    root = tmp_path / "app"
    ini = alembic_init(root, "async", [ACCOUNTS])
    name = config.add(
        f"async_lock_{dbname}",
        url=db_url(dbname),
        alembic_ini=str(ini),
        backup=False,
        lock_timeout="200ms",
        lock_retries=20,
        lock_retry_backoff=0.2,
    )
    assert runbook("apply", "--target", name, "--wait", cwd=tmp_path).returncode == 0
    add_revisions(root, [NICKNAME], down="m2")

    # An application query reading the table, held running (not idle in a transaction,
    # which preflight would wait out) on an advisory lock the test holds.
    key = secrets.randbits(31)
    gate = psycopg2.connect(db_url(dbname))
    gate.autocommit = True
    gate.cursor().execute("SELECT pg_advisory_lock(%s)", (key,))
    app = psycopg2.connect(db_url(dbname))
    app.autocommit = True
    reader = threading.Thread(
        target=app.cursor().execute,
        args=("SELECT pg_advisory_lock(%s), (SELECT count(*) FROM accounts)", (key,)),
    )
    reader_pid = app.get_backend_pid()
    reader.start()
    try:
        while not query(
            dbname,
            "SELECT count(*) FROM pg_locks WHERE relation = 'accounts'::regclass AND granted "
            f"AND pid = {reader_pid}",
        )[0][0]:
            time.sleep(0.05)
        started = runbook("apply", "--target", name, cwd=tmp_path)
        assert started.returncode == 0, started.stderr
        run_id = started.stdout.strip().splitlines()[-1]

        def upgrade_step() -> dict[str, Any] | None:
            shown = run_json(runbook("status", run_id, "--json", cwd=tmp_path))
            return next((s for s in shown["steps"] if s["kind"] == "upgrade"), None)

        deadline = time.monotonic() + 60
        while not ((step := upgrade_step()) and (step["attempts"] >= 2 or step["finished_at"])):
            assert time.monotonic() < deadline, "the upgrade never started"
            time.sleep(0.2)
        assert "lock timeout" in (step["error"] or "")
        assert step["state"] == "running" and columns(dbname, "accounts") == ["id", "email"]
    finally:
        gate.close()  # the reader's query finishes, its lock goes
        reader.join(30)
        app.close()
    done = run_json(runbook("status", run_id, "--watch", "--json", cwd=tmp_path))
    assert done["state"] == "succeeded", done
    (upgrade,) = [s for s in done["steps"] if s["kind"] == "upgrade"]
    assert upgrade["attempts"] >= 2
    assert columns(dbname, "accounts") == ["id", "email", "nickname"]
