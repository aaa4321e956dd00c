"""A run as its watch draws it (jobs/cli/render_run.py): the live table's text on a
recording console, and the lines a log gets, one per change."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console

from jobs.cli import render_run
from jobs.cli.render import backfill_line
from tests.unit.cli.test_render import progress as render_progress

T0 = datetime(2026, 1, 5, 9, 0, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def step(
    kind: str, revision: str | None, state: str, start: float, end: float | None, **more: Any
) -> dict[str, Any]:
    """A step as jobs/ledger/records.py ``Step.as_dict`` gives it."""
    return {
        "kind": kind,
        "revision": revision,
        "state": state,
        "started_at": at(start),
        "finished_at": None if end is None else at(end),
        "attempts": 1,
        "error": None,
        "detail": {},
        **more,
    }


def progress(**fields: Any) -> dict[str, Any]:
    """A backfill half done (tests/unit/cli/test_render.py's, as the run's watch reads it)."""
    half = {"backfill_id": "bf01", "rows_total": 3000, "percent": 50.0, "rate_rows_s": 900}
    return {**render_progress(**half), "error": None, **fields}


def watch(
    state: str = "running", steps: list[dict[str, Any]] | None = None, **more: Any
) -> dict[str, Any]:
    """A snapshot as jobs/api/runs.py ``follow_run`` yields it."""
    run = {
        "id": "0123abcd",
        "target": "prod",
        "state": state,
        "from_revision": None,
        "to_revision": "r2",
        "current_revision": "r1",
        "created_at": at(0),
        "started_at": at(0),
        "finished_at": None,
        "steps": steps or [],
        "error": None,
        "backup": None,
    }
    return {"run": {**run, **more.pop("run", {})}, "backfills": {}, "clock_offset_s": 0.0, **more}


def text_of(renderable: Any, width: int = 160) -> str:
    console = Console(record=True, width=width, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def rows(screen: str) -> dict[str, list[str]]:
    """The table's rows by their first cell: the cells' text, stripped."""
    found = {}
    for line in screen.splitlines():
        line = line.strip()
        if not (line.startswith("│") and line.endswith("│")):
            continue
        cells = [c.strip() for c in line[1:-1].split("│")]
        if len(cells) >= 4 and cells[0]:
            found[f"{cells[0]} {cells[1]}".strip()] = cells
    return found


def test_the_table_has_each_step_with_its_state_and_time_and_the_running_one_ticks() -> None:
    snapshot = watch(
        steps=[
            step("preflight", None, "succeeded", 0.0, 0.2),
            step("backup", None, "succeeded", 0.2, 1.5),
            step("upgrade", "r1", "running", 1.5, None),
        ]
    )
    screen = text_of(render_run.run_view(snapshot, T0 + timedelta(seconds=3.0)))
    assert screen.splitlines()[0] == "run 0123abcd [prod] running: base -> r2 (now at r1), 3.0s"
    table = rows(screen)
    assert table["preflight"][1:4] == ["", "succeeded", "0.2s"]
    assert table["backup"][1:4] == ["", "succeeded", "1.3s"]
    assert table["upgrade r1"][1:4] == ["r1", "running", "1.5s"]
    later = rows(text_of(render_run.run_view(snapshot, T0 + timedelta(seconds=4.2))))
    assert later["upgrade r1"][3] == "2.7s"
    assert later["backup"][3] == "1.3s"  # a finished step's time stays


def test_a_backfill_step_shows_its_backfills_bar_and_line() -> None:
    bf = progress()
    snapshot = watch(
        steps=[
            step("upgrade", "r1", "succeeded", 0.0, 0.5),
            step("backfill", "r1", "running", 0.5, None, detail={"backfills": ["bf01"]}),
        ],
        backfills={"bf01": bf},
    )
    screen = text_of(render_run.run_view(snapshot, T0 + timedelta(seconds=2.0)), width=240)
    (line,) = [line for line in screen.splitlines() if "bf01" in line]
    assert line.split("│")[1].strip() == "backfill"
    assert backfill_line(bf) in line and "━" * 15 in line
    assert drawn(render_run.backfill_bar(bf)) == (15, 15)  # half of it done


def drawn(bar: Any) -> tuple[int, int]:
    """Cells of a bar drawn done and left to do (rich's styles bar.complete or bar.finished
    for a full bar, bar.back)."""
    console = Console(width=80, color_system="truecolor", file=io.StringIO())
    done = {console.get_style("bar.complete"), console.get_style("bar.finished")}
    cells = {True: 0, False: 0}
    for segment in console.render(bar):
        if segment.text.strip():
            cells[segment.style in done] += len(segment.text)
    return cells[True], cells[False]


def test_a_finished_backfill_fills_its_bar_even_when_the_estimate_was_short() -> None:
    bf = progress(state="succeeded", rows_done=3100, rows_total=3000, percent=100.0)
    assert drawn(render_run.backfill_bar(bf)) == (render_run.BAR_WIDTH, 0)


def test_a_failed_step_shows_its_error_and_notes_without_repeating_the_step() -> None:
    wait = {"outcome": "caught_up", "line": "waited 3.2 s for standby1 to replay"}
    snapshot = watch(
        state="rolled_back",
        run={"finished_at": at(9.0), "error": "verify r2 failed: health check returned 503"},
        steps=[
            step("upgrade", "r2", "succeeded", 0.0, 2.0, detail={"replica_wait": wait}),
            step("verify", "r2", "failed", 2.0, 2.4, error="health check returned 503"),
            step("downgrade", "r2", "succeeded", 2.4, 9.0, attempts=2),
        ],
    )
    screen = text_of(render_run.run_view(snapshot, T0 + timedelta(hours=1)))
    assert "rolled_back" in screen.splitlines()[0] and screen.splitlines()[0].endswith(", 9.0s")
    table = rows(screen)
    assert table["verify r2"][2:] == ["failed", "0.4s", "health check returned 503"]
    assert table["upgrade r2"][4] == "waited 3.2 s for standby1 to replay"
    assert table["downgrade r2"][2:4] == ["succeeded (attempt 2)", "6.6s"]


def test_a_run_no_worker_took_yet_says_so() -> None:
    screen = text_of(
        render_run.run_view(
            watch(state="enqueued", run={"started_at": None}), T0 + timedelta(seconds=1)
        )
    )
    assert "run 0123abcd [prod] enqueued" in screen
    assert "waiting for a worker to start the run" in screen


def test_the_live_view_draws_at_the_moment_of_each_redraw_on_the_databases_clock() -> None:
    moments = iter([T0 + timedelta(seconds=2), T0 + timedelta(seconds=3)])
    view = render_run.LiveRun(clock=lambda: next(moments))
    assert text_of(view) == ""  # nothing read yet
    view.update(watch(steps=[step("upgrade", "r1", "running", 1.0, None)], clock_offset_s=-0.5))
    assert rows(text_of(view))["upgrade r1"][3] == "0.5s"
    assert rows(text_of(view))["upgrade r1"][3] == "1.5s"


def test_times_are_tenths_under_a_minute_then_minutes() -> None:
    assert render_run.took(0.04) == "0.0s"
    assert render_run.took(-1) == "0.0s"  # a client clock ahead of the database's
    assert render_run.took(59.9) == "59.9s"
    assert render_run.took(59.96) == "1m00s"
    assert render_run.took(754) == "12m34s"


def test_a_log_gets_one_line_per_change_of_a_step_or_the_run() -> None:
    lines = render_run.RunLines()
    running = step("upgrade", "r1", "running", 0.0, None)
    assert lines(watch(steps=[running])) == ["  upgrade r1 running", "run 0123abcd [prod]: running"]
    assert lines(watch(steps=[running])) == []  # nothing new
    done = step("upgrade", "r1", "succeeded", 0.0, 2.0)
    again = step("upgrade", "r2", "running", 2.0, None, attempts=2)
    assert lines(watch(steps=[done, again])) == [
        "  upgrade r1 succeeded (2.0s)",
        "  upgrade r2 running (attempt 2)",
    ]
    failed = step("upgrade", "r2", "failed", 2.0, 2.5, attempts=2, error="boom")
    assert lines(watch(state="rolling_back", steps=[done, failed])) == [
        "  upgrade r2 failed (attempt 2): boom (0.5s)",
        "run 0123abcd [prod]: rolling_back",
    ]


def test_a_backfills_progress_is_logged_on_a_state_change_and_else_every_few_seconds() -> None:
    clock = [100.0]
    lines = render_run.RunLines(every_s=5.0, clock=lambda: clock[0])
    bf_step = step("backfill", "r1", "running", 0.0, None, detail={"backfills": ["bf01"]})

    def seen(**fields: Any) -> list[str]:
        return lines(watch(steps=[bf_step], backfills={"bf01": progress(**fields)}))

    first = seen(rows_done=10)
    assert first == [
        "  backfill r1 running",
        f"    {backfill_line(progress(rows_done=10))}",
        "run 0123abcd [prod]: running",
    ]
    clock[0] = 104.9
    assert seen(rows_done=900) == []  # too soon
    clock[0] = 105.0
    assert seen(rows_done=1000) == [f"    {backfill_line(progress(rows_done=1000))}"]
    clock[0] = 105.5
    assert seen(rows_done=1000) == []  # unchanged
    paused = seen(rows_done=1100, state="paused", pause_reason="replica lag")
    assert paused == [
        f"    {backfill_line(progress(rows_done=1100, state='paused', pause_reason='replica lag'))}"
    ]
    clock[0] = 105.6
    assert seen(rows_done=1100, state="running") != []  # resumed: its state changed
    clock[0] = 106.0
    assert seen(rows_done=3000, state="succeeded") != []  # and ended, at once


def test_a_long_run_folds_its_earliest_steps_into_one_row_to_fit_the_terminal() -> None:
    steps = [step("upgrade", f"r{i}", "succeeded", i, i + 1.0) for i in range(1, 30)]
    steps.append(step("upgrade", "r30", "running", 30.0, None))
    snapshot = watch(steps=steps)
    table = rows(text_of(render_run.run_view(snapshot, T0 + timedelta(seconds=31), max_rows=5)))
    assert list(table) == [
        "… 26 earlier steps",
        "upgrade r27",
        "upgrade r28",
        "upgrade r29",
        "upgrade r30",
    ]
    assert table["… 26 earlier steps"][2] == "26 succeeded"
    assert table["upgrade r30"][2:4] == ["running", "1.0s"]
    # On a terminal the view asks for what fits: 12 lines, 5 for the frame, 2 for a backfill.
    console = Console(record=True, width=160, height=12, color_system=None, file=io.StringIO())
    view = render_run.LiveRun(clock=lambda: T0 + timedelta(seconds=31))
    view.update(snapshot)
    console.print(view)
    assert len(rows(console.export_text())) == 5
    assert len(console.export_text().splitlines()) <= 12
