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
