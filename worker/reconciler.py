"""The reconciler loop: a thread in each worker's main process (no separate beat process to
run). Set RUNBOOK_RECONCILE_S=0 to turn it off on a worker.

It also watches the broker. While Redis is away a pass would take slices over and fail to
send them, so none is made (one log line when it goes, one when it is back, checked every
second). Our Redis keeps nothing on disk: when it comes back after an outage, or has been
restarted since the last pass (its run_id changed), every message queued before is presumed
lost, and that pass sends again all work not renewed in the last few seconds instead of
waiting out the whole lease. Duplicates are safe: a run's extra delivery finds the run lock
held, a slice taken over gets a new generation that fences the old task (jobs/run/reconcile.py).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown
from kombu.utils.url import maybe_sanitize_url

from jobs.config import load_settings
from jobs.fleet import reconcile as fleet_reconcile
from jobs.fleet.reconcile import STALE_AFTER_S
from jobs.run import lease, reconcile

log = logging.getLogger("runbook.reconcile")

EVERY_S = float(os.environ.get("RUNBOOK_RECONCILE_S", "15"))
# After the broker lost its messages: work whose lease was not renewed for this long is sent
# again (a walking slice renews it every batch, a working run every quarter lease).
AFTER_OUTAGE_LEASE_S = min(lease.LEASE_S, 5.0)
_stop = threading.Event()


class BrokerWatch:
    """Whether the broker answers, and whether it lost its messages since the last look."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.run_id: str | None = None  # the Redis server's, at the last look
        self.down = False
        self.lost = False  # messages presumed lost, until a pass has sent the work again

    def look(self) -> bool:
        """True when the broker answers (noting a restart or an outage), False when not."""
        try:
            client = redis.Redis.from_url(self.url, socket_timeout=3, socket_connect_timeout=3)
            try:
                run_id = str(client.info("server")["run_id"])
            finally:
                client.close()
        except (redis.RedisError, OSError, KeyError, ValueError) as exc:
            if not self.down:
                log.warning(
                    "broker %s unreachable (%s): reconciling paused until it is back",
                    maybe_sanitize_url(self.url),
                    exc,
                )
            self.down = self.lost = True
            return False
        if self.down or (self.run_id is not None and run_id != self.run_id):
            log.warning(
                "broker %s is back%s: sending again the work whose messages it lost",
                maybe_sanitize_url(self.url),
                "" if self.down else " (restarted)",
            )
            self.lost = True
        self.down, self.run_id = False, run_id
        return True


def _pass(watch: BrokerWatch) -> None:
    from worker.tasks import rollout_sender, run_sender, slice_sender

    settings = load_settings()
    lease_s = AFTER_OUTAGE_LEASE_S if watch.lost else lease.LEASE_S
    try:
        members = fleet_reconcile.members_in_flight(settings)
    except Exception:  # the control database may be away; the targets are reconciled still
        log.exception("listing the rollouts' members in flight failed")
        members = []
    found = reconcile.reconcile(
        settings,
        run_sender(settings.queue),
        slice_sender(settings.queue),
        lease_s=lease_s,
        members=members,
    )
    try:
        fleet_reconcile.reconcile(
            settings, rollout_sender(settings.queue), after_s=0.0 if watch.lost else STALE_AFTER_S
        )
    except Exception:  # the control database may be away; the targets were reconciled
        log.exception("reconciling rollouts failed")
    watch.lost = False
    if found.runs_sent or found.runs_failed or found.slices_sent:
        log.warning("reconciled: %s", found)


def _loop() -> None:
    from worker.app import broker_url

    watch = BrokerWatch(broker_url)
    watch.look()
    wait_s = EVERY_S
    while not _stop.wait(wait_s):
        try:
            if not watch.look():
                wait_s = min(EVERY_S, 1.0)  # back within a second of the broker
                continue
            wait_s = EVERY_S
            _pass(watch)
        except Exception:  # the loop must outlive any one bad pass
            log.exception("reconcile pass failed")


@worker_ready.connect
def _start(**_: Any) -> None:
    if EVERY_S > 0:
        threading.Thread(target=_loop, name="runbook-reconciler", daemon=True).start()


@worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    _stop.set()
