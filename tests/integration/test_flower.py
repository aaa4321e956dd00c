"""Flower, as a real process, watching a backfill on the real worker.

Flower knows tasks only from Celery's events (never from the result backend), and its HTTP
API shows a task's fixed fields only (celery.events.state.Task._fields): custom event fields
such as rows_done are kept on its Task objects but appear nowhere in /api/tasks. So the
worker's ``task-progress`` events make the task's state PROGRESS, and carry the progress in
their ``result`` field, which is one of those fields; ``task-succeeded`` then replaces it
with the repr of the task's return value. Arguments show as the task's argsrepr.
"""

from __future__ import annotations

import ast
import json
import secrets
import time
from typing import Any
from urllib.parse import quote

import psycopg2
import pytest

from jobs import api
from tests.integration.conftest import (
    FLOWER_USER,
    Config,
    Flower,
    PrivatePostgres,
    Worker,
    json_strings,
)

pytestmark = pytest.mark.integration

SLICE_TASK = "runbook.backfill_slice"
# At least 1 ms a row (pg_sleep), so the backfill takes longer than one slice (3 s) anywhere.
ROWS = 4000
# What every progress result carries (jobs/backfill/slices.py's progress()).
PROGRESS_KEYS = {"backfill_id", "rows_done", "rows_total", "percent", "eta_s"}


