"""Passwords stay on the worker side: never in Redis, the ledger, logs or messages."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import psycopg2
import pytest
import redis as redis_lib

from jobs import api
from tests.integration.conftest import REDIS_URL, Config, PrivatePostgres, Worker, runbook_cli
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
        if kind == "string":
            parts.append(r.get(key).decode(errors="replace"))
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


def test_password_appears_nowhere_after_a_run(
    private_pg: PrivatePostgres, worker: Worker, config: Config, tmp_path: Path
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

    forms = {password, quote(password, safe=""), quote(password)}
    everything = {
        "cli output": result.stdout + result.stderr,
        "redis": redis_dump(),
        "worker log": worker.log_text(),
        "status": json.dumps(api.status(run["id"], name)),
    }
    conn = psycopg2.connect(
        host="127.0.0.1", port=private_pg.port, user=role, password=password, dbname=dbname
    )
    with conn.cursor() as cur:
        cur.execute(
            "SELECT row_to_json(r)::text FROM runbook.runs r UNION ALL "
            "SELECT row_to_json(s)::text FROM runbook.steps s"
        )
        everything["ledger"] = "\n".join(r[0] for r in cur.fetchall())
    conn.close()
    assert run["id"] in everything["redis"] or "celery-task-meta" in everything["redis"]
    for where, text in everything.items():
        for form in forms:
            assert form not in text, f"the password leaked into the {where}"
