"""What the CLI prints for a step: its failure said once."""

from __future__ import annotations

from jobs.cli.render import step_line as _step_line


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
