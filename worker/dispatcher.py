"""The dispatcher jobs/ sends its work through (jobs/dispatch.py), on Celery and Redis.

Used by the CLI and the API: a broker that is away is BrokerUnavailable, one line naming it,
after a few quick retries, not Celery's default of a second or more. The Celery app is
imported on the first send only: checking the broker needs kombu alone.
"""

from __future__ import annotations

import sys
from typing import Any

from jobs.config import redact
from jobs.dispatch import SliceMessage
from jobs.errors import BrokerUnavailable
from worker import flower

RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.2}


class CeleryDispatcher:
    def __init__(self, broker_url: str, queue: str) -> None:
        self.broker_url = broker_url
        self.queue = queue

    def safe_url(self) -> str:
        from kombu.utils.url import maybe_sanitize_url

        return str(maybe_sanitize_url(self.broker_url))

    def _gone(self) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"the broker at {redact(self.safe_url())} is unreachable; start Redis (e.g. "
            "`docker compose up -d redis`) or set CELERY_BROKER_URL"
        )

    def check_broker(self) -> None:
        from kombu import Connection

        # A timeout on every socket read too: a stopped Redis accepts connections, never answers.
        options = {"socket_timeout": 3, "socket_connect_timeout": 3}
        try:
            with Connection(self.broker_url, connect_timeout=3, transport_options=options) as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
                client = getattr(conn.default_channel, "client", None)  # Redis: a round trip
                if client is not None:
                    client.ping()
        except Exception:
            raise self._gone() from None

    def _publish(self, task: str, args: list[Any], **options: Any) -> None:
        """Send one task message; BrokerUnavailable when the broker cannot take it (it went
        away since check_broker)."""
        from kombu.exceptions import OperationalError

        from worker.app import app

        try:
            app.send_task(task, args=args, queue=self.queue, retry_policy=RETRY_POLICY, **options)
        except (OperationalError, OSError):
            raise self._gone() from None

    def send_run(self, run_id: str, target: str, rollout: str | None = None) -> None:
        self._publish(
            flower.EXECUTE_RUN,
            flower.run_args(run_id, target),
            **flower.run_options(rollout, target, run_id),
        )

    def send_rollout(self, rollout_id: str, countdown_s: float = 0.0) -> None:
        self._publish(
            flower.ADVANCE_ROLLOUT, [rollout_id], **flower.rollout_options(countdown_s, rollout_id)
        )

    def send_slice(self, message: SliceMessage) -> None:
        self._publish(
            flower.BACKFILL_SLICE, flower.slice_args(message), **flower.slice_options(message)
        )

    def ping_worker(self, name: str, timeout_s: float) -> bool:
        from worker.app import app

        return bool(app.control.ping(destination=[name], timeout=timeout_s))

    def forget_queue(self) -> None:
        from kombu import Connection, Exchange, Queue

        try:
            with Connection(self.broker_url, connect_timeout=3) as conn:
                # Celery's automatic queue: a direct exchange of the same name. The channel
                # only deletes bindings it knows, so declare them (a no-op) before deleting.
                bound = Queue(
                    self.queue, Exchange(self.queue, type="direct"), routing_key=self.queue
                )(conn.default_channel)
                bound.declare()
                bound.delete()
        except Exception:
            pass

    def worker_command(self, extra: list[str]) -> list[str]:
        from worker.supervise import celery_command

        return celery_command(self.queue, extra)

    def flower_command(self, address: str, port: int, db: str) -> list[str]:
        from worker import flower_config

        # The broker comes from CELERY_BROKER_URL (worker/app.py) and the login from
        # FLOWER_BASIC_AUTH, which Flower reads itself: no secret on the command line.
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "flower",
            f"--conf={flower_config.__file__}",
            f"--address={address}",
            f"--port={port}",
            "--persistent=True",
            f"--db={db}",
        ]
