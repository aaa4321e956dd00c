"""A run's progress reports are held back to one every RUN_PROGRESS_EVERY_S, the latest
sent by a timer, and none after the task closed them (worker/flower.py RunProgress)."""

from __future__ import annotations

import threading
import time
from typing import Any

from worker.flower import RunProgress


class Recorder:
    """Stands for what run_progress publishes to (the result backend and an event): the
    reports, and the thread each was sent from."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def __call__(self, info: dict[str, Any]) -> None:
        self.sent.append((info["step"], threading.current_thread().name))

    @property
    def steps(self) -> list[str]:
        return [step for step, _ in self.sent]


def info(step: str) -> dict[str, Any]:
    return {"run_id": "r1", "target": "t", "state": "running", "step": step}


def test_the_first_goes_at_once_the_latest_of_a_burst_after_the_interval() -> None:
    sent = Recorder()
    report = RunProgress(sent, every_s=0.2)
    for step in ("preflight", "upgrade", "verify"):
        report(info(step))
    assert sent.steps == ["preflight"]
    time.sleep(0.35)
    assert sent.steps == ["preflight", "verify"]
    # The held one went from the timer's thread: run_progress must not rely on Celery's
    # thread-local task.request there (it takes the task's id in the task's thread).
    assert sent.sent[1][1] != threading.current_thread().name
    report.close()


def test_nothing_is_sent_after_close() -> None:
    sent = Recorder()
    report = RunProgress(sent, every_s=0.1)
    report(info("preflight"))
    report(info("upgrade"))  # held back for the timer
    report.close()
    time.sleep(0.2)
    report(info("verify"))
    assert sent.steps == ["preflight"]
