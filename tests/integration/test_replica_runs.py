"""Runs and the target's standbys, on a real primary with a streaming standby
(tests/integration/replication_support.py), through the installed `runbook` CLI and a
`runbook worker` of this module's own: preflight refuses a run while a slot holds back too
much WAL or standby1 lags too far, plan and doctor list the same standbys and slots, and
after a revision that rewrites a table the run waits for standby1 to replay it, renewing its
lease the while, or gives up at replica_wait and says so."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import QUEUE, Config, Worker, runbook_cli, until
from tests.integration.replication_support import STANDBY_NAME, ReplicatedPostgres
from tests.projects import Rev, write_project

pytestmark = pytest.mark.integration

# A queue of this module's own: its worker's lease is short, and no other worker takes its runs.
REPL_QUEUE = f"{QUEUE}-repl"
CLI_ENV = {"RUNBOOK_QUEUE": REPL_QUEUE}
LEASE_S = 3.0  # renewed every 0.75 s: a stall of 2 s on a loaded machine keeps it

SMALL = [
    Rev(
        "s1",
        "op.execute('CREATE TABLE notes (id int PRIMARY KEY, body text)')",
        "op.execute('DROP TABLE notes')",
    ),
]
# w2 rewrites a table of 60 000 rows (a few MB of WAL); w3 comes after it.
REWRITING = [
    Rev(
        "w1",
        "op.execute('CREATE TABLE big AS SELECT g AS id, g AS v FROM generate_series(1, 60000) g')",
        "op.execute('DROP TABLE big')",
    ),
    Rev(
        "w2",
        "op.execute('ALTER TABLE big ALTER COLUMN v TYPE bigint')",
        "op.execute('ALTER TABLE big ALTER COLUMN v TYPE int')",
    ),
    Rev(
        "w3",
        "op.execute('CREATE TABLE after_big (id int PRIMARY KEY)')",
        "op.execute('DROP TABLE after_big')",
    ),
]


@pytest.fixture(scope="module")
def pair(services: None) -> Iterator[ReplicatedPostgres]:
    pg = ReplicatedPostgres()
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def repl_worker(
    pair: ReplicatedPostgres, config: Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """A worker on this module's queue, with a 2 s lease and its reconciler on (every 1 s):
    a run whose lease were not renewed while it waits would be sent again."""
    w = Worker(config, tmp_path_factory.mktemp("repl-worker") / "worker.log")
    w.start(
        concurrency=1,
        RUNBOOK_QUEUE=REPL_QUEUE,
        RUNBOOK_LEASE_S=str(LEASE_S),
        RUNBOOK_RECONCILE_S="1",
    )
    yield w
    w.stop()


_counter = iter(range(1000))


def replica_target(
    pair: ReplicatedPostgres,
    config: Config,
    tmp_path: Path,
    revisions: list[Rev],
    **options: object,
) -> tuple[str, str]:
    """A database on the private primary and a target for it; (name, database)."""
    dbname = f"repl_{next(_counter)}_{int(time.time() * 1000) % 100000}"
    pair.primary.sql(f"CREATE DATABASE {dbname}")
    name = f"t_{dbname}"
    options.setdefault("backup_dir", str(tmp_path / "backups"))
    options.setdefault("verify_restore", False)
    config.add(
        name,
        url=pair.primary.url(dbname),
        alembic_ini=str(write_project(tmp_path / f"p_{dbname}", revisions)),
        **options,
    )
    return name, dbname


def cli(*args: str) -> Any:
    return runbook_cli(*args, env=CLI_ENV)


def apply_json(name: str, *extra: str) -> dict[str, Any]:
    done = cli("apply", "--target", name, "--wait", "--json", *extra)
    assert done.returncode in (0, 1), done.stderr
    return dict(json.loads(done.stdout))


def status_json(run_id: str) -> dict[str, Any]:
    done = cli("status", run_id, "--json")
    assert done.returncode in (0, 1), done.stderr
    return dict(json.loads(done.stdout))


def step(run: dict[str, Any], kind: str, revision: str = "") -> dict[str, Any]:
    return next(s for s in run["steps"] if s["kind"] == kind and (s["revision"] or "") == revision)


def ended(run: dict[str, Any]) -> dict[str, Any] | None:
    return run if run["state"] not in ("enqueued", "running", "rolling_back") else None


def write_wal(pair: ReplicatedPostgres, megabytes: int) -> None:
    """About ``megabytes`` of WAL on the primary, outside the target's database."""
    pair.primary.sql(
        "CREATE TABLE IF NOT EXISTS filler (g int, pad text); "
        f"INSERT INTO filler SELECT g, repeat('x', 900) FROM generate_series(1, {megabytes * 1000}) g"
    )


