"""Watching a run as a person does (jobs/cli/render_run.py): `apply --wait` on a terminal
redraws a table of the steps in place, the running step's time ticking and the declared
backfill's bar; `status RUN --watch` in a pipe prints a line per change and no escape
sequence. Both end with the exit code `status` gives the run's state (installed `runbook`
command, real worker)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import (
    REPO,
    RUNBOOK,
    Config,
    Databases,
    Worker,
    open_gate,
    project_target,
    query,
    runbook_cli,
)
from tests.integration.test_status_imports import NOT_FOR_STATUS, status_imports
from tests.integration.test_user_path import screen_of
from tests.projects import Rev

pytestmark = pytest.mark.integration

ROWS = 1500


# r1 waits for a row in `gate` (0.05 s a look, 2 min at most), as conftest's GATED does.
UNTIL_THE_GATE_OPENS = (
    'op.execute("DO $$ BEGIN FOR i IN 1..2400 LOOP EXIT WHEN EXISTS (SELECT 1 FROM gate); '
    'PERFORM pg_sleep(0.05); END LOOP; END $$")'
)


def revisions(
    ms_per_row: int, fail_after: bool = False, hold: str = "op.execute('SELECT pg_sleep(2)')"
) -> list[Rev]:
    """r1 creates and fills items, then ``hold`` (2 s by default); r2 declares a backfill
    of items whose rows cost ``ms_per_row`` each; r3, when asked for, fails (the run rolls
    back)."""
    found = [
        Rev(
            "r1",
            "op.execute('CREATE TABLE items (id int PRIMARY KEY, v int)')\n"
            f"op.execute('INSERT INTO items (id) SELECT g FROM generate_series(1, {ROWS}) g')\n"
            'op.execute("CREATE FUNCTION slow_one() RETURNS int LANGUAGE sql '
            f"AS 'SELECT 1 FROM pg_sleep({ms_per_row / 1000})'\")\n" + hold,
            "op.execute('DROP TABLE items')\nop.execute('DROP FUNCTION slow_one()')",
        ),
        Rev(
            "r2",
            "op.execute('CREATE INDEX items_v ON items (v)')",
            "op.execute('DROP INDEX items_v')",
            extra=(
                "backfills = [{'table': 'items', 'set': 'v = slow_one()', "
                "'where': 'v IS NULL', 'key': 'id', 'batch_size': 100}]"
            ),
        ),
    ]
    if fail_after:
        found.append(Rev("r3", "op.execute('SELECT 1 / 0')"))
    return found


def test_apply_wait_on_a_terminal_redraws_the_steps_in_place_with_times_and_the_bar(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    name, dbname = project_target(config, databases, tmp_path, revisions(1), backup=False)
    code, screen = screen_of(["apply", "--target", name, "--wait"])
    assert "internal error" not in screen and "Traceback" not in screen, screen
    assert code == 0, screen
    run_id = screen.split()[0]
    assert re.fullmatch(r"[0-9a-f]{8,}", run_id), screen
    # Frames of the table: the upgrade of r1 seen running at several times (it takes 2 s).
    ticking = set(re.findall(r"│ upgrade\s+│ r1\s+│ running\s+│ (\d+\.\d)s", screen))
    assert len(ticking) >= 2, screen
    assert f"run {run_id} [{name}] running: base -> r2" in screen, screen
    # The backfill seen under way: its step running, its line short of every row.
    (backfill_id,) = query(dbname, "SELECT id FROM runbook.backfills")[0]
    under_way = re.findall(rf"backfill {backfill_id} running: (\d+) of ~?{ROWS} rows", screen)
    assert re.search(r"│ backfill\s+│ r2\s+│ running\s+│ \d+\.\ds", screen), screen
    assert under_way and int(under_way[0]) < ROWS, screen
    # The last frame: every step succeeded with its time, and the backfill's bar full.
    last = screen[screen.rindex(f"run {run_id} [{name}] succeeded") :]
    for kind, rev in [("preflight", ""), ("upgrade", "r1"), ("upgrade", "r2")]:
        assert re.search(rf"│ {kind}\s+│ {rev}\s+│ succeeded\s+│ \d+\.\ds", last), last
    # (The bar's colour codes end lines in the screen: \s+ around it.)
    full_bar = r"│ backfill\s+│ r2\s+│ succeeded\s+│ \d+\.\ds\s+│\s+━{30}\s+backfill"
    assert re.search(full_bar, last), last
    assert f"backfill {backfill_id} succeeded: {ROWS} of {ROWS} rows (exact count)" in last, last
    assert f"run {run_id} succeeded: base -> r2 (now at r2)" in last, last
    assert query(dbname, "SELECT count(*) FROM items WHERE v = 1") == [(ROWS,)]


def test_status_watch_in_a_pipe_prints_a_line_per_change_and_exits_by_the_outcome(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    held = revisions(5, fail_after=True, hold=UNTIL_THE_GATE_OPENS)
    name, dbname = project_target(config, databases, tmp_path, held, backup=False)
    query(dbname, "CREATE TABLE gate (opened_at timestamptz NOT NULL DEFAULT now())")
    started = runbook_cli("apply", "--target", name)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    watch = subprocess.Popen(
        [RUNBOOK, "status", run_id, "--watch"],
        cwd=REPO,
        env=dict(os.environ, COLUMNS="160"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watch.stderr is not None
    heard: list[tuple[float, str]] = []  # (when, line): how often backfill lines come
    for line in watch.stderr:
        heard.append((time.monotonic(), line.rstrip("\n")))
        if heard[-1][1] == "  upgrade r1 running":  # seen starting, wherever the watch began
            open_gate(dbname)
    code = watch.wait(180)
    lines = [line for _, line in heard]
    text = "\n".join(lines)
    assert "\x1b" not in text and "\x1b" not in (watch.stdout.read() if watch.stdout else ""), text
    assert "internal error" not in text and "Traceback" not in text, text
    assert code == 1, text  # rolled back: what `status` exits with for that state

    # Each change once, in order: steps starting and ending (with their time), run states.
    def one(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.fullmatch(pattern, line)]
        assert len(found) == 1, (pattern, text)
        return found[0]

    order = [
        one(r"  upgrade r1 running"),
        one(r"  upgrade r1 succeeded \(\d+\.\ds\)"),
        one(r"  backfill r2 running"),
        one(r"  backfill r2 succeeded \(\d+\.\ds\)"),
        one(r"  upgrade r3 failed: .*division by zero.* \(\d+\.\ds\)"),
        one(r"  downgrade r2 succeeded \(\d+\.\ds\)"),
        one(rf"run {run_id} \[{name}\]: rolled_back"),
    ]
    assert order == sorted(order), text
    # rolling_back lasts as long as two downgrades here, often less than one read (0.1 s).
    assert sum(line == f"run {run_id} [{name}]: rolling_back" for line in lines) <= 1, text
    assert lines[-2].startswith(f"run {run_id} rolled_back: base -> r3"), text
    assert "division by zero" in lines[-1], text

    # The backfill's progress: while it runs, one line at most every 5 s; its end at once.
    progress = [(when, line) for when, line in heard if line.startswith("    backfill ")]
    running = [when for when, line in progress if " running: " in line]
    assert running, text
    assert all(b - a >= 4.5 for a, b in zip(running, running[1:], strict=False)), text
    assert f"succeeded: {ROWS} of {ROWS} rows (exact count)" in progress[-1][1], text

    # Watching reads the ledger as status does: psycopg2, no SQLAlchemy (rich draws it).
    proc, names = status_imports(config, run_id, "--watch")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"run {run_id} rolled_back: base -> r3" in proc.stderr
    assert "psycopg2" in names and sorted(names & set(NOT_FOR_STATUS)) == []
