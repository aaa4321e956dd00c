"""The reconciler loop: a thread in each worker's main process (no separate beat process to
run). Set RUNBOOK_RECONCILE_S=0 to turn it off on a worker."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from jobs import reconcile
from jobs.config import load_settings

log = logging.getLogger("runbook.reconcile")

EVERY_S = float(os.environ.get("RUNBOOK_RECONCILE_S", "15"))
_stop = threading.Event()


def _loop() -> None:
    from worker.tasks import run_sender, slice_sender

    while not _stop.wait(EVERY_S):
        try:
            settings = load_settings()
            found = reconcile.reconcile(
                settings, run_sender(settings.queue), slice_sender(settings.queue)
            )
            if found.runs_sent or found.runs_failed or found.slices_sent:
                log.warning("reconciled: %s", found)
        except Exception:  # the loop must outlive any one bad pass
            log.exception("reconcile pass failed")


@worker_ready.connect
def _start(**_: Any) -> None:
    if EVERY_S > 0:
        threading.Thread(target=_loop, name="runbook-reconciler", daemon=True).start()


@worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    _stop.set()