def caught_up(pair: ReplicatedPostgres) -> None:
    pair.resume_replay()
    until("standby1 to catch up", lambda: (pair.lag_bytes() or 0) < 100_000, 30)


def test_a_slot_holding_back_wal_refuses_the_run_in_preflight_and_plan_and_doctor_list_it(
    pair: ReplicatedPostgres, repl_worker: Worker, config: Config, tmp_path: Path
) -> None:
    name, dbname = replica_target(pair, config, tmp_path, SMALL, max_retained_wal="2MB")
    pair.primary.sql("SELECT pg_create_logical_replication_slot('cdc_test', 'test_decoding')")
    try:
        write_wal(pair, 5)

        planned = cli("plan", "--target", name, "--json")
        assert planned.returncode == 0, planned.stderr
        seen = json.loads(planned.stdout)["replication"]
        assert [s["name"] for s in seen["standbys"]] == [STANDBY_NAME]
        (slot,) = seen["slots"]
        assert (slot["name"], slot["kind"], slot["active"]) == ("cdc_test", "logical", False)
        assert seen["over_bounds"][0].startswith("slot cdc_test retains")
        text = cli("plan", "--target", name)
        assert f"replication: standby {STANDBY_NAME}: streaming" in text.stdout
        assert "replication: over bounds: slot cdc_test retains" in text.stdout

        doctor = cli("doctor", "--target", name, "--json")
        assert doctor.returncode == 1, doctor.stderr  # the slot over the bound is a finding
        findings = json.loads(doctor.stdout)
        facts = [f["message"] for f in findings if f.get("level") == "info"]
        assert any(m.startswith(f"standby {STANDBY_NAME}: streaming") for m in facts), facts
        assert any(m.startswith("slot cdc_test (logical, inactive)") for m in facts), facts
        (over,) = [f for f in findings if f["code"] == "replication_slot"]
        assert over["message"].startswith("slot cdc_test retains")
        assert "pg_drop_replication_slot('cdc_test')" in over["fix"]

        run = apply_json(name)
        assert run["state"] == "failed"
        assert [(s["kind"], s["state"]) for s in run["steps"]] == [("preflight", "failed")]
        error = run["error"]
        assert "\n" not in error and error.startswith("slot cdc_test retains"), error
        assert "max_retained_wal 2.0 MB" in error and 'replicas = "ignore"' in error
        recorded = step(run, "preflight")["detail"]["replication"]
        assert "cdc_test" in [s["name"] for s in recorded["slots"]]
        assert STANDBY_NAME in [s["name"] for s in recorded["standbys"]]
        assert pair.primary.sql("SELECT to_regclass('notes')", dbname) == [(None,)]
        assert run["backup"] in (None, {})
        assert list((tmp_path / "backups").glob("*")) == []  # no backup taken
    finally:
        pair.primary.sql("SELECT pg_drop_replication_slot('cdc_test')")

    run = apply_json(name)
    assert run["state"] == "succeeded", run["error"]
    assert run["backup"]["size"] > 0
    assert pair.primary.sql("SELECT to_regclass('notes')::text", dbname) == [("notes",)]


def test_a_standby_lagging_beyond_the_bound_refuses_the_run_unless_replicas_ignore(
    pair: ReplicatedPostgres, repl_worker: Worker, config: Config, tmp_path: Path
) -> None:
    name, dbname = replica_target(
        pair, config, tmp_path, SMALL, max_replica_lag_bytes="1MB", max_replica_lag="60min"
    )
    pair.pause_replay()
    try:
        write_wal(pair, 4)
        until("standby1 to be 1 MB behind", lambda: (pair.lag_bytes() or 0) > 2_000_000, 20)
        run = apply_json(name, "--no-backup")
        assert run["state"] == "failed"
        assert [(s["kind"], s["state"]) for s in run["steps"]] == [("preflight", "failed")]
        assert run["error"].startswith("replica lag ") and f"on {STANDBY_NAME} " in run["error"]
        assert "max_replica_lag_bytes 1.0 MB" in run["error"]
        assert pair.primary.sql("SELECT to_regclass('notes')", dbname) == [(None,)]

        config.add(name, **{**config.targets[name], "replicas": "ignore"})
        run = apply_json(name, "--no-backup")
        assert run["state"] == "succeeded", run["error"]
        recorded = step(run, "preflight")["detail"]["replication"]
        assert recorded["mode"] == "ignore" and recorded["over_bounds"] == []
        assert [s["name"] for s in recorded["standbys"]] == [STANDBY_NAME]
    finally:
        caught_up(pair)


