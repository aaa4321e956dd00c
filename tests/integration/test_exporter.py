"""`runbook exporter`, the installed command as a user starts it, scraped over HTTP while a
backfill walks on the real worker: the exposition parses, rows done rise between scrapes, a
run in its upgrade and a finished run show, a target that is down reads 0 without breaking
the scrape, and no URL or password appears anywhere in it."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs import api
from tests.integration.conftest import (
    GATED,
    RUNBOOK,
    Config,
    Databases,
    PrivatePostgres,
    Worker,
    db_url,
    gated_target,
    open_gate,
    query,
    runbook_cli,
    until,
    upgrade_running,
)
from tests.integration.fleet_support import make_fleet
from tests.integration.test_flower import ROWS, password_target
from tests.projects import trivial_history, write_project

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Exporter:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.port = port
        self.log_path = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [RUNBOOK, "exporter", "--port", str(port)],
                env=dict(os.environ, RUNBOOK_CONFIG=str(config)),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        until("the exporter to answer", lambda: self._get() is not None, 30)

    def _get(self) -> str | None:
        if self.proc.poll() is not None:
            pytest.fail(f"the exporter exited: {self.log_path.read_text()[-2000:]}")
        try:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=15) as response:
                assert response.status == 200
                return str(response.read().decode())
        except (ConnectionError, urllib.error.URLError):
            return None

    def scrape(self) -> tuple[str, Samples]:
        text = self._get()
        assert text is not None
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return text, samples

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The one sample of ``name`` whose labels include ``labels``, or None."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def number(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``; it must be there."""
    found = value(samples, name, **labels)
    assert found is not None, f"no {name} with {labels}"
    return found


@pytest.fixture
def exporter_config(tmp_path: Path) -> Iterator[Config]:
    # Its own runbook.toml: the session's shared one must not gain a target that is down.
    yield Config(tmp_path / "exporter.toml")


def test_exporter_during_a_backfill(
    worker: Worker,
    config: Config,
    databases: Databases,
    private_pg: PrivatePostgres,
    exporter_config: Config,
    tmp_path: Path,
) -> None:
    password = "Pw-" + secrets.token_hex(10) + "/@:%"
    # Its table takes 1 ms a row (pg_sleep): some seconds of walking in batches of ~50 rows.
    name, _ = password_target(private_pg, config, password)
    project = write_project(tmp_path / "a", trivial_history(1))
    options = {**config.targets[name], "alembic_ini": str(project)}
    config.add(name, **options)
    exporter_config.add(name, **options)

    # A finished run of ours, and another target's run waiting in its upgrade.
    done = runbook_cli("apply", "--target", name, "--wait")
    assert done.returncode == 0, done.stderr[-2000:]
    gated, gated_db = gated_target(config, databases, tmp_path)
    exporter_config.add(gated, **config.targets[gated])
    # A target whose database is down (a closed port), its password in its URL too.
    down_port = free_port()
    exporter_config.add(
        "down", url=f"postgresql://rb:{quote(password, safe='')}@127.0.0.1:{down_port}/gone"
    )

    # And one whose database has no ledger yet (runbook never ran there).
    exporter_config.add("bare", url=db_url(databases.create()))

    started = runbook_cli("apply", "--target", gated)
    assert started.returncode == 0, started.stderr[-2000:]
    run_id = started.stdout.split()[-1]
    exporter = None
    try:
        until("the gated run's upgrade", lambda: upgrade_running(run_id, gated), 60)
        bf = runbook_cli(
            "backfill", "--target", name, "--table", "large",
            "--set", "counter = counter + slow_one(), new_column = 'v'",
            "--where", "new_column IS NULL", "--batch-size", "50",
        )  # fmt: skip
        assert bf.returncode == 0, bf.stderr[-2000:]
        backfill_id = bf.stdout.strip().splitlines()[-1]
        ours = {"target": name, "backfill": backfill_id, "table": "public.large"}

        exporter = Exporter(exporter_config.path, free_port(), tmp_path / "exporter.log")

        def scraped_with_rows(more_than: float) -> tuple[str, Samples] | None:
            text, samples = exporter.scrape()
            rows = value(samples, "runbook_backfill_rows_done", **ours)
            return (text, samples) if rows is not None and rows > more_than else None

        text1, first = until("a scrape with rows done", lambda: scraped_with_rows(0), 30)
        rows1 = number(first, "runbook_backfill_rows_done", **ours)
        text2, second = until("rows done to rise", lambda: scraped_with_rows(rows1), 30)
        print(f"--- /metrics during the backfill ---\n{text2}")

        for samples in (first, second):
            assert value(samples, "runbook_backfill_state", **ours, state="running") == 1
            assert value(samples, "runbook_backfill_state", **ours, state="succeeded") == 0
            assert number(samples, "runbook_backfill_rows_left", **ours) > 0
        done_now = number(second, "runbook_backfill_rows_done", **ours)
        assert done_now + number(second, "runbook_backfill_rows_left", **ours) == ROWS
        assert number(second, "runbook_backfill_rows_per_second", **ours) > 0
        assert number(second, "runbook_backfill_throttled_seconds", **ours) == 0

        # Runs by state, zeros included; the last run's outcome; the gated run in its step.
        assert value(second, "runbook_runs", target=name, state="succeeded") == 1
        assert value(second, "runbook_runs", target=name, state="failed") == 0
        assert value(second, "runbook_run_last_outcome", target=name, state="succeeded") == 1
        assert value(second, "runbook_run_last_outcome", target=name, state="rolled_back") == 0
        assert number(second, "runbook_run_last_duration_seconds", target=name) > 0
        assert value(second, "runbook_runs", target=gated, state="running") == 1
        assert (
            value(
                second,
                "runbook_run_current_info",
                target=gated,
                run=run_id,
                step="upgrade",
                revision="g1",
                step_state="running",
            )
            == 1
        )
        assert number(second, "runbook_run_current_age_seconds", target=gated, run=run_id) > 0

        # Up where the ledger was read; 0, and nothing else of it, for the target that is down.
        assert value(second, "runbook_target_up", target=name) == 1
        assert value(second, "runbook_target_up", target=gated) == 1
        assert value(second, "runbook_target_up", target="down") == 0
        assert value(second, "runbook_target_up", target="bare") == 0
        assert value(second, "runbook_runs", target="down", state="running") is None
        assert number(second, "runbook_target_scrape_duration_seconds", target="down") >= 0

        for text in (text1, text2):
            assert "postgresql://" not in text
            for form in (password, quote(password, safe=""), quote(password)):
                assert form not in text
        log = exporter.log_path.read_text()
        assert "target down is not scraped: target 'down': database at 127.0.0.1" in log
        assert "target bare is not scraped: target 'bare' has no ledger yet" in log
        assert password not in log and quote(password, safe="") not in log

        # A second exporter on the same port: one line, exit 2.
        taken = runbook_cli(
            "exporter",
            "--port",
            str(exporter.port),
            env={"RUNBOOK_CONFIG": str(exporter_config.path)},
            timeout=30,
        )
        assert taken.returncode == 2
        (line,) = taken.stderr.strip().splitlines()
        assert line.startswith(f"runbook: error: cannot listen on 127.0.0.1:{exporter.port}"), line

        # Once it has finished: succeeded, nothing left, every row done.
        until(
            "the backfill to succeed",
            lambda: api.backfill_status(backfill_id, name)["state"] == "succeeded",
            60,
        )
        _, after = exporter.scrape()
        assert value(after, "runbook_backfill_state", **ours, state="succeeded") == 1
        assert value(after, "runbook_backfill_rows_left", **ours) == 0
        assert value(after, "runbook_backfill_rows_done", **ours) == ROWS
    finally:
        open_gate(gated_db)
        if exporter is not None:
            exporter.stop()
    until("the gated run to end", lambda: api.status(run_id, gated)["state"] == "succeeded", 60)


