"""Flower as a person sees it: `runbook flower` and a real headless Chromium, during a backfill
started with the installed `runbook backfill`.

The Tasks page fills its table with an ajax request after load, so Chromium is given virtual
time (``--virtual-time-budget``) before it dumps the DOM or takes the screenshot; basic auth
goes in the URL (http://user:password@host/...), which Chromium also uses for that request.
What is asserted is the page's text, tags stripped: the backfill id, the target, rows done and
a percent. It saves the screenshots (README's Flower section shows one: see SCREENSHOTS).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from jobs import api
from tests.integration.conftest import (
    FLOWER_PASSWORD,
    FLOWER_USER,
    REPO,
    RUNBOOK,
    Config,
    Databases,
    Flower,
    Worker,
    db_url,
    gated_target,
    missing,
    open_gate,
    query,
    runbook_cli,
)

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
# Where the screenshots go: a test's run leaves the source tree alone unless asked to
# refresh README's pictures (RUNBOOK_SCREENSHOTS=docs/screenshots, on a quiet machine: Flower
# lists every task on the broker, other test sessions' too).
SCREENSHOTS = Path(os.environ.get("RUNBOOK_SCREENSHOTS", "/tmp/runbook-screenshots"))
if not SCREENSHOTS.is_absolute():
    SCREENSHOTS = REPO / SCREENSHOTS
SLICE_TASK = "runbook.backfill_slice"
# 3 ms a row at least (pg_sleep sleeps no less than asked, on a quiet machine too) in batches
# of 100: 18 s of backfill at least, six slice tasks or more (15 s was once too short for
# Chromium's looks under the other test process's load: the backfill had ended before the
# Tasks page was read; 1 ms a row asked, 7,500 rows, took 25 s loaded and 17 s quiet).
ROWS = 6000
PERCENT = re.compile(r"\(\d{1,3}(\.\d)?%\)")
ROWS_DONE = re.compile(r"\b\d{1,3}(,\d{3})* / [~]?\d{1,3}(,\d{3})* rows\b")


class RunbookFlower(Flower):
    """Flower as `runbook flower` starts it: runbook's columns and format_task, basic auth
    from FLOWER_BASIC_AUTH, persistent in ``db``."""

    def __init__(self, log_path: Path, db: Path) -> None:
        super().__init__(log_path)
        self.db = db

    def command(self) -> list[str]:
        return [
            RUNBOOK,
            "flower",
            "--address",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--db",
            str(self.db),
        ]

    def start(self, timeout_s: float = 30, **env_extra: str) -> None:
        super().start(timeout_s, FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{FLOWER_PASSWORD}", **env_extra)

    def url(self, path: str) -> str:
        return f"http://{FLOWER_USER}:{FLOWER_PASSWORD}@127.0.0.1:{self.port}{path}"


class Text(HTMLParser):
    """A page's visible text: what is left of the DOM without tags, scripts and styles."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in {"script", "style"}:
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in {"script", "style"} and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def page_text(html: str) -> str:
    parser = Text()
    parser.feed(html)
    return "\n".join(parser.parts)


