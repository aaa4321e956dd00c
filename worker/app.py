"""The Celery application, configured for at-least-once delivery (see DESIGN.md).

Start a worker with ``runbook worker`` (or ``celery -A worker.app worker -Q runbook``).
"""

from __future__ import annotations

import os

from celery import Celery

from jobs.config import DEFAULT_BROKER, DEFAULT_QUEUE

# A run's task may take as long as its slowest revision; a message must not come back to
# another worker while the first is still working on it.
VISIBILITY_TIMEOUT_S = int(os.environ.get("RUNBOOK_VISIBILITY_TIMEOUT", 6 * 3600))

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
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
)
