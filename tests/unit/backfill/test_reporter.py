"""The progress reporter's thread: one report per interval however often it is nudged, none
without a nudge, a failing report logged and the next one made, and nothing after the block."""

from __future__ import annotations

import threading
import time

import pytest

from jobs.backfill.reporter import ProgressReporter


def test_nudges_within_an_interval_are_one_report() -> None:
    calls: list[float] = []
    with ProgressReporter(lambda: calls.append(time.monotonic()), 0.2, "t") as reporter:
        deadline = time.monotonic() + 0.7
        while time.monotonic() < deadline:
            reporter.nudge()
            time.sleep(0.005)
        time.sleep(0.3)  # the last nudges' report
    assert 3 <= len(calls) <= 5, calls
    assert all(b - a >= 0.19 for a, b in zip(calls, calls[1:], strict=False)), calls


def test_no_report_without_a_nudge_and_none_after_the_block() -> None:
    calls: list[float] = []
    with ProgressReporter(lambda: calls.append(time.monotonic()), 0.05, "t"):
        time.sleep(0.2)
    assert calls == []
    with ProgressReporter(lambda: calls.append(time.monotonic()), 10.0, "t") as reporter:
        reporter.nudge()
        time.sleep(0.1)
        reporter.nudge()  # its report would be 10 s away: the block ends first
    ended = time.monotonic()
    assert len(calls) == 1 and time.monotonic() - ended < 1.0


def test_a_failing_report_is_logged_and_the_next_is_made(
    caplog: pytest.LogCaptureFixture,
) -> None:
    made = threading.Event()
    attempts: list[int] = []

    def report() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("redis went away")
        made.set()

    with ProgressReporter(report, 0.01, "progress of backfill b slice 0") as reporter:
        reporter.nudge()
        time.sleep(0.1)
        reporter.nudge()
        assert made.wait(2)
    assert "progress of backfill b slice 0: a progress report failed: redis went away" in (
        caplog.text
    )
