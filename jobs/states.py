"""Run and step states, and the one table of legal run transitions.

Statuses are participles, as in Shopify's maintenance_tasks. ``restored`` is reached when a
failed run is brought back by restoring its backup (the rollback-by-restore seam).
"""

from __future__ import annotations

from jobs.errors import IllegalTransition

ENQUEUED = "enqueued"
RUNNING = "running"
ROLLING_BACK = "rolling_back"
SUCCEEDED = "succeeded"
ROLLED_BACK = "rolled_back"
RESTORED = "restored"
FAILED = "failed"
CANCELLED = "cancelled"

TERMINAL = frozenset({SUCCEEDED, ROLLED_BACK, RESTORED, FAILED, CANCELLED})

# state -> states it may move to. Anything else is a bug or a race and is refused.
TRANSITIONS: dict[str, frozenset[str]] = {
    # Waiting for a worker. A message lost with Redis leaves it here until `resume`.
    ENQUEUED: frozenset({RUNNING, CANCELLED, FAILED}),
    # A worker took the run. FAILED directly when nothing was changed yet (backup failed)
    # or a worker met bad configuration. `resume` re-sends the task without a transition.
    RUNNING: frozenset({SUCCEEDED, ROLLING_BACK, FAILED}),
    # Undoing what the run applied. FAILED when a downgrade is impossible and no restore
    # could bring the database back.
    ROLLING_BACK: frozenset({ROLLED_BACK, RESTORED, FAILED}),
    SUCCEEDED: frozenset(),
    ROLLED_BACK: frozenset(),
    RESTORED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

# Step states: a step is recorded `running` before its work and closed afterwards; a step
# found `running` on resume is checked against the database before it is redone.
STEP_RUNNING = "running"
STEP_SUCCEEDED = "succeeded"
STEP_FAILED = "failed"
STEP_SKIPPED = "skipped"


def check_transition(current: str, new: str) -> None:
    """Raise IllegalTransition unless ``current -> new`` is in TRANSITIONS."""
    if new not in TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"a run cannot go from {current} to {new}")


# -- backfills -------------------------------------------------------------------------------
# A backfill has its own states (maintenance_tasks' participles): pause and cancel are flags
# a worker reads at the start of each batch.
PAUSING = "pausing"
PAUSED = "paused"
CANCELLING = "cancelling"
ERRORED = "errored"
BACKFILL_TERMINAL = frozenset({SUCCEEDED, CANCELLED})

# Backfill state -> states it may move to.
# Pause and cancel are flags a worker reads at the start of each batch: `pausing` and
# `cancelling` are asked for, `paused` and `cancelled` are reached by the worker.
BACKFILL_TRANSITIONS: dict[str, frozenset[str]] = {
    # Created, no worker yet. Pause waits for the first slice; cancel needs no worker.
    ENQUEUED: frozenset({RUNNING, PAUSING, CANCELLED}),
    # running -> running is a claim: a new generation takes over from a dead worker.
    RUNNING: frozenset({RUNNING, PAUSING, CANCELLING, SUCCEEDED, ERRORED}),
    # -> running: resumed before the pause took effect; -> errored: the batch in flight failed.
    PAUSING: frozenset({PAUSING, RUNNING, PAUSED, CANCELLING, ERRORED}),
    PAUSED: frozenset({RUNNING, CANCELLED}),
    CANCELLING: frozenset({CANCELLING, CANCELLED, ERRORED}),
    # The cursor stays before the failing range: resume continues from the checkpoint.
    ERRORED: frozenset({RUNNING, CANCELLED}),
    SUCCEEDED: frozenset(),
    CANCELLED: frozenset(),
}

# What a claim leaves, by the state it finds. A start or a takeover (a reconciler, a
# redelivered task) keeps a pause or cancel that was asked for; its first batch honours it.
BACKFILL_CLAIM = {ENQUEUED: RUNNING, RUNNING: RUNNING, PAUSING: PAUSING, CANCELLING: CANCELLING}
# An operator's resume also restarts a paused or errored backfill and withdraws a pending
# pause; a pending cancel still wins.
BACKFILL_RESUME = {**BACKFILL_CLAIM, PAUSING: RUNNING, PAUSED: RUNNING, ERRORED: RUNNING}
BACKFILL_PAUSE = {ENQUEUED: PAUSING, RUNNING: PAUSING, PAUSING: PAUSING, PAUSED: PAUSED}
BACKFILL_CANCEL = {
    ENQUEUED: CANCELLED,
    RUNNING: CANCELLING,
    PAUSING: CANCELLING,
    CANCELLING: CANCELLING,
    PAUSED: CANCELLED,
    ERRORED: CANCELLED,
}


def check_backfill_transition(current: str, new: str) -> None:
    """Raise IllegalTransition unless ``current -> new`` is in BACKFILL_TRANSITIONS."""
    if new not in BACKFILL_TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"a backfill cannot go from {current} to {new}")