def chromium(profile: Path, *args: str) -> subprocess.Popen[str]:
    """One headless Chromium (a profile of its own: several may run at once), started."""
    return subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",  # root in CI containers
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--window-size=1400,900",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def look(flower: RunbookFlower, tmp_path: Path, path: str, screenshot: Path) -> str:
    """The page's text as Chromium renders it, and its screenshot, taken at the same time
    (a slice task's page changes within seconds)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    dump = chromium(tmp_path / "profile-dom", "--dump-dom", flower.url(path))
    shot = chromium(tmp_path / "profile-shot", f"--screenshot={screenshot}", flower.url(path))
    html, dump_err = dump.communicate(timeout=60)
    _, shot_err = shot.communicate(timeout=60)
    assert dump.returncode == 0, dump_err[-2000:]
    assert shot.returncode == 0, shot_err[-2000:]
    assert screenshot.stat().st_size > 10_000, f"{screenshot} looks empty"
    return page_text(html)


@pytest.fixture
def browser() -> str:
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        missing(f"no Chromium at {CHROMIUM}; `make browser` installs it (Debian's chromium)")
    return CHROMIUM


@pytest.fixture
def board(worker: Worker, tmp_path: Path) -> Any:
    f = RunbookFlower(tmp_path / "flower.log", tmp_path / "state" / "flower.db")
    f.db.parent.mkdir()
    try:
        f.start()
        yield f
    finally:
        f.stop()
        print(f.report())
        print(f"--- worker log (tail) ---\n{worker.log_text()[-3000:]}")


def slow_table(config: Config, databases: Databases) -> tuple[str, str]:
    dbname = databases.create()
    query(
        dbname,
        f"""
        CREATE TABLE orders (id bigint PRIMARY KEY, counter int NOT NULL DEFAULT 0, note text);
        INSERT INTO orders (id) SELECT g * 7 FROM generate_series(1, {ROWS}) g;
        CREATE FUNCTION slow_one() RETURNS int LANGUAGE sql AS 'SELECT 1 FROM pg_sleep(0.003)';
        ANALYZE orders;
        """,
    )
    # A short name, as targets are: the screenshot shows it.
    return config.add(f"shop_{dbname.rsplit('_', 1)[-1]}", url=db_url(dbname), backup=False), dbname


def test_flower_in_chromium_shows_backfill_progress_on_the_tasks_and_task_pages(
    browser: str, board: RunbookFlower, config: Config, databases: Databases, tmp_path: Path
) -> None:
    target, dbname = slow_table(config, databases)
    started = runbook_cli(
        "backfill",
        "--target",
        target,
        "--table",
        "orders",
        "--set",
        "counter = counter + slow_one(), note = 'seen'",
        "--where",
        "note IS NULL",
        "--batch-size",
        "100",
    )
    assert started.returncode == 0, started.stderr
    backfill_id = started.stdout.strip().splitlines()[-1]

    def live_task() -> str | None:
        """The slice task that started last, once it reports progress: the most time left."""
        listed = board.json(f"/api/tasks?taskname={SLICE_TASK}")
        running = [
            (task["started"] or 0, str(tid))
            for tid, task in listed.items()
            if backfill_id in (task.get("args") or "")
            and task["state"] == "PROGRESS"
            and "'rows_done': 0," not in (task.get("result") or "'rows_done': 0,")
        ]
        return max(running)[1] if running else None

    live = board.until("a slice task of the backfill in PROGRESS", live_task, time.monotonic() + 30)

    # One slice task's page while it runs (a task hands on after 3 s: look again at the
    # next one if this one ended meanwhile): the line first, the fields after it, no
    # 'state' beside the badge.
    for _ in range(5):
        task_text = look(board, tmp_path, f"/task/{live}", SCREENSHOTS / "flower-task.png")
        if "PROGRESS" in task_text.splitlines():
            break
        live = board.until("a slice task in PROGRESS", live_task, time.monotonic() + 30)
    else:
        pytest.fail(f"no slice task's page seen in PROGRESS:\n{task_text[:3000]}")
    assert backfill_id in task_text and target in task_text, task_text[:3000]
    arguments, line = [x for x in task_text.splitlines() if x.startswith(f"backfill {backfill_id}")]
    assert f"on {target}, slice 0 keys (" in arguments, arguments  # its label
    assert f"on {target}: " in line and ROWS_DONE.search(line) and PERCENT.search(line), line
    assert "rows_done: " in task_text and "backfill_state: " in task_text, task_text[:3000]
    assert "\nstate: " not in task_text, task_text[:3000]

    # The Tasks page: args and result as columns, the progress line readable in the row.
    # Looked at during a hand-off (a slice task's first ~0.2 s, before its first batch), the
    # newest row is STARTED: look again, as a person would a moment later.
    for looks in range(1, 6):  # noqa: B007 (printed after the loop)
        tasks_text = look(board, tmp_path, "/tasks", SCREENSHOTS / "flower-tasks.png")
        assert api.backfill_status(backfill_id, target)["state"] == "running", "looked too late"
        if "PROGRESS" in tasks_text.splitlines():
            break
    print(f"the Tasks page showed a PROGRESS row at look {looks}")
    assert "PROGRESS" in tasks_text.splitlines(), tasks_text[:3000]
    for header in ("args", "Result", "State"):
        assert header in tasks_text.splitlines(), tasks_text[:2000]
    row = [line for line in tasks_text.splitlines() if line.startswith(f"backfill {backfill_id}")]
    assert row, f"no line of backfill {backfill_id} on the Tasks page:\n{tasks_text[:3000]}"
    assert any(f"on {target}" in line for line in row), row
    progress = [line for line in row if ROWS_DONE.search(line) and PERCENT.search(line)]
    assert progress, f"no rows done and percent on the Tasks page: {row}"

    # To the end: every slice task settles SUCCESS, saying what it did; none says it runs.
    until_done = time.monotonic() + 60
    while api.backfill_status(backfill_id, target)["state"] != "succeeded":
        assert time.monotonic() < until_done, api.backfill_status(backfill_id, target)
        time.sleep(0.2)

    def settled() -> dict[str, Any] | None:
        listed = board.json(f"/api/tasks?taskname={SLICE_TASK}")
        ours = {t: v for t, v in listed.items() if backfill_id in (v.get("args") or "")}
        return ours if ours and all(v["state"] == "SUCCESS" for v in ours.values()) else None

    tasks = board.until("every slice task SUCCESS", settled, time.monotonic() + 30)
    assert len(tasks) >= 2, tasks
    results = {tid: ast.literal_eval(t["result"]) for tid, t in tasks.items()}
    for result in results.values():
        assert "state" not in result, result
        assert result["line"].startswith(f"backfill {backfill_id} on {target}: "), result
    outcomes = sorted(r["outcome"] for r in results.values())
    assert outcomes.count("handed on to the next slice task") == len(tasks) - 1, outcomes
    last = [r for r in results.values() if r["outcome"] != "handed on to the next slice task"]
    assert last[0]["backfill_state"] == "succeeded" and last[0]["percent"] == 100.0, last
    assert f"{ROWS:,} / {ROWS:,} rows (100.0%)" in last[0]["line"], last[0]["line"]
    assert query(dbname, "SELECT count(*), min(counter), max(counter) FROM orders") == [
        (ROWS, 1, 1)
    ]

    # Persistence: a restarted Flower still lists the backfill's tasks.
    board.stop()
    board.start()
    again = board.json(f"/api/tasks?taskname={SLICE_TASK}")
    assert set(tasks) <= set(again), "Flower forgot the backfill's tasks on restart"


def test_a_runs_task_page_shows_its_step_line_in_chromium(
    browser: str, board: RunbookFlower, config: Config, databases: Databases, tmp_path: Path
) -> None:
    target, dbname = gated_target(config, databases, tmp_path)  # its upgrade waits for a gate
    out = runbook_cli("apply", "--target", target)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    try:

        def upgrading() -> str | None:
            listed = board.json("/api/tasks?taskname=runbook.execute_run")
            for tid, task in listed.items():
                if run_id in (task.get("args") or "") and "'step': 'upgrade'" in (
                    task.get("result") or ""
                ):
                    return str(tid)
            return None

        tid = board.until("the run's upgrade in Flower", upgrading, time.monotonic() + 60)
        html = chromium(tmp_path / "profile-run", "--dump-dom", board.url(f"/task/{tid}"))
        text = page_text(html.communicate(timeout=60)[0])
        assert "PROGRESS" in text.splitlines(), text[:3000]
        lines = [x for x in text.splitlines() if x.startswith(f"run {run_id} on {target}: ")]
        assert lines and re.fullmatch(
            rf"run {run_id} on {target}: upgrade 1 of 1 \(g1\), \d+ s", lines[0]
        ), text[:3000]
        assert "run_state: running" in text and "\nstate: " not in text, text[:3000]
    finally:
        open_gate(dbname)
    assert api.wait(run_id, target, timeout_s=60)["state"] == "succeeded"


def test_runbook_flower_refuses_to_start_without_basic_auth(tmp_path: Path) -> None:
    env = {"FLOWER_BASIC_AUTH": ""}
    for value in ("", "ops", ":pw", "ops:"):
        env["FLOWER_BASIC_AUTH"] = value
        out = runbook_cli("flower", "--port", "1", "--db", str(tmp_path / "f.db"), env=env)
        assert out.returncode == 2, (value, out.stderr)
        (line,) = out.stderr.splitlines()
        assert "FLOWER_BASIC_AUTH" in line and "user:password" in line, line
        assert "Traceback" not in out.stderr
    assert not list(tmp_path.iterdir()), "nothing may be created"