@pytest.mark.usefixtures("worker")
def test_exporter_of_the_control_database_shows_each_rollout_and_its_members(
    config: Config, control_db: str, databases: Databases, tmp_path: Path, exporter_config: Config
) -> None:
    """An exporter whose runbook.toml names only the control database, as a fleet's would:
    each rollout's state and its members by state, while it goes and once it settled."""
    # Every member's upgrade waits for a row in its table gate: the last one's stays shut
    # until the scrapes have caught the rollout mid-way.
    fleet = make_fleet(config, databases, tmp_path, 3, revisions=GATED, rows=5)
    for dbname in fleet.members.values():
        query(dbname, "CREATE TABLE gate (opened_at timestamptz NOT NULL DEFAULT now())")
    gate = fleet.db(f"{fleet.group}_03")
    for name in (f"{fleet.group}_01", f"{fleet.group}_02"):
        open_gate(fleet.db(name))
    exporter_config.control = {"url": db_url(control_db)}
    exporter_config.write()
    exporter = Exporter(exporter_config.path, free_port(), tmp_path / "control-exporter.log")
    try:
        _, before = exporter.scrape()
        assert number(before, "runbook_control_up") == 1
        started = runbook_cli("rollout", "--group", fleet.group, "--parallel", "2")
        assert started.returncode == 0, started.stderr
        rollout_id = started.stdout.strip()
        ours = {"rollout": rollout_id, "group": fleet.group}

        def mid_way() -> Samples | None:
            _, now = exporter.scrape()
            done = value(now, "runbook_rollout_members", **ours, state="succeeded")
            return now if done == 2 else None

        now = until("two members done, the gated one running", mid_way, 90)
        assert number(now, "runbook_rollout_state", **ours, to_revision="g1", state="running") == 1
        assert number(now, "runbook_rollout_members", **ours, state="running") == 1
        assert number(now, "runbook_rollout_members", **ours, state="failed") == 0
        open_gate(gate)
        until("the rollout to succeed", lambda: rollout_state(rollout_id) == "succeeded", 90)
        _, after = exporter.scrape()
        assert number(after, "runbook_rollout_state", **ours, state="succeeded") == 1
        assert number(after, "runbook_rollout_state", **ours, state="running") == 0
        assert number(after, "runbook_rollout_members", **ours, state="succeeded") == 3
        assert number(after, "runbook_rollout_age_seconds", **ours) > 0
    finally:
        open_gate(gate)
        exporter.stop()


def rollout_state(rollout_id: str) -> str:
    shown = runbook_cli("status", rollout_id, "--json")
    return str(json.loads(shown.stdout)["state"])
