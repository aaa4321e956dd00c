"""`runbook worker`: the Celery worker as a child process, started again when it dies.

Celery's main process can die of its broker (a crash inside kombu's Redis transport while
the connection is lost, see worker/app.py) or of anything else that is not a stop request;
the user started one worker and expects one to keep running. So this process starts
``celery worker``, waits, and when it exits without having been asked to stop, starts it
again after a backoff (1 s doubling to 30 s; back to 1 s once a worker ran for a minute),
logging one line each time. The work the dead worker held is sent again by the ledger's
leases (jobs/run/reconcile.py), not by this process.

Signals: SIGTERM, SIGUSR1 and SIGUSR2 are passed on to Celery. SIGINT, SIGQUIT and SIGHUP
from the terminal reach Celery by themselves (same process group: Ctrl-C is a warm
shutdown, not a second, cold one); sent to this process alone, they are passed on. SIGTERM,
SIGINT and SIGQUIT mean stop: no restart, and this process exits with Celery's code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from types import FrameType

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
HEALTHY_AFTER_S = 60.0  # a worker that ran this long starts the backoff over

_STOP = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}
_FROM_TERMINAL = {signal.SIGINT, signal.SIGQUIT, signal.SIGHUP}
_PASSED = _STOP | _FROM_TERMINAL | {signal.SIGUSR1, signal.SIGUSR2}


def say(line: str) -> None:
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    print(f"[{stamp}: WARNING/Supervisor] runbook worker: {line}", file=sys.stderr, flush=True)


def _terminal_sent_it_to_the_group() -> bool:
    """Whether this process group is the terminal's foreground group (then a Ctrl-C or
    hang-up was delivered to Celery too)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum in _STOP:
            self.stopping.set()
        child = self.child
        if child is None or child.poll() is not None:
            return
        if signum in _FROM_TERMINAL and _terminal_sent_it_to_the_group():
            return
        child.send_signal(signum)

    def run(self) -> int:
        for signum in _PASSED:
            signal.signal(signum, self._on_signal)
        delay, restarts = FIRST_DELAY_S, 0
        while True:
            started = time.monotonic()
            self.child = subprocess.Popen(self.args)
            code = self.child.wait()
            if self.stopping.is_set() or code == 0:
                return code if code >= 0 else 128 - code
            if time.monotonic() - started >= HEALTHY_AFTER_S:
                delay = FIRST_DELAY_S
            restarts += 1
            say(
                f"the Celery worker stopped ({_describe(code)}) without being asked to; "
                f"starting it again in {delay:.0f} s (restart {restarts})"
            )
            if self.stopping.wait(delay):
                return code if code >= 0 else 128 - code
            delay = min(delay * 2, MAX_DELAY_S)


def celery_command(queue: str, celery_args: Sequence[str]) -> list[str]:
    args = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queue]
    if not any(a.startswith(("--loglevel", "-l")) for a in celery_args):
        args += ["--loglevel", "INFO"]
    return args + list(celery_args)


def main(queue: str, celery_args: Sequence[str]) -> int:
    """Run the Celery worker for ``queue`` until it is asked to stop; its exit code."""
    return Supervisor(celery_command(queue, celery_args)).run()
