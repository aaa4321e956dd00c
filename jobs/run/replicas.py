"""A run and the target's standbys (jobs/pg/replication.py): what preflight records and
refuses, and the wait after a revision that rewrote a table.

Preflight records every standby and slot and refuses to start when one is over the target's
bounds, unless ``replicas = "ignore"``. After a step whose SQL rewrites a table
(jobs/insight/rewrites.py) the run waits, up to ``replica_wait``, for the standbys to be
within ``max_replica_lag`` / ``max_replica_lag_bytes`` again, so the next revision does not
pile its WAL onto a lagging standby. When ``replica_wait`` runs out the run goes on and
records that it gave up: the revision is committed on the primary either way, and a run
stopped half-way (or rolled back, which writes as much WAL again) would leave the target in
a worse state than a standby that catches up late. Slots are not waited on here: an inactive
slot does not catch up by waiting, and preflight has bounded them already.

The run's lease keeps being renewed while it waits: the heartbeat is a thread of its own
(jobs/run/lease.py), so the reconciler does not take a waiting run for a dead one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from jobs.pg import replication
from jobs.pg.replication import Bounds, Replication, Verdict

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from jobs.config import Target


def facts(rep: Replication, bounds: Bounds) -> dict[str, Any]:
    """What preflight and plan record: every standby and slot, one line each, and which are
    over the bounds."""
    verdict = replication.over_bounds(rep, bounds)
    return {
        **rep.as_dict(),
        "lines": replication.describe(rep),
        "mode": bounds.mode,
        "over_bounds": verdict.reasons,
    }


def fix(kind: str, name: str, target_name: str) -> str:
    """What an operator does about a standby or slot over the bounds."""
    ignore = f'set replicas = "ignore" on target {target_name}'
    if kind == "slot":
        return (
            f"let its consumer catch up, drop it if nothing reads it any more "
            f"(SELECT pg_drop_replication_slot('{name}')), or {ignore}"
        )
    return f"wait for it to catch up, or {ignore}"


def refusal(verdict: Verdict, target_name: str) -> str | None:
    """Preflight's one line for a verdict over the bounds (the first reason, what to do)."""
    if not verdict:
        return None
    kind, name = verdict.subjects[0]
    more = f" (and {len(verdict.reasons) - 1} more)" if len(verdict.reasons) > 1 else ""
    return f"{verdict.reason}{more}; {fix(kind, name, target_name)}"


def read(conn: Connection, target: Target) -> Replication:
    return replication.read(conn, target.replica_urls)


# -- the wait after a rewrite -------------------------------------------------------------------

CAUGHT_UP = "caught_up"
GAVE_UP = "gave_up"
WITHIN = "within_bounds"  # nothing to wait for
NO_STANDBYS = "no_standbys"
IGNORED = "ignored"
UNREADABLE = "unreadable"  # the standbys could not be read: the run goes on


@dataclass
class ReplicaWait:
    """One wait for the standbys after a rewrite: how long, for whom, and how it ended."""

    outcome: str
    waited_s: float = 0.0
    standbys: list[str] = field(default_factory=list)  # those over the bounds at the start
    reason: str | None = None  # why it waited (the first over-bound line), or still waits
    rewrites: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The step's note, as status shows it."""
        names = ", ".join(self.standbys) or "the standbys"
        if self.outcome == IGNORED:
            return 'rewrote a table; did not wait for standbys (replicas = "ignore")'
        if self.outcome == WITHIN:
            return "rewrote a table; standbys within bounds, no wait"
        if self.outcome == NO_STANDBYS:
            return "rewrote a table; no standbys to wait for"
        if self.outcome == CAUGHT_UP:
            return f"waited {self.waited_s:.1f} s for {names} to replay"
        if self.outcome == UNREADABLE:
            return f"warning: could not read the standbys ({self.reason}); the run went on"
        return (
            f"warning: gave up after {self.waited_s:.1f} s waiting for {names} to replay "
            f"({self.reason}); the run went on (replica_wait)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "line": self.line()}


def standbys_only(rep: Replication) -> Replication:
    return Replication(standbys=rep.standbys, wal_position=rep.wal_position)


def wait_for_standbys(
    look: Callable[[], Replication],
    bounds: Bounds,
    *,
    wait_s: float,
    check_s: float,
    on_wait: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplicaWait:
    """Until ``look()``'s standbys are within ``bounds``, every ``check_s``, at most
    ``wait_s``. ``on_wait(reason)`` is told once, when it starts waiting."""
    if bounds.mode == "ignore":
        return ReplicaWait(IGNORED)
    start = clock()
    seen = standbys_only(look())
    verdict = replication.over_bounds(seen, bounds)
    if not verdict:
        return ReplicaWait(WITHIN if seen.standbys else NO_STANDBYS)
    waiting = ReplicaWait(
        GAVE_UP,
        standbys=sorted({name for _kind, name in verdict.subjects}),
        reason=verdict.reason,
    )
    if on_wait is not None:
        on_wait(verdict.reason or "")
    while verdict:
        if clock() - start >= wait_s:
            waiting.waited_s = clock() - start
            waiting.reason = verdict.reason
            return waiting
        sleep(max(0.0, min(check_s, wait_s - (clock() - start))))
        verdict = replication.over_bounds(standbys_only(look()), bounds)
    waiting.outcome = CAUGHT_UP
    waiting.waited_s = clock() - start
    return waiting
