"""The run, end to end: real Postgres, Redis and a real worker process."""

from __future__ import annotations

import json
import stat
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import psycopg2
import pytest

from jobs import api
from jobs.config import load_settings
from tests.integration.conftest import (
    QUEUE,
    Config,
    Databases,
    Worker,
    db_url,
    gated_target,
    open_gate,
    project_target,
    query,
    runbook_cli,
    schema_dump,
    until,
    upgrade_running,
)
from tests.projects import ENV_PY_OWN_ENGINE, Rev, write_project

pytestmark = pytest.mark.integration

GOOD = [
    Rev(
        "a1",
        "op.execute('CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL)')",
        "op.execute('DROP TABLE accounts')",
        extra="verify = \"SELECT to_regclass('accounts') IS NOT NULL\"",
    ),
    Rev(
        "a2",
        "op.add_column('accounts', sa.Column('email', sa.Text(), nullable=True))",
        "op.drop_column('accounts', 'email')",
    ),
    Rev(
        "a3",
        "op.create_index('accounts_email', 'accounts', ['email'])",
        "op.drop_index('accounts_email', table_name='accounts')",
    ),
]


def test_apply_to_head_records_every_step(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    target, dbname = project_target(config, databases, tmp_path, GOOD)
    result = runbook_cli("apply", "--target", target, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "succeeded"
    assert (run["from_revision"], run["to_revision"], run["current_revision"]) == (None, "a3", "a3")
    kinds = [(s["kind"], s["revision"], s["state"]) for s in run["steps"]]
    assert kinds == [("preflight", None, "succeeded"), ("backup", None, "succeeded")] + [
        (k, r, "succeeded") for r in ("a1", "a2", "a3") for k in ("upgrade", "verify")
    ]
    assert all(s["started_at"] and s["finished_at"] and s["attempts"] == 1 for s in run["steps"])
    backup = Path(run["backup"]["path"])
    assert backup.exists() and backup.stat().st_size == run["backup"]["size"] > 0
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert run["backup"]["verified"] is True and len(run["backup"]["sha256"]) == 64
    assert query(dbname, "SELECT version_num FROM alembic_version") == [("a3",)]
    # The ledger is in the target, and no backup holds it.
    listing = subprocess.run(
        ["pg_restore", "--list", str(backup)], capture_output=True, text=True, check=True
    ).stdout
    assert "runbook" not in listing.replace("runbook:", "")
    # Applying again has nothing to do.
    again = runbook_cli("apply", "--target", target)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_failing_third_revision_rolls_back_to_identical_schema(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    revisions = [
        Rev(
            "b0",
            "op.execute('CREATE TABLE base (id int PRIMARY KEY, note text)')",
            "op.execute('DROP TABLE base')",
        ),
        Rev(
            "b1",
            "op.execute('CREATE TABLE orders (id int PRIMARY KEY, base_id int REFERENCES base)')",
            "op.execute('DROP TABLE orders')",
        ),
        Rev(
            "b2",
            "op.add_column('base', sa.Column('flag', sa.Boolean(), server_default='false'))\n"
            "op.create_index('base_flag', 'base', ['flag'])",
            "op.drop_index('base_flag', table_name='base')\nop.drop_column('base', 'flag')",
        ),
        Rev(
            "b3",
            "op.execute('CREATE TABLE doomed (id int)')\nop.execute('SELECT 1/0')",
            "op.execute('DROP TABLE doomed')",
        ),
    ]
    target, dbname = project_target(config, databases, tmp_path, revisions)
    settings = load_settings()
    first = api.enqueue(target, "b0", settings=settings)
    assert first and api.wait(first, target, timeout_s=60)["state"] == "succeeded"
    query(dbname, "INSERT INTO base SELECT g, 'row ' || g FROM generate_series(1, 50) g")
    before = schema_dump(dbname)

    result = runbook_cli("apply", "--target", target, "--wait", "--json")
    assert result.returncode == 1
    run = json.loads(result.stdout)
    assert run["state"] == "rolled_back"
    assert "upgrade b3 failed" in run["error"] and "division by zero" in run["error"]
    steps = [(s["kind"], s["revision"], s["state"]) for s in run["steps"]]
    assert ("upgrade", "b3", "failed") in steps
    assert steps[-2:] == [("downgrade", "b2", "succeeded"), ("downgrade", "b1", "succeeded")]
    assert run["current_revision"] == "b0"
    assert schema_dump(dbname) == before
    assert query(dbname, "SELECT count(*), sum(id) FROM base") == [(50, 1275)]


def test_failed_verify_check_rolls_back_that_revision_too(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    revisions = GOOD[:2] + [
        Rev(
            "a3",
            "op.execute('CREATE TABLE audit (id int)')",
            "op.execute('DROP TABLE audit')",
            extra='verify = "SELECT count(*) > 0 FROM audit"',
        ),
    ]
    target, dbname = project_target(config, databases, tmp_path, revisions, backup=False)
    run_id = api.enqueue(target)
    assert run_id
    run = api.wait(run_id, target, timeout_s=60)
    assert run["state"] == "rolled_back", (run["error"], run["steps"])
    assert "verify check returned False" in run["error"]
    assert [s["revision"] for s in run["steps"] if s["kind"] == "downgrade"] == ["a3", "a2", "a1"]
    assert query(dbname, "SELECT to_regclass('accounts'), to_regclass('audit')") == [(None, None)]
    assert run["options"] == {"backup": False}


def test_impossible_downgrade_ends_restored_from_the_run_backup(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    revisions = [
        Rev(
            "e1",
            "op.execute(\"CREATE TYPE mood AS ENUM ('sad', 'ok')\")",
            "op.execute('DROP TYPE mood')",
        ),
        Rev(
            "e2",
            "with op.get_context().autocommit_block():\n"
            "    op.execute(\"ALTER TYPE mood ADD VALUE IF NOT EXISTS 'happy'\")",
            "raise NotImplementedError('PostgreSQL cannot remove an ENUM value')",
        ),
        Rev("e3", "op.execute('SELECT 1/0')"),
    ]
    target, dbname = project_target(config, databases, tmp_path, revisions)
    result = runbook_cli("apply", "--target", target, "--wait", "--json")
    assert result.returncode == 1
    run = json.loads(result.stdout)
    assert run["state"] == "restored"
    assert run["irreversible"]["e2"] == "its downgrade() raises NotImplementedError"
    down = next(s for s in run["steps"] if s["kind"] == "downgrade")
    assert down["error"] == (
        "downgrade e2 failed: NotImplementedError: PostgreSQL cannot remove an ENUM value"
    )
    assert f"restored from backup {run['backup']['id']}" in run["error"]
    assert run["current_revision"] is None
    assert query(dbname, "SELECT to_regtype('mood')") == [(None,)]


def test_lock_timeout_is_retried_and_a_second_apply_is_refused(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    revisions = [
        Rev(
            "l1",
            "op.execute('CREATE TABLE busy (id int PRIMARY KEY)')",
            "op.execute('DROP TABLE busy')",
        ),
        Rev(
            "l2",
            "op.add_column('busy', sa.Column('extra', sa.Text()))",
            "op.drop_column('busy', 'extra')",
        ),
    ]
    target, dbname = project_target(
        config,
        databases,
        tmp_path,
        revisions,
        backup=False,
        lock_timeout="200ms",
        lock_retries=20,
        lock_retry_backoff=0.2,
    )
    first = api.enqueue(target, "l1")
    assert first and api.wait(first, target, timeout_s=60)["state"] == "succeeded"

    # An application query holding a lock for a few seconds (active, so preflight lets the
    # run start; an idle-in-transaction holder would be refused by preflight instead).
    holder = psycopg2.connect(db_url(dbname))

    def hold() -> None:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(6)")
        holder.rollback()

    holding = threading.Thread(target=hold)
    holding.start()
    while not query(
        dbname,
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = "
        "l.relation WHERE c.relname = 'busy' AND l.mode = "
        "'AccessExclusiveLock' AND l.granted",
    )[0][0]:
        time.sleep(0.05)
    run_id = api.enqueue(target)
    assert run_id
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        step = next(
            (s for s in api.status(run_id, target)["steps"] if s["kind"] == "upgrade"), None
        )
        if step and step["attempts"] >= 3:
            break
        time.sleep(0.1)
    else:
        pytest.fail(
            f"the upgrade was not retried while the lock was held: {api.status(run_id, target)}"
        )
    busy = runbook_cli("apply", "--target", target)
    assert busy.returncode == 2
    assert run_id in busy.stderr and busy.stderr.count("\n") == 1
    holding.join()
    holder.close()
    run = api.wait(run_id, target, timeout_s=60)
    assert run["state"] == "succeeded"
    upgrade = next(s for s in run["steps"] if s["kind"] == "upgrade")
    assert upgrade["attempts"] >= 3
    assert query(
        dbname,
        "SELECT count(*) FROM information_schema.columns "
        "WHERE table_name = 'busy' AND column_name = 'extra'",
    ) == [(1,)]


def test_duplicate_delivery_does_nothing_twice(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    from worker.app import app

    # The run waits at its gate while the duplicates are delivered: they overlap it.
    target, dbname = gated_target(config, databases, tmp_path)
    run_id = api.enqueue(target)
    assert run_id
    until("the gated upgrade to run", lambda: upgrade_running(run_id, target), 60)
    for _ in range(2):
        duplicate = app.send_task("runbook.execute_run", args=[run_id, target], queue=QUEUE)
        outcome = duplicate.get(timeout=60)
        assert outcome["note"] == "another delivery holds the run", outcome
        assert outcome["run_state"] == "running" and "state" not in outcome, outcome
    assert query(dbname, "SELECT count(*) FROM gate") == [(0,)]  # still gated: they overlapped
    open_gate(dbname)
    run = api.wait(run_id, target, timeout_s=60)
    assert run["state"] == "succeeded"
    assert [(s["kind"], s["attempts"]) for s in run["steps"]] == [
        ("preflight", 1),
        ("upgrade", 1),
        ("verify", 1),
    ]
    assert run["deliveries"] == 1  # only the first delivery carried the run
    # A delivery after the end finds the run finished and changes nothing.
    late = app.send_task("runbook.execute_run", args=[run_id, target], queue=QUEUE)
    assert late.get(timeout=60)["note"] == "already finished"
    assert api.status(run_id, target)["steps"] == run["steps"]
    resume = runbook_cli("resume", run_id)
    assert resume.returncode == 2 and "already ended (succeeded)" in resume.stderr


def test_env_py_with_its_own_engine_gets_the_url_and_lock_timeout(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    revisions = [
        Rev("o1", "op.execute('CREATE TABLE own (id int)')", "op.execute('DROP TABLE own')"),
        # The session this env.py opened must carry runbook's lock_timeout too.
        Rev(
            "o2",
            "op.execute('CREATE TABLE seen AS SELECT current_setting(\\'lock_timeout\\') AS v')",
            "op.execute('DROP TABLE seen')",
            extra="def verify(connection):\n"
            "    return connection.execute(sa.text('SELECT count(*) FROM seen')).scalar() == 1\n",
        ),
    ]
    dbname = databases.create()
    ini = write_project(tmp_path / "own", revisions, env_py=ENV_PY_OWN_ENGINE)
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), alembic_ini=str(ini), backup=False, lock_timeout="750ms")
    run_id = api.enqueue(name)
    assert run_id
    run = api.wait(run_id, name, timeout_s=60)
    assert run["state"] == "succeeded", run["error"]
    assert query(dbname, "SELECT v FROM seen") == [("750ms",)]
    assert run["steps"][-1]["detail"]["revision_check"] == "passed"  # the callable verify


class Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status", [200, 503])
def test_health_url_is_checked_after_each_revision(
    status: int, worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    handler = type("H", (Health,), {"status": status})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target, dbname = project_target(
            config,
            databases,
            tmp_path,
            GOOD[:2],
            backup=False,
            health_url=f"http://127.0.0.1:{server.server_port}/health",
        )
        run_id = api.enqueue(target)
        assert run_id
        run = api.wait(run_id, target, timeout_s=60)
    finally:
        server.shutdown()
    verifies = [s for s in run["steps"] if s["kind"] == "verify"]
    if status == 200:
        assert run["state"] == "succeeded"
        assert [s["detail"]["health"] for s in verifies] == [200, 200]
    else:
        assert run["state"] == "rolled_back"
        assert "did not answer 2xx (HTTP 503)" in run["error"]
        assert query(dbname, "SELECT to_regclass('accounts')") == [(None,)]
