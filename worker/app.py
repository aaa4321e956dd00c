"""The Celery application, configured for at-least-once delivery: a task killed mid-way
is delivered again (its work is idempotent or fenced, jobs/run/lease.py).

Start a worker with ``runbook worker`` (or ``celery -A worker.app worker -Q runbook``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from jobs.config import DEFAULT_BROKER, DEFAULT_QUEUE

# A run's task may take as long as its slowest revision; a message must not come back to
# another worker while the first is still working on it.
VISIBILITY_TIMEOUT_S = int(os.environ.get("RUNBOOK_VISIBILITY_TIMEOUT", 6 * 3600))
# A broker that does not answer for this long is lost: a socket waits no longer (a stopped or
# unplugged Redis leaves half-open sockets that would otherwise wait for ever).
BROKER_TIMEOUT_S = float(os.environ.get("RUNBOOK_BROKER_TIMEOUT", "10"))
RECONNECT_MAX_S = 5.0


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel, still able to reach Redis after its connection was closed.

    When the broker connection is lost, Celery collects and closes it, and kombu detaches
    the transport from it (``transport.client = None``). A task that was running meanwhile
    (acks_late) then acks its message on the old channel, which builds its Redis client from
    ``transport.client``: AttributeError "'NoneType' object has no attribute 'hostname'",
    which Celery calls an unrecoverable error, and the worker's main process stops consuming
    for good. The same happens to the restore of unacked messages on close. With the
    connection's parameters kept here, the late ack reaches Redis once it is back (or fails
    with a connection error, which kombu and Celery handle)."""

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        self._broker = connection.client  # the kombu Connection this channel belongs to
        super().__init__(connection, *args, **kwargs)

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            self.connection.client = self._broker
        return super()._connparams(asynchronous)


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above, for redis:// and rediss:// URLs of
    this process (the worker, and the CLI sending tasks)."""

    Channel = _Channel


for _scheme in ("redis", "rediss"):
    TRANSPORT_ALIASES[_scheme] = "worker.app:RedisTransport"


class Consumer(CeleryConsumer):
    """Celery's consumer, trying to reconnect at least every RECONNECT_MAX_S (kombu's
    default backoff reaches 30 s, so after a long outage a worker would sit up to 30 s
    beside a broker that is back, while the reconciler's re-sent work waits in it)."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=1, interval_step=1, interval_max=RECONNECT_MAX_S
        )
        return super().ensure_connected(conn)


def _redis_socket_options() -> dict[str, Any]:
    return {
        "socket_timeout": BROKER_TIMEOUT_S,
        "socket_connect_timeout": min(5.0, BROKER_TIMEOUT_S),
        "socket_keepalive": True,
        "health_check_interval": BROKER_TIMEOUT_S,  # PING a connection idle this long first
    }


broker_url = os.environ.get("CELERY_BROKER_URL", DEFAULT_BROKER)
app = Celery(
    "runbook",
    broker=broker_url,
    backend=os.environ.get("CELERY_RESULT_BACKEND", broker_url),
    include=["worker.tasks", "worker.reconciler"],
)
app.conf.update(
    task_acks_late=True,  # a task killed mid-way is delivered again ...
    task_reject_on_worker_lost=True,  # ... also when its worker process dies
    worker_prefetch_multiplier=1,  # no worker sits on messages another could run
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_extended=False,  # results carry no task arguments
    result_expires=7 * 24 * 3600,
    task_track_started=True,
    worker_send_task_events=True,  # for Flower
    task_send_sent_event=True,
    task_default_queue=os.environ.get("RUNBOOK_QUEUE", DEFAULT_QUEUE),
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT_S,
        **_redis_socket_options(),
    },
    # Progress and results are best effort (the ledger is the record): a task must not wait
    # 20 s of retries for each progress update while the broker is away.
    result_backend_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT_S,
        "retry_policy": {"max_retries": 1, "interval_start": 0.5},
    },
    redis_socket_timeout=BROKER_TIMEOUT_S,
    redis_socket_connect_timeout=min(5.0, BROKER_TIMEOUT_S),
    redis_socket_keepalive=True,
    redis_backend_health_check_interval=BROKER_TIMEOUT_S,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # a worker waits for its broker for ever, never exits
    # A task in flight when the broker goes is left to finish: its run or slice is in the
    # ledger, and cancelling it would interrupt a migration half-way.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_consumer="worker.app:Consumer",
    worker_hijack_root_logger=True,
)
