"""The Python API for scripts and CI; the CLI calls exactly these functions.

from jobs import api
run_id = api.enqueue(target="prod", to="head")
final = api.wait(run_id)
assert final["state"] == "succeeded"
"""

from jobs.api.backfills import (
    backfill_status,
    control_backfill,
    dry_run_backfill,
    enqueue_backfill,
    follow_backfill,
    list_backfills,
)
from jobs.api.backups import enqueue_backup, enqueue_restore, list_backups
from jobs.api.common import WAIT_REREAD_S, locate, settle_refusal
from jobs.api.rollouts import (
    control_rollout,
    find_rollout,
    follow_rollout,
    list_rollouts,
    rollback_rollout,
    rollout_status,
    start_rollout,
    wait_rollout,
)
from jobs.api.runs import (
    cancel,
    check,
    doctor,
    enqueue,
    enqueue_rehearse,
    enqueue_rollback,
    enqueue_stamp,
    follow_run,
    history,
    plan,
    resume,
    status,
    strict_refusal,
    wait,
)
from jobs.api.targets import group_targets, targets
from jobs.project.losses import data_loss

__all__ = [
    "WAIT_REREAD_S",
    "backfill_status",
    "cancel",
    "check",
    "control_rollout",
    "find_rollout",
    "follow_rollout",
    "group_targets",
    "list_rollouts",
    "rollback_rollout",
    "rollout_status",
    "start_rollout",
    "wait_rollout",
    "control_backfill",
    "data_loss",
    "doctor",
    "dry_run_backfill",
    "enqueue",
    "enqueue_backfill",
    "enqueue_backup",
    "enqueue_rehearse",
    "enqueue_restore",
    "enqueue_rollback",
    "enqueue_stamp",
    "follow_backfill",
    "follow_run",
    "history",
    "list_backfills",
    "list_backups",
    "locate",
    "plan",
    "resume",
    "settle_refusal",
    "status",
    "strict_refusal",
    "targets",
    "wait",
]
