"""What Flower shows of a task: the readable line first, fields that do not contradict the
badge (worker/flower_lines.py), and the format_task hook that lays them out
(worker/flower_config.py). The live check in a browser: tests/integration/test_flower_browser.py."""

from __future__ import annotations

from typing import Any

from celery.utils.saferepr import saferepr

from worker import flower_config, flower_lines


def progress(**changes: Any) -> dict[str, Any]:
    """A backfill's progress as jobs/ledger/records.py backfill_progress returns it."""
    info: dict[str, Any] = {
        "backfill_id": "3f2a9c1d00aa11bb",
        "target": "orders_db",
        "state": "running",
        "rows_done": 2_333_889,
        "rows_total": 3_000_000,
        "estimate": "counted",
        "percent": 77.8,
        "rate_rows_s": 383_210,
        "eta_s": 2,
        "throttling": None,
        "pause_reason": None,
        "error": None,
        "slices": [{"slice": 0, "state": "active", "cursor": "10", "rows_done": 2_333_889}],
    }
    return {**info, **changes}


class Shown:
    """A stand-in for the copy of celery.events.state.Task that Flower passes its hook: only
    ``result`` is read and written."""

    def __init__(self, result: Any) -> None:
        self.result = result


def test_the_backfill_line_reads_as_the_issue_asks() -> None:
    assert flower_lines.backfill_line(progress()) == (
        "backfill 3f2a9c1d00aa11bb on orders_db: 2,333,889 / 3,000,000 rows (77.8%), "
        "383k rows/s, ETA 2 s"
    )


def test_a_planner_total_is_marked_and_a_stopped_backfill_says_so() -> None:
    line = flower_lines.backfill_line(
        progress(estimate="planner", state="paused", eta_s=None, pause_reason="operator")
    )
    assert line.startswith("backfill 3f2a9c1d00aa11bb on orders_db: paused, 2,333,889 / ~3,000")
    assert line.endswith("paused: operator")


def test_units() -> None:
    assert [flower_lines.rate(r) for r in (950, 4_500, 383_210, 1_250_000)] == [
        "950",
        "4.5k",
        "383k",
        "1.2M",
    ]
    assert [flower_lines.seconds(s) for s in (2, 250, 3_900)] == ["2 s", "4 min 10 s", "1 h 05 min"]


def test_a_handed_on_slice_says_so_and_keeps_the_backfill_state_apart() -> None:
    result = flower_lines.slice_result({**progress(), "slice": 1, "outcome": "continue"})
    assert list(result)[:2] == ["line", "outcome"]
    assert result["outcome"] == "handed on to the next slice task"
    assert result["line"].endswith("; slice 1 handed on to the next slice task")
    assert "state" not in result and result["backfill_state"] == "running"


def test_the_slice_that_finished_the_backfill() -> None:
    done = progress(state="succeeded", rows_done=3_000_000, percent=100.0, eta_s=None)
    result = flower_lines.slice_result({**done, "slice": 0, "outcome": "succeeded"})
    assert result["line"] == (
        "backfill 3f2a9c1d00aa11bb on orders_db: succeeded, 3,000,000 / 3,000,000 rows "
        "(100.0%), 383k rows/s; slice 0 settled the backfill: succeeded"
    )


def test_the_run_line() -> None:
    info = {
        "run_id": "9c1d77",
        "target": "prod",
        "state": "running",
        "step": "upgrade",
        "revision": "a1b2c3",
        "revision_no": 3,
        "revisions": 7,
        "step_state": "running",
        "elapsed_s": 12.2,
    }
    shown = flower_lines.run_progress(info)
    assert shown["line"] == "run 9c1d77 on prod: upgrade 3 of 7 (a1b2c3), 12 s"
    assert shown["run_state"] == "running" and "state" not in shown
    backup = flower_lines.run_progress(
        {**info, "step": "backup", "revision": None, "revision_no": None}
    )
    assert backup["line"] == "run 9c1d77 on prod: backup, 12 s"


def test_a_run_that_waits_for_its_backfill_does_not_say_running_beside_success() -> None:
    result = flower_lines.run_result(
        {"run_id": "9c1d77", "target": "prod", "state": "running", "note": "waits for backfill"}
    )
    assert "state" not in result and result["run_state"] == "running"
    assert result["outcome"] == "waits for backfill"
    assert result["line"] == "run 9c1d77 on prod: running (waits for backfill)"


def test_format_task_puts_the_line_first_and_each_field_on_its_own_line() -> None:
    live = flower_lines.slice_progress({**progress(), "slice": 0})
    task = flower_config.format_task(Shown(saferepr(live, 8192)))
    first, line, blank, *fields = task.result.splitlines()
    assert first == "2,333,889 / 3,000,000 rows (77.8%), 383k rows/s, ETA 2 s"
    assert line == flower_lines.backfill_line(progress()) and blank == ""
    assert "rows_done: 2333889" in fields and "backfill_state: running" in fields
    assert not any(f.startswith("state:") for f in fields)


def test_format_task_collapses_a_hand_off_to_its_line() -> None:
    handed = flower_lines.slice_result({**progress(), "slice": 0, "outcome": "continue"})
    task = flower_config.format_task(Shown(saferepr(handed, 8192)))
    assert task.result.splitlines() == [
        "handed on at 2,333,889 / 3,000,000 rows (77.8%), 383k rows/s, ETA 2 s",
        handed["line"],
    ]


def test_format_task_reads_a_result_celery_cut_short_and_leaves_others_alone() -> None:
    live = flower_lines.slice_progress({**progress(), "slice": 0})
    cut = saferepr(live, 8192)[:200]
    assert flower_config.format_task(Shown(cut)).result.splitlines()[1] == live["line"]
    for other in ("42", "{'a': 1}", None, "{'line': "):
        assert flower_config.format_task(Shown(other)).result == other
