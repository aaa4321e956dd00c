"""What the CLI prints: step and backfill lines, durations, summaries, one-line errors."""

from __future__ import annotations

from collections.abc import Callable

import click
import pytest

from jobs.cli import render
from jobs.cli.render import step_line as _step_line
from jobs.config import normalize_url
from jobs.errors import UnknownTarget


def step(**fields: object) -> dict[str, object]:
    return {"kind": "upgrade", "revision": "r1", "state": "succeeded", "attempts": 1, **fields}


def test_a_failed_step_whose_error_names_it_is_said_once() -> None:
    failed = step(state="failed", error="upgrade r1 failed: ZeroDivisionError: division by zero")
    assert _step_line(failed) == "upgrade r1 failed: ZeroDivisionError: division by zero"


def test_other_errors_follow_the_step() -> None:
    failed = step(kind="verify", state="failed", error="health check returned 503")
    assert _step_line(failed) == "verify r1 failed: health check returned 503"
    assert _step_line(step(attempts=3)) == "upgrade r1 succeeded (attempt 3)"
    assert _step_line(step(error="ignored unless failed")) == "upgrade r1 succeeded"


def test_durations_are_minutes_and_seconds_or_hours_and_minutes() -> None:
    assert render.duration(0) == "0m00s"
    assert render.duration(59.6) == "1m00s"  # rounded to the second first
    assert render.duration(754) == "12m34s"
    assert render.duration(3600) == "1h00m"
    assert render.duration(7 * 3600 + 5 * 60 + 59) == "7h05m"


def progress(**fields: object) -> dict[str, object]:
    """A backfill's progress as jobs/backfill/slices.py `progress` returns it."""
    now: dict[str, object] = {
        "backfill_id": "bf1",
        "table": "items",
        "set": "v = 1",
        "where": None,
        "state": "running",
        "rows_done": 1500,
        "rows_total": 6000,
        "estimate": "counted",
        "percent": None,
        "rate_rows_s": None,
        "eta_s": None,
        "throttled_s": 0.0,
        "throttle": None,
        "throttling": None,
        "throttling_s": None,
        "pause_reason": None,
        "replica_note": None,
        "skipped": 0,
        "slices": [{"slice": 0, "state": "active"}],
    }
    return {**now, **fields}


def test_a_backfill_line_says_only_what_is_known() -> None:
    assert render.backfill_line(progress()) == ("backfill bf1 running: 1500 of 6000 rows (counted)")


def test_a_backfill_line_with_everything() -> None:
    line = render.backfill_line(
        progress(
            percent=25.0,
            rate_rows_s=812,
            eta_s=5.5,
            throttled_s=62.4,
            throttle="a transaction 30 s old holds back vacuum",
            skipped=3,
            slices=[{"state": "done"}, {"state": "active"}, {"state": "done"}],
        )
    )
    assert line == (
        "backfill bf1 running: 1500 of 6000 rows (counted), 25.0%, 812 rows/s, ETA 0m06s, "
        "throttled 1m02s (last: a transaction 30 s old holds back vacuum), 3 rows skipped, "
        "slices 2/3 done"
    )


def test_a_backfill_line_says_what_holds_it_now_and_why_it_paused() -> None:
    waiting = render.backfill_line(
        progress(
            throttling="replica lag 3.4 s on standby1 (max_replica_lag 2 s)",
            throttling_s=12.0,
            throttled_s=12.0,
            throttle="replica lag 3.4 s on standby1 (max_replica_lag 2 s)",
            replica_note="standby standby2 gone from pg_stat_replication: not waited for",
        )
    )
    assert waiting == (
        "backfill bf1 running: 1500 of 6000 rows (counted), waiting: replica lag 3.4 s on "
        "standby1 (max_replica_lag 2 s) (0m12s), throttled 0m12s (last: replica lag 3.4 s on "
        "standby1 (max_replica_lag 2 s)), standby standby2 gone from pg_stat_replication: "
        "not waited for"
    )
    paused = render.backfill_line(
        progress(
            state="paused", pause_reason="replica lag 3.4 s on standby1 for 30 min (max_throttle)"
        )
    )
    assert paused == (
        "backfill bf1 paused: 1500 of 6000 rows (counted), paused: replica lag 3.4 s on "
        "standby1 for 30 min (max_throttle)"
    )


def test_the_statement_is_the_update_as_the_ledger_holds_it() -> None:
    assert render.statement(progress()) == "UPDATE items SET v = 1"
    assert render.statement(progress(where="v IS NULL AND id > 0")) == (
        "UPDATE items SET v = 1 WHERE v IS NULL AND id > 0"
    )


