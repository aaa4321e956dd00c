"""The states of runs, steps, backfills, backfill slices and rollouts, their transition tables, the
groups of states the code asks about, and the kinds of runs and steps.

Statuses are participles, as in Shopify's maintenance_tasks. Every enum is a StrEnum: a
member is the very string the ledger stores and JSON shows (``RunState.RUNNING == "running"``,
``f"{RunState.RUNNING}" == "running"``), so a state read back from the ledger as plain text
compares, hashes and looks up in these tables like the member itself.

Each table maps a state to the states it may move to; anything else is a bug or a race and
``check_*_transition`` refuses it with IllegalTransition. A state that maps to nothing is
terminal.
"""

from __future__ import annotations

from enum import StrEnum

from jobs.errors import IllegalTransition

# -- runs ------------------------------------------------------------------------------------


class RunState(StrEnum):
    ENQUEUED = "enqueued"
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    # A failed run brought back by restoring its backup (the rollback-by-restore seam).
    RESTORED = "restored"
    FAILED = "failed"
    CANCELLED = "cancelled"


RUN_TRANSITIONS: dict[str, frozenset[str]] = {
    # Waiting for a worker. A message lost with Redis leaves it here until `resume`.
    RunState.ENQUEUED: frozenset({RunState.RUNNING, RunState.CANCELLED, RunState.FAILED}),
    # A worker took the run. FAILED directly when nothing was changed yet (backup failed)
    # or a worker met bad configuration. `resume` re-sends the task without a transition.
    RunState.RUNNING: frozenset({RunState.SUCCEEDED, RunState.ROLLING_BACK, RunState.FAILED}),
    # Undoing what the run applied. FAILED when a downgrade is impossible and no restore
    # could bring the database back.
    RunState.ROLLING_BACK: frozenset({RunState.ROLLED_BACK, RunState.RESTORED, RunState.FAILED}),
    RunState.SUCCEEDED: frozenset(),
    RunState.ROLLED_BACK: frozenset(),
    RunState.RESTORED: frozenset(),
    RunState.FAILED: frozenset(),
    RunState.CANCELLED: frozenset(),
}
#: The name callers of ``check_transition`` know the run table by.
TRANSITIONS = RUN_TRANSITIONS

# Groups (maintenance_tasks' active / stopping / completed).
RUN_ACTIVE = frozenset({RunState.ENQUEUED, RunState.RUNNING})
RUN_STOPPING = frozenset({RunState.ROLLING_BACK})
#: A run here is over: finished_at is set, the lock is released, `--wait` ends.
TERMINAL = frozenset(
    {
        RunState.SUCCEEDED,
        RunState.ROLLED_BACK,
        RunState.RESTORED,
        RunState.FAILED,
        RunState.CANCELLED,
    }
)


def check_transition(current: str, new: str) -> None:
    """Raise IllegalTransition unless a run may go ``current -> new`` (RUN_TRANSITIONS)."""
    if new not in RUN_TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"a run cannot go from {current} to {new}")


class RunKind(StrEnum):
    """What a run does (runs.kind); jobs/run/coordinator.py's ``forward`` picks by it."""

    APPLY = "apply"
    ROLLBACK = "rollback"
    BACKUP = "backup"
    RESTORE = "restore"
    REHEARSE = "rehearse"
    STAMP = "stamp"


# -- steps -----------------------------------------------------------------------------------


class StepState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # Kept for ledgers that hold it; no code writes it today.
    SKIPPED = "skipped"


STEP_TRANSITIONS: dict[str, frozenset[str]] = {
    # A step is recorded running before its work (jobs/ledger/runs.py start_step) and closed
    # afterwards (finish_step). Found running on resume, it is checked against the database
    # and started again (running -> running, attempts + 1).
    StepState.RUNNING: frozenset({StepState.RUNNING, StepState.SUCCEEDED, StepState.FAILED}),
    # A failed step is started again when its run is resumed or retried.
    StepState.FAILED: frozenset({StepState.RUNNING}),
    # A succeeded step is never redone: the coordinator skips it (Coordinator._begin).
    StepState.SUCCEEDED: frozenset(),
    StepState.SKIPPED: frozenset(),
}
STEP_TERMINAL = frozenset(s for s, targets in STEP_TRANSITIONS.items() if not targets)


