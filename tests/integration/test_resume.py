"""A worker killed in the middle of a revision: the run finishes, nothing done twice."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from jobs import api
from tests.integration.conftest import Config, Databases, Worker, project_target
from tests.projects import Rev

pytestmark = pytest.mark.integration


def test_sigkilled_worker_mid_upgrade_is_redelivered_and_the_run_completes(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    revisions = [
        Rev("k1", "op.execute('CREATE TABLE first (id int)')", "op.execute('DROP TABLE first')"),
        Rev(
            "k2",
            "op.execute('CREATE TABLE slow (id int)')\nop.execute('SELECT pg_sleep(2)')",
            "op.execute('DROP TABLE slow')",
        ),
        Rev("k3", "op.execute('CREATE TABLE last (id int)')", "op.execute('DROP TABLE last')"),
    ]
    name, dbname = project_target(
        config,
        databases,
        tmp_path,
        revisions,
        backup=False,
        lock_timeout="500ms",
        lock_retries=20,
        lock_retry_backoff=0.2,
    )
    run_id = api.enqueue(name)
    assert run_id
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        steps = api.status(run_id, name)["steps"]
        if any(s["kind"] == "upgrade" and s["revision"] == "k2" for s in steps):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the slow revision never started")
    assert worker.proc is not None
    for pid in worker.pool_pids():  # SIGKILL the pool processes: no chance to clean up or record
        os.kill(int(pid), signal.SIGKILL)

    run = api.wait(run_id, name, timeout_s=90)
    assert run["state"] == "succeeded", run["error"]
    assert run["deliveries"] >= 2
    k2 = next(s for s in run["steps"] if s["kind"] == "upgrade" and s["revision"] == "k2")
    assert k2["attempts"] >= 2
    assert [(s["kind"], s["revision"]) for s in run["steps"]] == [
        ("preflight", None),
        ("upgrade", "k1"),
        ("verify", "k1"),
        ("upgrade", "k2"),
        ("verify", "k2"),
        ("upgrade", "k3"),
        ("verify", "k3"),
    ]
    assert all(s["state"] == "succeeded" for s in run["steps"])
