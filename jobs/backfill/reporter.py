"""A slice's progress reports, made off its walk's path.

A report reads the ledger (five statements) and writes Redis twice (the result backend and a
task-progress event): 20-30 ms on a busy 2-core machine, which in the walk's thread was a gap
between two batches every PROGRESS_EVERY_S, about 5% of the walk. Here a thread makes them;
the walk only nudges it after each batch (or while a throttle holds), and the thread reports
at most once per interval, mostly while the walk waits on its UPDATE (the driver releases the
GIL then).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger("runbook.backfill")


class ProgressReporter:
    """Calls ``report`` in a thread of its own, at most once per ``every_s``, after a nudge;
    the thread ends with the ``with`` block (after a report under way has finished)."""

    def __init__(self, report: Callable[[], None], every_s: float, name: str) -> None:
        self.report = report
        self.every_s = every_s
        self.nudged = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.last = 0.0  # time.monotonic() of the last report

    def nudge(self) -> None:
        """There is progress to show (a batch committed, or a throttle holds)."""
        self.nudged.set()

    def __enter__(self) -> ProgressReporter:
        self.thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping.set()
        self.nudged.set()
        self.thread.join()

    def _run(self) -> None:
        while True:
            self.nudged.wait()
            if self.stopping.is_set():
                return
            # Coalesce: the nudges until the interval is up are one report.
            if self.stopping.wait(max(0.0, self.last + self.every_s - time.monotonic())):
                return
            self.nudged.clear()
            self.last = time.monotonic()
            try:
                self.report()
            except Exception as exc:  # progress is best effort; the walk goes on regardless
                log.warning("%s: a progress report failed: %s", self.thread.name, exc)
