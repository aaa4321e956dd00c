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
import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg2
import pytest

from jobs import api
from tests.integration.conftest import (
    REDIS_URL,
    REPO,
    SESSION,
    Config,
    PrivatePostgres,
    Worker,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")

SLICE_TASK = "runbook.backfill_slice"
# At least 1 ms a row (pg_sleep), so the backfill takes longer than one slice (3 s) anywhere.
ROWS = 4000
# Flower's own login, not the database's.
FLOWER_USER = "runbook"
FLOWER_PASSWORD = "flower-" + secrets.token_hex(6)
# What every progress result carries (jobs/backfill_runner.py's progress()).
PROGRESS_KEYS = {"backfill_id", "rows_done", "rows_total", "percent", "eta_s"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Flower:
    """``celery flower`` as an operator starts it, against the test worker's Redis."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30) -> None:
        # FLOWER_* variables of the machine would change Flower's options (auth among them).
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "worker.app",
                    # A celery option: after `flower` it would be dropped with a warning.
                    f"--broker={REDIS_URL}",
                    "flower",
                    "--address=127.0.0.1",
                    f"--port={self.port}",
                    f"--basic-auth={FLOWER_USER}:{FLOWER_PASSWORD}",
                    "--persistent=False",
                    f"--db={self.log_path.with_name('flower-state')}",  # unused while not persistent
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        self.until("Flower to answer HTTP", lambda: self.get("/healthcheck")[0] == 200, deadline)
        self.until("Flower to receive events", self._probe_events, deadline)

    def _probe_events(self) -> bool:
        """Events are Redis pub/sub: only those sent after Flower subscribed reach it. A
        made-up task-sent event that Flower then knows proves it is listening."""
        from worker.app import app

        probe = f"flower-probe-{SESSION}"
        with app.events.default_dispatcher(hostname=f"probe-{SESSION}@test") as dispatcher:
            dispatcher.send("task-sent", uuid=probe, name="runbook.test_probe")
        time.sleep(0.1)
        return self.get(f"/api/task/info/{probe}")[0] == 200

    def get(self, path: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
        """(status, body) of a GET; with Flower's credentials unless ``auth`` says others.
        A connection refused is status 0."""
        user, password = auth or (FLOWER_USER, FLOWER_PASSWORD)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if user:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (ConnectionError, urllib.error.URLError):
            return 0, ""

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        if status != 200:
            pytest.fail(f"GET {path}: HTTP {status} {body[:500]}\n{self.report()}")
        return json.loads(body)

    def until(self, what: str, check: Callable[[], T | None], deadline: float) -> T:
        """Poll ``check`` until it returns something true; fail with Flower's log at the
        deadline or when Flower has exited."""
        while True:
            value = check()
            if value:
                return value
            if self.proc is None or self.proc.poll() is not None:
                pytest.fail(f"Flower exited while waiting for {what}\n{self.report()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{self.report()}")
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def report(self) -> str:
        return f"--- Flower log ({self.log_path}) ---\n{self.log_text()[-4000:]}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


@pytest.fixture
def flower(worker: Worker, tmp_path: Path) -> Iterator[Flower]:
    f = Flower(tmp_path / "flower.log")
    try:
        f.start()
        yield f
    finally:
        f.stop()
        # pytest shows a teardown's output only when the test failed.
        print(f.report())
        print(f"--- worker log (tail) ---\n{worker.log_text()[-3000:]}")


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


def strings(value: Any) -> Iterator[str]:
    """Every key and string value in decoded JSON, at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


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
    assert results[-1]["state"] == "succeeded", results[-1]

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
        "/api/tasks": listing + "\n".join(strings(json.loads(listing))),
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
