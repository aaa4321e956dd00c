"""Passwords stay on the worker side: never in Redis, the ledger, logs, messages or Flower;
and a worker acts only on the targets its own configuration lists."""

from __future__ import annotations

import ast
import dataclasses
import json
import secrets
import time
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis as redis_lib

from jobs import api
from jobs.config import load_settings
from tests.integration.conftest import (
    QUEUE,
    REDIS_URL,
    Config,
    Databases,
    Flower,
    PrivatePostgres,
    Worker,
    db_url,
    json_strings,
    project_target,
    query,
    runbook_cli,
    schema_dump,
)
from tests.projects import Rev, write_project

pytestmark = pytest.mark.integration

REVS = [
    Rev(
        "s1",
        "op.execute('CREATE TABLE vault (id int PRIMARY KEY, note text)')",
        "op.execute('DROP TABLE vault')",
        extra='verify = "SELECT true"',
    ),
    Rev(
        "s2",
        "op.add_column('vault', sa.Column('extra', sa.Text()))",
        "op.drop_column('vault', 'extra')",
    ),
]


def make_role_db(pg: PrivatePostgres, password: str) -> tuple[str, str]:
    suffix = secrets.token_hex(4)
    role, dbname = f"app_{suffix}", f"appdb_{suffix}"
    pg.admin(f"CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{password}'")
    pg.admin(f"CREATE DATABASE {dbname} OWNER {role}")
    return role, dbname


def redis_dump() -> str:
    """Every key and value in the test's Redis database, as text."""
    r = redis_lib.Redis.from_url(REDIS_URL)
    parts = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        parts.append(key.decode(errors="replace"))
        if kind == "string":  # or gone since: the other test process shares this database
            parts.append((r.get(key) or b"").decode(errors="replace"))
        elif kind == "list":
            parts += [v.decode(errors="replace") for v in r.lrange(key, 0, -1)]
        elif kind == "hash":
            parts += [f"{k!r}={v!r}" for k, v in r.hgetall(key).items()]
        elif kind == "set":
            parts += [v.decode(errors="replace") for v in r.smembers(key)]
        elif kind == "zset":
            parts += [v.decode(errors="replace") for v in r.zrange(key, 0, -1)]
    return "\n".join(parts)


def test_wrong_password_is_refused_without_echoing_it(
    private_pg: PrivatePostgres, tmp_path: Path
) -> None:
    role, dbname = make_role_db(private_pg, "right-" + secrets.token_hex(8))
    wrong = "Wr0ng-" + secrets.token_hex(8)
    ini = write_project(tmp_path / "project", REVS)
    config = tmp_path / "runbook.toml"
    config.write_text(
        f'[targets.app]\nurl = "postgresql://{role}:{wrong}@127.0.0.1:{private_pg.port}/{dbname}"\n'
        f'alembic_ini = "{ini}"\nbackup_dir = "{tmp_path / "b"}"\n'
    )
    result = runbook_cli("apply", "--target", "app", env={"RUNBOOK_CONFIG": str(config)})
    assert result.returncode == 2
    assert result.stderr == (
        f"runbook: error: target 'app': login refused for user {role} at "
        f"127.0.0.1:{private_pg.port}/{dbname} (password authentication failed); check the "
        "credentials in the target's URL\n"
    )
    assert wrong not in result.stdout + result.stderr


BACKFILL_ROWS = 2000