def check_step_transition(current: str, new: str) -> None:
    """Raise IllegalTransition unless a step may go ``current -> new`` (STEP_TRANSITIONS)."""
    if new not in STEP_TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"a step cannot go from {current} to {new}")


class StepKind(StrEnum):
    """One step of a run (steps.kind), recorded once per (run, kind, revision)."""

    HOOK = "hook"
    PREFLIGHT = "preflight"
    REHEARSE = "rehearse"
    BACKUP = "backup"
    RESTORE = "restore"
    UPGRADE = "upgrade"
    BACKFILL = "backfill"
    VERIFY = "verify"
    DOWNGRADE = "downgrade"
    STAMP = "stamp"


#: Steps that change the target's schema or data; a rollback undoes them.
CHANGING_STEPS = frozenset({StepKind.UPGRADE, StepKind.DOWNGRADE, StepKind.RESTORE})

# -- backfills -------------------------------------------------------------------------------


class BackfillState(StrEnum):
    ENQUEUED = "enqueued"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ERRORED = "errored"
    SUCCEEDED = "succeeded"


_B = BackfillState
# Pause and cancel are flags a worker reads at the start of each batch: `pausing` and
# `cancelling` are asked for, `paused` and `cancelled` are reached by the worker.
BACKFILL_TRANSITIONS: dict[str, frozenset[str]] = {
    # Created, no worker yet. Pause waits for the first slice; cancel needs no worker.
    _B.ENQUEUED: frozenset({_B.RUNNING, _B.PAUSING, _B.CANCELLED}),
    # running -> running is a claim: a new generation takes over from a dead worker.
    _B.RUNNING: frozenset({_B.RUNNING, _B.PAUSING, _B.CANCELLING, _B.SUCCEEDED, _B.ERRORED}),
    # -> running: resumed before the pause took effect; -> errored: the batch in flight failed;
    # -> succeeded: the pause came after the last slice's last batch (BACKFILL_ALL_DONE).
    _B.PAUSING: frozenset(
        {_B.PAUSING, _B.RUNNING, _B.PAUSED, _B.CANCELLING, _B.ERRORED, _B.SUCCEEDED}
    ),
    _B.PAUSED: frozenset({_B.RUNNING, _B.CANCELLED}),
    _B.CANCELLING: frozenset({_B.CANCELLING, _B.CANCELLED, _B.ERRORED}),
    # The cursor stays before the failing range: resume continues from the checkpoint.
    _B.ERRORED: frozenset({_B.RUNNING, _B.CANCELLED}),
    _B.SUCCEEDED: frozenset(),
    _B.CANCELLED: frozenset(),
}

# Groups. Active: slices may be at work on it (jobs/backfill/slices.py gives these an ETA;
# jobs/ledger/leases.py reclaims their lost slices, in SQL). Stopping: a flag was asked for,
# the workers have not honoured it yet.
BACKFILL_ACTIVE = frozenset({_B.ENQUEUED, _B.RUNNING, _B.PAUSING, _B.CANCELLING})
BACKFILL_STOPPING = frozenset({_B.PAUSING, _B.CANCELLING})
#: No slice works on it until an operator acts: a run waiting on it goes on, `runbook
#: backfill --wait` ends (jobs/backfill/slices.py, jobs/cli/commands.py).
BACKFILL_SETTLED = frozenset({_B.SUCCEEDED, _B.PAUSED, _B.CANCELLED, _B.ERRORED})
#: Over for good: resume cannot restart it.
BACKFILL_TERMINAL = frozenset({_B.SUCCEEDED, _B.CANCELLED})