def password_target(pg: PrivatePostgres, config: Config, password: str) -> tuple[str, str]:
    """A table to backfill in a database whose owner logs in with ``password`` (scram); the
    target's name (its URL holds the password) and the database's name."""
    suffix = secrets.token_hex(4)
    role, dbname = f"flw_{suffix}", f"flwdb_{suffix}"
    pg.admin(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    pg.admin(f"CREATE DATABASE {dbname} OWNER {role}")
    conn = psycopg2.connect(
        host="127.0.0.1", port=pg.port, user=role, password=password, dbname=dbname
    )
    with conn, conn.cursor() as cur:
        cur.execute(
            f"""
            CREATE TABLE large (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0, new_column text);
            INSERT INTO large (id) SELECT g * 3 FROM generate_series(1, {ROWS}) g;
            CREATE FUNCTION slow_one() RETURNS int LANGUAGE sql AS 'SELECT 1 FROM pg_sleep(0.001)';
            ANALYZE large;
            """
        )
    conn.close()
    url = f"postgresql://{role}:{quote(password, safe='')}@127.0.0.1:{pg.port}/{dbname}"
    return config.add(f"flower_{dbname}", url=url, backup=False), dbname


def parse_result(value: Any) -> Any:
    """A result as Flower shows it: the repr of the return value (task-succeeded), or what
    a task-progress event put there (a dict, JSON or a repr)."""
    if not isinstance(value, str):
        return value
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(value)
        except (ValueError, SyntaxError):
            continue
    return value


def test_flower_shows_backfill_slices_progress_and_no_password(
    flower: Flower, worker: Worker, config: Config, private_pg: PrivatePostgres
) -> None:
    # Characters that URL-encoding changes, to catch an encoded copy as well.
    password = "Pw-" + secrets.token_hex(10) + "/@:%"
    name, dbname = password_target(private_pg, config, password)

    # Flower's API wants its credentials: none (no Authorization header) or wrong ones: 401.
    assert flower.get("/api/tasks", auth=("", ""))[0] == 401
    assert flower.get("/api/tasks", auth=(FLOWER_USER, "wrong"))[0] == 401
    assert flower.get("/api/tasks")[0] == 200

    started = time.monotonic()
    backfill_id = api.enqueue_backfill(
        "large",
        "counter = counter + slow_one(), new_column = 'v'",
        target=name,
        where="new_column IS NULL",
        batch_size=100,
    )

    def ours() -> dict[str, dict[str, Any]]:
        listed = flower.json(f"/api/tasks?taskname={SLICE_TASK}")
        return {tid: t for tid, t in listed.items() if backfill_id in (t.get("args") or "")}

    progress_listed: dict[str, dict[str, Any]] = {}  # first PROGRESS sighting in /api/tasks
    progress_info: dict[str, dict[str, Any]] = {}  # ... in /api/task/info/<id>
    progress_backend: set[str] = set()  # update_state's PROGRESS, via /api/task/result/<id>
    status: dict[str, Any] = {}

    def settled() -> dict[str, dict[str, Any]] | None:
        nonlocal status
        tasks = ours()
        for tid, task in tasks.items():
            if task["state"] != "PROGRESS":
                continue
            progress_listed.setdefault(tid, task)
            info = flower.json(f"/api/task/info/{tid}")
            if info["state"] == "PROGRESS":
                progress_info.setdefault(tid, info)
            if flower.json(f"/api/task/result/{tid}")["state"] == "PROGRESS":
                progress_backend.add(tid)
        status = api.backfill_status(backfill_id, name)
        if status["state"] in {"errored", "cancelled", "paused"}:
            pytest.fail(f"the backfill stopped: {status}\n{flower.report()}")
        finished = status["state"] == "succeeded"
        if finished and tasks and all(t["state"] in {"SUCCESS", "FAILURE"} for t in tasks.values()):
            return tasks
        return None

    tasks = flower.until(
        f"backfill {backfill_id} to succeed with every slice task settled in Flower",
        settled,
        time.monotonic() + 30,
    )
    elapsed = time.monotonic() - started

    # Every slice task is listed, by name, with the backfill and its key range in argsrepr.
    assert len(tasks) >= 2, f"one task for a {elapsed:.1f}s backfill (slices are 3 s): {tasks}"
    for task in tasks.values():
        assert task["name"] == SLICE_TASK
        assert task["state"] == "SUCCESS", task
        assert backfill_id in task["args"] and "keys" in task["args"], task["args"]
        assert task["worker"], task

    # Each result is the progress: rows done growing slice after slice, 100 % at the end.
    results = [
        parse_result(t["result"]) for t in sorted(tasks.values(), key=lambda t: t["started"])
    ]
    for result in results:
        assert isinstance(result, dict), f"result is not a progress dict: {result!r}"
        assert result.keys() >= PROGRESS_KEYS, result
        assert result["backfill_id"] == backfill_id
        assert 0 <= result["rows_done"] <= ROWS and result["rows_total"] > 0, result
    done = [r["rows_done"] for r in results]
    assert done == sorted(done), done
    assert results[-1]["rows_done"] == ROWS and results[-1]["percent"] == 100.0, results[-1]
    assert results[-1]["backfill_state"] == "succeeded", results[-1]
    # The readable line first; no field contradicts the SUCCESS badge beside it.
    for result in results:
        assert next(iter(result)) == "line", result
        assert result["line"].startswith(f"backfill {backfill_id} on {name}: "), result
        assert "state" not in result, result
    assert all(r["outcome"] == "handed on to the next slice task" for r in results[:-1]), results
    assert f"{ROWS:,} / {ROWS:,} rows (100.0%)" in results[-1]["line"], results[-1]

    # While a slice ran, Flower showed it as PROGRESS, with the progress as its result.
    assert progress_listed, "no slice task was ever PROGRESS in /api/tasks (task-progress events)"
    assert progress_info, "no slice task was ever PROGRESS in /api/task/info"
    assert progress_backend, "no slice task was ever PROGRESS in the result backend (update_state)"
    for task in progress_listed.values():
        assert task["succeeded"] is None and task["started"], task
        running = parse_result(task["result"])
        assert isinstance(running, dict), (
            f"a PROGRESS task's result should carry its progress, got {running!r}"
        )
        assert running.keys() >= PROGRESS_KEYS and running["backfill_id"] == backfill_id, running
        assert 0 <= running["percent"] <= 100, running

    # The database's password appears nowhere in what Flower shows or logs.
    forms = {password, quote(password, safe=""), quote(password)}
    status_code, listing = flower.get("/api/tasks")
    assert status_code == 200
    shown = {
        "/api/tasks": listing + "\n".join(json_strings(json.loads(listing))),
        "/api/task/info": "\n".join(flower.get(f"/api/task/info/{tid}")[1] for tid in tasks),
        "a running task": json.dumps([progress_listed, progress_info]),
        "Flower's log": flower.log_text(),
    }
    for where, text in shown.items():
        for form in forms:
            assert form not in text, f"the database password leaked into {where}"

    # The backfill itself went through the password-protected target.
    conn = psycopg2.connect(
        host=str(private_pg.root), port=private_pg.port, user="postgres", dbname=dbname
    )
    with conn.cursor() as cur:
        cur.execute("SELECT count(*), min(counter), max(counter) FROM large")
        assert cur.fetchone() == (ROWS, 1, 1)
    conn.close()
    assert status["rows_done"] == ROWS