def ledger_dump(conn: Any) -> dict[str, str]:
    """Every row of every table in the ledger's schema, as JSON text, by table."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'runbook' "
            "ORDER BY table_name"
        )
        tables = [r[0] for r in cur.fetchall()]
        dump = {}
        for table in tables:
            cur.execute(f"SELECT row_to_json(r)::text FROM runbook.{table} r")
            dump[table] = "\n".join(r[0] for r in cur.fetchall())
    return dump


def test_password_appears_nowhere_after_a_run(
    private_pg: PrivatePostgres, worker: Worker, config: Config, flower: Flower, tmp_path: Path
) -> None:
    # Characters that URL-encoding changes, to catch an encoded copy as well.
    password = "Pw-" + secrets.token_hex(10) + "/@:%"
    role, dbname = make_role_db(private_pg, password)
    from urllib.parse import quote

    url = f"postgresql://{role}:{quote(password, safe='')}@127.0.0.1:{private_pg.port}/{dbname}"
    ini = write_project(tmp_path / "project", REVS)
    name = f"secret_{dbname}"
    config.add(name, url=url, alembic_ini=str(ini), backup_dir=str(tmp_path / "backups"))

    result = runbook_cli("apply", "--target", name, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "succeeded" and Path(run["backup"]["path"]).exists()

    # A backfill on the same target, with rows that fail (id % 500 = 0: division by zero)
    # and are isolated, so every backfill table of the ledger holds rows.
    conn = psycopg2.connect(
        host="127.0.0.1", port=private_pg.port, user=role, password=password, dbname=dbname
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO vault (id) SELECT g FROM generate_series(1, {BACKFILL_ROWS}) g; "
            "ANALYZE vault"
        )
    filled = runbook_cli(
        "backfill",
        "--target",
        name,
        "--table",
        "vault",
        "--set",
        "note = (100 / (id % 500))::text",
        "--batch-size",
        "250",
        "--on-error",
        "isolate",
        "--wait",
        "--json",
    )
    assert filled.returncode == 0, filled.stderr
    backfill = json.loads(filled.stdout)
    assert backfill["state"] == "succeeded" and backfill["skipped"] == 4, backfill

    # Flower has seen every task of the run and the backfill end.
    def settled() -> dict[str, dict[str, Any]] | None:
        listed = flower.json("/api/tasks")
        ours = {
            tid: t
            for tid, t in listed.items()
            if run["id"] in (t.get("args") or "")
            or backfill["backfill_id"] in (t.get("args") or "")
        }
        names = {t["name"] for t in ours.values()}
        if names >= {"runbook.execute_run", "runbook.backfill_slice"} and all(
            t["state"] == "SUCCESS" for t in ours.values()
        ):
            return listed
        return None

    listed = flower.until(
        "Flower to see the run's and backfill's tasks end", settled, time.monotonic() + 60
    )
    infos = {tid: flower.json(f"/api/task/info/{tid}") for tid in listed}

    # Arguments as Flower shows them are names only: the run's id and the target's name, or a
    # slice's label (Celery's argsrepr); no keyword arguments. (Flower hears every test
    # session's events on this Redis: ours are the tasks naming our target.)
    ours = [t for t in infos.values() if name in (t.get("args") or "")]
    assert {t["name"] for t in ours} == {"runbook.execute_run", "runbook.backfill_slice"}, ours
    for task in ours:
        assert task["kwargs"] == "{}", task
        if task["name"] == "runbook.execute_run":
            assert ast.literal_eval(task["args"]) == [run["id"], name], task
        else:
            assert task["args"].startswith(
                f"backfill {backfill['backfill_id']} on {name}, slice 0 keys ("
            ), task
            assert "]: UPDATE " in task["args"], task

    forms = {password, quote(password, safe=""), quote(password)}
    everything = {
        "cli output": result.stdout + result.stderr + filled.stdout + filled.stderr,
        "redis": redis_dump(),
        "worker log": worker.log_text(),
        "status": json.dumps(api.status(run["id"], name)),
        "backfill status": json.dumps(api.backfill_status(backfill["backfill_id"], name)),
        "Flower /api/tasks": json.dumps(listed) + "\n".join(json_strings(listed)),
        "Flower /api/task/info": json.dumps(infos) + "\n".join(json_strings(infos)),
        "Flower's log": flower.log_text(),
    }
    ledger = ledger_dump(conn)
    conn.close()
    for table in ("runs", "steps", "backfills", "backfill_batches", "backfill_slices"):
        assert ledger.get(table), f"runbook.{table} is empty: nothing was searched"
    assert ledger.get("backfill_skipped", "").count("\n") == 3, ledger.get("backfill_skipped")
    everything.update({f"ledger's {table}": text for table, text in ledger.items()})
    # This run's and this backfill's own results are among what was searched.
    results = redis_lib.Redis.from_url(REDIS_URL)
    stored = [results.get(key) or b"" for key in results.scan_iter("celery-task-meta-*")]
    for own in (run["id"], backfill["backfill_id"]):
        assert any(own.encode() in value for value in stored), f"no result of {own} in Redis"
    for where, text in everything.items():
        for form in forms:
            assert form not in text, f"the password leaked into the {where}"


def test_a_task_naming_a_target_the_worker_does_not_list_is_refused(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    from worker.app import app

    name, dbname = project_target(config, databases, tmp_path, REVS, backup=False)
    query(
        dbname,
        "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); "
        "INSERT INTO items (id) SELECT generate_series(1, 100)",
    )
    # A real run and a real backfill of the target, their messages parked where no worker reads.
    parked = dataclasses.replace(load_settings(), queue=f"{QUEUE}-parked")
    run_id = api.enqueue(name, settings=parked)
    assert run_id
    backfill_id = api.enqueue_backfill("items", "n = n + 1", target=name, settings=parked)

    def state() -> list[Any]:
        """Every ledger row, the table's rows and the schema."""
        tables = query(
            dbname,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'runbook' "
            "ORDER BY table_name",
        )
        rows = [
            query(dbname, f"SELECT row_to_json(r)::text FROM runbook.{t} r ORDER BY 1")
            for (t,) in tables
        ]
        return [tables, rows, query(dbname, "SELECT sum(n) FROM items"), schema_dump(dbname)]

    before = state()
    generation = query(dbname, "SELECT generation FROM runbook.backfill_slices")[0][0]
    # Names a worker's configuration does not list; a URL is only a name to it, too.
    for unlisted in ("not_listed", db_url(dbname)):
        sent = {
            "runbook.execute_run": app.send_task(
                "runbook.execute_run", args=[run_id, unlisted], queue=QUEUE
            ),
            "runbook.backfill_slice": app.send_task(
                "runbook.backfill_slice",
                args=[backfill_id, unlisted, 0, generation],
                queue=QUEUE,
            ),
        }
        for task, async_result in sent.items():
            outcome = async_result.get(timeout=60)
            assert async_result.state == "SUCCESS"
            assert outcome["outcome"] == "refused" and outcome["target"] == unlisted, (
                task,
                outcome,
            )
            error = outcome["error"]
            assert error.startswith(f"unknown target {unlisted!r} (configured: "), (task, error)
            assert "\n" not in error and "Traceback" not in error, (task, error)
            assert f"refused: {error}" in worker.log_text()
    assert state() == before  # nothing happened
    assert api.status(run_id, name)["state"] == "enqueued"

    # The same messages naming the listed target do the work: only the name was wrong.
    app.send_task("runbook.execute_run", args=[run_id, name], queue=QUEUE).get(timeout=60)
    assert api.wait(run_id, name, timeout_s=60)["state"] == "succeeded"
    app.send_task(
        "runbook.backfill_slice", args=[backfill_id, name, 0, generation], queue=QUEUE
    ).get(timeout=60)
    assert api.backfill_status(backfill_id, name)["state"] == "succeeded"
    assert query(dbname, "SELECT count(*), min(n), max(n) FROM items") == [(100, 1, 1)]
    redis_lib.Redis.from_url(REDIS_URL).delete(parked.queue)