# What a claim leaves, by the state it finds. A start or a takeover (a reconciler, a
# redelivered task) keeps a pause or cancel that was asked for; its first batch honours it.
BACKFILL_CLAIM: dict[str, str] = {
    _B.ENQUEUED: _B.RUNNING,
    _B.RUNNING: _B.RUNNING,
    _B.PAUSING: _B.PAUSING,
    _B.CANCELLING: _B.CANCELLING,
}
# An operator's resume also restarts a paused or errored backfill and withdraws a pending
# pause; a pending cancel still wins.
BACKFILL_RESUME: dict[str, str] = {
    **BACKFILL_CLAIM,
    _B.PAUSING: _B.RUNNING,
    _B.PAUSED: _B.RUNNING,
    _B.ERRORED: _B.RUNNING,
}
BACKFILL_PAUSE: dict[str, str] = {
    _B.ENQUEUED: _B.PAUSING,
    _B.RUNNING: _B.PAUSING,
    _B.PAUSING: _B.PAUSING,
    _B.PAUSED: _B.PAUSED,
}
BACKFILL_CANCEL: dict[str, str] = {
    _B.ENQUEUED: _B.CANCELLED,
    _B.RUNNING: _B.CANCELLING,
    _B.PAUSING: _B.CANCELLING,
    _B.CANCELLING: _B.CANCELLING,
    _B.PAUSED: _B.CANCELLED,
    _B.ERRORED: _B.CANCELLED,
}

# What the backfill becomes once its slices have all stopped (jobs/backfill/control.py
# settled_state), by its state: when every slice is done, and when some stopped short.
BACKFILL_ALL_DONE: dict[str, str] = {
    _B.RUNNING: _B.SUCCEEDED,
    _B.PAUSING: _B.SUCCEEDED,
    _B.CANCELLING: _B.CANCELLED,
}
BACKFILL_ALL_STOPPED: dict[str, str] = {_B.PAUSING: _B.PAUSED, _B.CANCELLING: _B.CANCELLED}


def check_backfill_transition(current: str, new: str) -> None:
    """Raise IllegalTransition unless ``current -> new`` is in BACKFILL_TRANSITIONS."""
    if new not in BACKFILL_TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"a backfill cannot go from {current} to {new}")


# -- backfill slices -------------------------------------------------------------------------


class SliceState(StrEnum):
    ACTIVE = "active"
    STOPPED = "stopped"
    DONE = "done"


SLICE_TRANSITIONS: dict[str, frozenset[str]] = {
    # Its worker walks it. -> active: a claim gives it a new generation (in SQL,
    # jobs/ledger/slices.py and jobs/ledger/leases.py); -> stopped: its worker met a pause, a
    # cancel or an error, or it was abandoned; -> done: its range is walked to the end.
    SliceState.ACTIVE: frozenset({SliceState.ACTIVE, SliceState.STOPPED, SliceState.DONE}),
    # Waits for a resume (-> active). -> stopped: abandoned after a pause had stopped it.
    SliceState.STOPPED: frozenset({SliceState.ACTIVE, SliceState.STOPPED}),
    SliceState.DONE: frozenset(),
}


def check_slice_transition(current: str, new: str) -> None:
    """Raise IllegalTransition unless a slice may go ``current -> new`` (SLICE_TRANSITIONS)."""
    if new not in SLICE_TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"a backfill slice cannot go from {current} to {new}")


# -- rollouts and their members (jobs/fleet/) ---------------------------------------------


class RolloutState(StrEnum):
    ENQUEUED = "enqueued"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    HALTED = "halted"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    SUCCEEDED = "succeeded"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