def exit_of(fn: Callable[[], object]) -> int:
    with pytest.raises(SystemExit) as exited:
        render.friendly(fn)()
    assert isinstance(exited.value.code, int)
    return exited.value.code


def test_friendly_turns_every_error_into_one_line_and_an_exit_code(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNBOOK_DEBUG", raising=False)
    normalize_url("postgresql://app:pw-in-error@h/db")  # a known secret from now on

    def refused() -> None:
        raise UnknownTarget("no target 'prod' (pw-in-error)")

    def interrupted() -> None:
        raise KeyboardInterrupt

    def broken() -> None:
        raise ValueError("bad pw-in-error\nand a second line")

    assert exit_of(refused) == UnknownTarget.exit_code
    assert capsys.readouterr().err == "runbook: error: no target 'prod' (***)\n"
    assert exit_of(interrupted) == 130
    assert capsys.readouterr().err == "runbook: interrupted\n"
    assert exit_of(broken) == 1
    assert capsys.readouterr().err == (
        "runbook: internal error: ValueError: bad *** (set RUNBOOK_DEBUG=1 for a traceback)\n"
    )
    assert render.friendly(lambda: "fine")() == "fine"
    monkeypatch.setenv("RUNBOOK_DEBUG", "1")
    with pytest.raises(ValueError, match="bad pw-in-error"):
        render.friendly(broken)()


def run(**fields: object) -> dict[str, object]:
    """A run as jobs/api/runs.py reports it."""
    now: dict[str, object] = {
        "id": "0123abcd",
        "target": "prod",
        "state": "running",
        "from_revision": None,
        "to_revision": "r2",
        "current_revision": "r1",
        "backup": None,
        "error": None,
        "steps": [],
    }
    return {**now, **fields}


def test_the_summary_names_the_revisions_the_backup_and_the_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    render.summary(run(state="succeeded", current_revision="r2"))
    render.summary(
        run(
            state="rolled_back",
            from_revision="r1",
            to_revision=None,
            current_revision=None,
            backup={"path": "/b/prod.dump", "size": 2048, "sha256": "0123456789abcdef" * 4},
            error="upgrade r2 failed: division by zero",
        )
    )
    assert capsys.readouterr().err.splitlines() == [
        "run 0123abcd succeeded: base -> r2 (now at r2)",
        "run 0123abcd rolled_back: r1 -> base (now at base)",
        "  backup /b/prod.dump (2048 bytes, sha256 0123456789ab…)",
        "  error: upgrade r2 failed: division by zero",
    ]


def test_step_notes_show_the_standbys_preflight_saw_and_the_wait_after_a_rewrite() -> None:
    seen = {
        "standbys": [{"name": "standby1"}],
        "slots": [],
        "lines": ["standby standby1: streaming, lag 0.0 s, 0 B behind"],
    }
    preflight = step(kind="preflight", revision="", detail={"replication": seen})
    assert render.step_notes(preflight) == [
        "preflight: standby standby1: streaming, lag 0.0 s, 0 B behind"
    ]
    none = {"standbys": [], "slots": [], "lines": ["no standbys or replication slots"]}
    assert render.step_notes(step(kind="preflight", detail={"replication": none})) == []
    waiting = step(state="running", detail={"replica_wait": {"outcome": "waiting", "reason": "x"}})
    assert render.step_notes(waiting) == ["upgrade r1: waiting for the standbys to replay: x"]
    done = {"outcome": "caught_up", "line": "waited 3.2 s for standby1 to replay"}
    assert render.step_notes(step(detail={"replica_wait": done})) == [
        "upgrade r1: waited 3.2 s for standby1 to replay"
    ]
    assert render.step_notes(step()) == []
    nothing = {"outcome": "no_standbys", "line": "rewrote a table; no standbys to wait for"}
    assert render.step_notes(step(detail={"replica_wait": nothing})) == []  # in --json only


def test_a_commands_own_usage_error_reaches_main_as_bad_input() -> None:
    """main() prints a click.UsageError in one line with exit 2; friendly must not turn the
    ones a command raises itself (rollback ROLLOUT --to x) into an internal error."""

    def mixed() -> None:
        raise click.UsageError("a ROLLOUT is rolled back as a whole: drop --to and --target")

    with pytest.raises(click.UsageError, match="drop --to"):
        render.friendly(mixed)()