def at_w1(
    pair: ReplicatedPostgres, config: Config, tmp_path: Path, **options: object
) -> tuple[str, str]:
    """A target of REWRITING at w1 (its rows replayed by standby1), bounded at 1 MB behind."""
    name, dbname = replica_target(
        pair,
        config,
        tmp_path,
        REWRITING,
        backup=False,
        max_replica_lag_bytes="1MB",
        max_replica_lag="60min",
        throttle_check="100ms",
        **options,
    )
    first = apply_json(name, "--to", "w1")
    assert first["state"] == "succeeded", first["error"]
    caught_up(pair)
    return name, dbname


def test_after_a_rewrite_the_run_waits_for_the_standby_renewing_its_lease_then_goes_on(
    pair: ReplicatedPostgres, repl_worker: Worker, config: Config, tmp_path: Path
) -> None:
    name, dbname = at_w1(pair, config, tmp_path)
    pair.pause_replay()
    try:
        done = cli("apply", "--target", name)
        assert done.returncode == 0, done.stderr
        run_id = done.stdout.strip()

        def waiting() -> dict[str, Any] | None:
            run = status_json(run_id)
            upgrade = [s for s in run["steps"] if s["kind"] == "upgrade" and s["revision"] == "w2"]
            wait = upgrade[0]["detail"].get("replica_wait") if upgrade else None
            return run if wait and wait["outcome"] == "waiting" else None

        run = until("the run to wait after w2", waiting, 30)
        assert step(run, "upgrade", "w2")["state"] == "running"
        assert not [s for s in run["steps"] if s["revision"] == "w3"]  # w3 waits its turn
        assert (
            f"on {STANDBY_NAME}" in step(run, "upgrade", "w2")["detail"]["replica_wait"]["reason"]
        )
        shown = cli("status", run_id)
        assert "upgrade w2: waiting for the standbys to replay: replica lag" in shown.stdout

        # The lease keeps being renewed while the run waits.
        sql = f"SELECT heartbeat_at FROM runbook.runs WHERE id = '{run_id}'"
        beat = pair.primary.sql(sql, dbname)[0][0]
        until("a heartbeat", lambda: pair.primary.sql(sql, dbname)[0][0] != beat, LEASE_S * 2)
        time.sleep(LEASE_S * 1.5)  # longer than a lease: the reconciler would send it again
        assert status_json(run_id)["state"] == "running"
    finally:
        pair.resume_replay()

    final = until("the run to end", lambda: ended(status_json(run_id)), 60)
    assert final["state"] == "succeeded", final["error"]
    wait = step(final, "upgrade", "w2")["detail"]["replica_wait"]
    assert wait["outcome"] == "caught_up" and wait["standbys"] == [STANDBY_NAME]
    assert wait["waited_s"] > LEASE_S
    assert wait["line"] == f"waited {wait['waited_s']:.1f} s for {STANDBY_NAME} to replay"
    assert wait["rewrites"] == [
        "ALTER TABLE big ALTER COLUMN v TYPE bigint — changes a column's type"
    ]
    assert "replica_wait" not in step(final, "upgrade", "w3")["detail"]
    assert f"upgrade w2: {wait['line']}" in cli("status", run_id).stdout
    assert f"run {run_id} on {name} has no live lease" not in repl_worker.log_text()


def test_a_standby_that_does_not_catch_up_in_replica_wait_is_given_up_on_and_said_so(
    pair: ReplicatedPostgres, repl_worker: Worker, config: Config, tmp_path: Path
) -> None:
    name, dbname = at_w1(pair, config, tmp_path, replica_wait="1s")
    pair.pause_replay()
    try:
        run = apply_json(name)
    finally:
        caught_up(pair)
    assert run["state"] == "succeeded", run["error"]
    assert pair.primary.sql("SELECT to_regclass('after_big')::text", dbname) == [("after_big",)]
    wait = step(run, "upgrade", "w2")["detail"]["replica_wait"]
    assert wait["outcome"] == "gave_up" and 1.0 <= wait["waited_s"] < 5
    assert wait["line"].startswith(
        f"warning: gave up after {wait['waited_s']:.1f} s waiting for {STANDBY_NAME} to replay "
        "(replica lag "
    )
    assert wait["line"].endswith("; the run went on (replica_wait)")
    assert f"upgrade w2: {wait['line']}" in repl_worker.log_text()