_R = RolloutState
ROLLOUT_TRANSITIONS: dict[str, frozenset[str]] = {
    # Recorded by `runbook rollout`; the first advance lists the members. FAILED when the
    # group cannot be listed (its catalog is unreachable).
    _R.ENQUEUED: frozenset({_R.RUNNING, _R.CANCELLED, _R.FAILED}),
    # Starting members in waves. HALTED when the failure budget is spent or a canary failed;
    # FAILED when every member ended and some failed within the budget.
    _R.RUNNING: frozenset({_R.PAUSING, _R.HALTED, _R.CANCELLING, _R.SUCCEEDED, _R.FAILED}),
    # No new member starts; PAUSED once the members in flight have ended.
    _R.PAUSING: frozenset({_R.PAUSED, _R.RUNNING, _R.CANCELLING, _R.HALTED}),
    _R.PAUSED: frozenset({_R.RUNNING, _R.CANCELLING, _R.ROLLING_BACK}),
    # Stays halted while its members in flight end; `resume` (after the cause is fixed) goes
    # on with the failed and the unstarted members, `rollback` undoes the advanced ones.
    _R.HALTED: frozenset({_R.RUNNING, _R.CANCELLING, _R.ROLLING_BACK}),
    _R.CANCELLING: frozenset({_R.CANCELLED}),
    # Over, but what a rollout advanced can still be rolled back, and a failed one resumed.
    _R.CANCELLED: frozenset({_R.ROLLING_BACK}),
    _R.SUCCEEDED: frozenset({_R.ROLLING_BACK}),
    _R.FAILED: frozenset({_R.RUNNING, _R.ROLLING_BACK}),
    # Each advanced member back to its own from_revision. FAILED when one of them could not be.
    _R.ROLLING_BACK: frozenset({_R.ROLLED_BACK, _R.FAILED}),
    _R.ROLLED_BACK: frozenset(),
}
#: No member starts in these; the advancing task only follows the ones in flight.
ROLLOUT_STOPPING = frozenset({_R.PAUSING, _R.HALTED, _R.CANCELLING})
#: Nothing more happens by itself once the members in flight have ended: `--wait` ends.
ROLLOUT_SETTLED = frozenset(
    {_R.PAUSED, _R.HALTED, _R.CANCELLED, _R.SUCCEEDED, _R.ROLLED_BACK, _R.FAILED}
)


def check_rollout_transition(current: str, new: str) -> None:
    """Raise IllegalTransition unless a rollout may go ``current -> new``."""
    if new not in ROLLOUT_TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(f"a rollout cannot go from {current} to {new}")


class MemberState(StrEnum):
    """A member of a rollout; its run's own states are in its target's ledger."""

    PENDING = "pending"  # not started (or failed, and set back by `resume`)
    RUNNING = "running"  # its run is in flight
    SUCCEEDED = "succeeded"  # advanced: its run brought it to the rollout's revision
    SKIPPED = "skipped"  # already at the revision: no run, no backup
    FAILED = "failed"  # its run failed (and rolled itself back or restored), or was refused
    ROLLING_BACK = "rolling_back"  # `rollback ROLLOUT`: its rollback run is in flight
    ROLLED_BACK = "rolled_back"  # back at its from_revision
    ROLLBACK_FAILED = "rollback_failed"  # its rollback run failed or was refused


#: Members with a run in flight.
MEMBER_IN_FLIGHT = frozenset({MemberState.RUNNING, MemberState.ROLLING_BACK})
#: Members the rollout changed, which `rollback ROLLOUT` brings back.
MEMBER_ADVANCED = frozenset({MemberState.SUCCEEDED, MemberState.ROLLBACK_FAILED})


# -- the flat names the code imports ---------------------------------------------------------
# Runs and backfills share these names and strings: the two machines spell a state alike.
ENQUEUED = RunState.ENQUEUED
RUNNING = RunState.RUNNING
ROLLING_BACK = RunState.ROLLING_BACK
SUCCEEDED = RunState.SUCCEEDED
ROLLED_BACK = RunState.ROLLED_BACK
RESTORED = RunState.RESTORED
FAILED = RunState.FAILED
CANCELLED = RunState.CANCELLED
PAUSING = BackfillState.PAUSING
PAUSED = BackfillState.PAUSED
CANCELLING = BackfillState.CANCELLING
ERRORED = BackfillState.ERRORED
STEP_RUNNING = StepState.RUNNING
STEP_SUCCEEDED = StepState.SUCCEEDED
STEP_FAILED = StepState.FAILED
STEP_SKIPPED = StepState.SKIPPED
