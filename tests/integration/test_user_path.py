"""What users type keeps its promises: repeated options, one broken target among good ones,
the terminal's progress bar, and a CLI with no target configured (installed `runbook`
command and workers started with `runbook worker`)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest
import redis as redis_lib

from jobs.cli.commands import cli
from tests.integration.conftest import (
    REDIS_URL,
    RUNBOOK,
    Config,
    Databases,
    Worker,
    db_url,
    query,
    runbook_cli,
    schema_dump,
)

pytestmark = pytest.mark.integration

ROWS = 3000


def single_value_options() -> list[tuple[str, str, str]]:
    """Every (command, option, value) where the option takes one value: from the CLI itself,
    so that an option added later is covered without editing this test."""
    found = []
    for name, command in sorted(cli.commands.items()):
        for param in command.params:
            if not isinstance(param, click.Option) or param.multiple or param.is_flag:
                continue
            if param.count:
                continue
            if isinstance(param.type, click.Choice):
                value = str(param.type.choices[0])
            elif isinstance(param.type, click.types.IntParamType):
                value = "1"
            else:
                value = "x"
            found.append((name, max(param.opts, key=len), value))
    return found


def test_every_single_value_option_given_twice_is_refused_and_changes_nothing(
    config: Config, databases: Databases, tmp_path: Path
) -> None:
    dbname = databases.create()
    query(dbname, "CREATE TABLE t (id int PRIMARY KEY, a text, b int)")
    toml = tmp_path / "runbook.toml"
    toml.write_text(f'[targets.x]\nurl = "{db_url(dbname)}"\nbackup = false\n')
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    env = {"RUNBOOK_CONFIG": str(toml), "RUNBOOK_QUEUE": queue}
    before = schema_dump(dbname, with_ledger=True)
    cases = single_value_options()
    # The commands users repeat options of most are all here.
    assert {("backfill", "--where"), ("backfill", "--target"), ("apply", "--to")} <= {
        (c, o) for c, o, _ in cases
    }
    assert {("restore", "--backup"), ("backfill", "--key"), ("status", "--target")} <= {
        (c, o) for c, o, _ in cases
    }

    def attempt(case: tuple[str, str, str]) -> tuple[tuple[str, str, str], object]:
        command, option, value = case
        extra = ["--set", "a = 'v'"] if command == "backfill" else []
        if command == "backfill" and option != "--table":
            extra += ["--table", "t"]
        args = [command, *extra, option, value, f"{option}={value}"]
        return case, runbook_cli(*args, env=env, timeout=60)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(attempt, cases))
    for (command, option, _), result in results:
        assert isinstance(result, subprocess.CompletedProcess)
        assert result.returncode == 2, (command, option, result.stdout, result.stderr)
        assert result.stderr.startswith(f"runbook: error: {option} given twice; "), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    # --where names what to do instead, as the message for each option does.
    where = dict(((c, o), r) for (c, o, _), r in results)[("backfill", "--where")]
    assert isinstance(where, subprocess.CompletedProcess)
    assert "combine the conditions with AND" in where.stderr
    assert schema_dump(dbname, with_ledger=True) == before  # no ledger was even created
    assert redis_lib.Redis.from_url(REDIS_URL).llen(queue) == 0


def test_an_option_value_that_looks_like_an_option_is_a_value(tmp_path: Path) -> None:
    # `--set "--where"` gives --set the value "--where": no --where was given twice.
    result = runbook_cli(
        "backfill",
        "--table",
        "t",
        "--set",
        "--where",
        "--where",
        "a IS NULL",
        env={"RUNBOOK_CONFIG": str(tmp_path / "none.toml")},
    )
    assert result.returncode == 2
    assert "given twice" not in result.stderr
    assert "does not exist (RUNBOOK_CONFIG)" in result.stderr


def table_target(config: Config, databases: Databases) -> tuple[str, str]:
    dbname = databases.create()
    query(
        dbname,
        f"""CREATE TABLE items (id int PRIMARY KEY, a text, b int NOT NULL DEFAULT 0);
        INSERT INTO items (id) SELECT g FROM generate_series(1, {ROWS}) g;
        ANALYZE items;""",
    )
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), backup=False)
    return name, dbname


@pytest.mark.parametrize(
    "sets",
    [["a = 'v'", "b = b + 1"], ["a = 'v', b = b + 1"]],
    ids=["repeated --set", "one --set with a list"],
)
def test_every_assignment_of_a_backfill_is_applied_and_shown(
    worker: Worker, config: Config, databases: Databases, sets: list[str]
) -> None:
    name, dbname = table_target(config, databases)
    options = [arg for s in sets for arg in ("--set", s)]
    statement = 'SET "a" = \'v\', "b" = b + 1'

    dry = runbook_cli("backfill", "-t", name, "--table", "items", *options, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert statement in dry.stdout, dry.stdout
    assert query(dbname, "SELECT count(*) FROM items WHERE a IS NOT NULL OR b <> 0") == [(0,)]

    # The label Flower shows (the message's argsrepr) names every assignment: read it from a
    # queue no worker reads, then cancel that backfill.
    parked = f"parked-{uuid.uuid4().hex[:8]}"
    queued = runbook_cli(
        "backfill", "-t", name, "--table", "items", *options, env={"RUNBOOK_QUEUE": parked}
    )
    assert queued.returncode == 0, queued.stderr
    client = redis_lib.Redis.from_url(REDIS_URL)
    (message,) = client.lrange(parked, 0, -1)
    client.delete(parked)
    label = json.loads(message)["headers"]["argsrepr"]
    head = f"backfill {queued.stdout.strip()} on {name}, slice 0 keys (start, {ROWS}]: UPDATE "
    assert label.startswith(head), label
    assert label.endswith(f"items {statement}"), label
    assert runbook_cli("cancel", queued.stdout.strip()).returncode == 0

    done = runbook_cli("backfill", "-t", name, "--table", "items", *options, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["state"] == "succeeded" and report["rows_done"] == ROWS, report
    assert report["set"] == '"a" = \'v\', "b" = b + 1'
    assert query(dbname, "SELECT count(*) FROM items WHERE a = 'v' AND b = 1") == [(ROWS,)]
    shown = runbook_cli("status", report["backfill_id"])
    assert statement in shown.stdout, shown.stdout
    (recorded,) = query(
        dbname, f"SELECT set_sql FROM runbook.backfills WHERE id = '{report['backfill_id']}'"
    )[0]
    assert recorded == report["set"]


def test_a_column_assigned_in_two_set_options_is_refused(
    config: Config, databases: Databases
) -> None:
    name, dbname = table_target(config, databases)
    before = schema_dump(dbname, with_ledger=True)
    result = runbook_cli(
        "backfill", "-t", name, "--table", "items", "--set", "a = 'v'", "--set", "b = 1, a = 'w'"
    )
    assert result.returncode == 2
    assert result.stderr == 'runbook: error: --set assigns "a" twice: assign each column once\n'
    assert schema_dump(dbname, with_ledger=True) == before


def test_status_without_any_target_says_none_is_configured(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop("RUNBOOK_CONFIG", None)
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [RUNBOOK, "status", "0123abcd"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("runbook: error: no targets are configured"), result.stderr
    assert result.stderr.count("\n") == 1


def screen_of(args: list[str], timeout_s: float = 90) -> tuple[int, str]:
    """Run the installed command on a pseudo-terminal, as a person's shell would; its exit
    code and everything the terminal received (escape sequences removed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [RUNBOOK, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=dict(os.environ, COLUMNS="160"),
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the command ended and closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    code = proc.wait(10)
    raw = b"".join(chunks).decode(errors="replace")
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "\n", raw)


def test_backfill_wait_and_status_watch_draw_a_progress_bar_on_a_terminal(
    worker: Worker, config: Config, databases: Databases
) -> None:
    name, dbname = table_target(config, databases)
    code, screen = screen_of(
        [
            "backfill",
            "-t",
            name,
            "--table",
            "items",
            "--set",
            "a = 'v'",
            "--batch-size",
            "300",
            "--wait",
        ]
    )
    assert "internal error" not in screen and "Traceback" not in screen, screen
    assert code == 0, screen
    lines = [line for line in screen.splitlines() if line.strip()]
    backfill_id = lines[0].strip()
    assert re.fullmatch(r"[0-9a-f]{8,}", backfill_id), screen
    assert "items SET \"a\" = 'v'" in screen, screen
    final = [line for line in lines if "100.0%" in line]
    assert final and f"succeeded: {ROWS} of {ROWS} rows (exact count)" in final[-1], screen
    assert query(dbname, "SELECT count(*) FROM items WHERE a = 'v'") == [(ROWS,)]

    code, screen = screen_of(["status", backfill_id, "--watch"])
    assert "internal error" not in screen and code == 0, screen
    assert any("100.0%" in line and "succeeded" in line for line in screen.splitlines()), screen


def test_one_broken_target_stops_only_itself(
    databases: Databases, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Ten targets, one malformed and one whose url_env is unset on the worker: the worker
    starts, says which and why, and serves the others; the broken ones are refused."""
    dbs = [databases.create() for _ in range(8)]
    own = Config(tmp_path / "runbook.toml")
    for i, dbname in enumerate(dbs):
        own.add(f"good{i}", url=db_url(dbname), backup=False)
    own.add("typo", url="postgresql://postgres@127.0.0.1:99999/x", backup=False)
    var = f"RB_URL_{uuid.uuid4().hex[:6].upper()}"
    own.add("envless", url_env=var, backup=False)
    queue = f"own-{uuid.uuid4().hex[:8]}"
    env = {"RUNBOOK_CONFIG": str(own.path), "RUNBOOK_QUEUE": queue}
    query(dbs[0], "CREATE TABLE items (id int PRIMARY KEY, a text)")
    query(dbs[0], "INSERT INTO items SELECT g FROM generate_series(1, 500) g")
    query(dbs[1], "CREATE TABLE items (id int PRIMARY KEY, a text)")
    query(dbs[1], "INSERT INTO items SELECT g FROM generate_series(1, 500) g")

    w = Worker(own, tmp_path_factory.mktemp("own-worker") / "worker.log")
    # The worker's environment lacks the variable; the CLI's has it (another machine).
    w.start(concurrency=1, RUNBOOK_QUEUE=queue, **{var: ""})
    try:
        deadline = time.monotonic() + 10
        while "is not served" not in w.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = w.log_text()
        typo = (
            "target 'typo': url has an invalid port "
            "(expected postgresql://user:password@host:port/dbname)"
        )
        unset = f"target 'envless': environment variable {var} (url_env) is not set"
        assert f"target typo is not served: {typo}" in log, log[-3000:]
        assert f"target envless is not served: {unset}" in log, log[-3000:]

        # The CLI refuses the malformed one up front with that same line ...
        refused = runbook_cli(
            "backfill", "-t", "typo", "--table", "items", "--set", "a = 'v'", env=env
        )
        assert refused.returncode == 2 and refused.stderr == f"runbook: error: {typo}\n"
        # ... and the good ones work while the others are broken.
        done = runbook_cli(
            "backfill", "-t", "good0", "--table", "items", "--set", "a = 'v'", "--wait", env=env
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert query(dbs[0], "SELECT count(*) FROM items WHERE a = 'v'") == [(500,)]

        # A target this worker cannot read (its url_env is unset here) but the CLI can: the
        # backfill ends errored with the worker's line, recorded by the CLI that follows it.
        theirs = dict(env, **{var: db_url(dbs[1])})
        result = runbook_cli(
            "backfill",
            "-t",
            "envless",
            "--table",
            "items",
            "--set",
            "a = 'v'",
            "--wait",
            env=theirs,
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"a worker refused it: {unset}" in result.stderr, result.stderr
        assert query(dbs[1], "SELECT count(*) FROM items WHERE a IS NOT NULL") == [(0,)]

        health = runbook_cli("targets", "--json", env=env)
        assert health.returncode == 1
        rows = {row["name"]: row for row in json.loads(health.stdout)}
        assert set(rows) == {f"good{i}" for i in range(8)} | {"typo", "envless"}
        assert all(rows[f"good{i}"]["ok"] and rows[f"good{i}"]["reachable"] for i in range(8))
        assert rows["typo"]["config"] == "broken" and rows["typo"]["error"] == typo
        assert rows["envless"]["error"] == unset
        text = runbook_cli("targets", env=env)
        assert text.returncode == 1 and typo in text.stdout and "good7" in text.stdout
        fixed = runbook_cli("targets", env=dict(env, RUNBOOK_CONFIG=str(tmp_path / "good.toml")))
        assert fixed.returncode == 2  # no such file: one line
    finally:
        w.stop()
        redis_lib.Redis.from_url(REDIS_URL).delete(queue)


def test_a_run_a_worker_cannot_serve_ends_failed_with_its_line(
    databases: Databases, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.projects import Rev, write_project

    dbname = databases.create()
    var = f"RB_URL_{uuid.uuid4().hex[:6].upper()}"
    own = Config(tmp_path / "runbook.toml")
    ini = write_project(
        tmp_path / "p",
        [Rev("k1", "op.execute('CREATE TABLE k (id int)')", "op.execute('DROP TABLE k')")],
    )
    own.add("elsewhere", url_env=var, alembic_ini=str(ini), backup=False)
    queue = f"own-{uuid.uuid4().hex[:8]}"
    w = Worker(own, tmp_path_factory.mktemp("own-worker") / "worker.log")
    w.start(concurrency=1, RUNBOOK_QUEUE=queue, **{var: ""})
    try:
        env = {"RUNBOOK_CONFIG": str(own.path), "RUNBOOK_QUEUE": queue, var: db_url(dbname)}
        result = runbook_cli("apply", "--wait", "--json", env=env)
        assert result.returncode == 1, result.stderr
        run = json.loads(result.stdout)
        unset = f"target 'elsewhere': environment variable {var} (url_env) is not set"
        assert run["state"] == "failed" and run["error"] == f"a worker refused the run: {unset}"
        assert run["steps"] == []
        assert query(dbname, "SELECT to_regclass('k')") == [(None,)]
        shown = json.loads(runbook_cli("status", run["id"], "--json", env=env).stdout)
        assert shown["state"] == "failed"
    finally:
        w.stop()
        redis_lib.Redis.from_url(REDIS_URL).delete(queue)
