"""The reconciler: sends again the work whose worker died or whose message was lost.

Every worker runs it in a thread of its main process (worker/reconciler.py) every
RUNBOOK_RECONCILE_S seconds; a session advisory lock per target lets one reconciler at a time
act on a target. It also removes what killed deliveries left behind (jobs/backups/leftovers.py).
What it sends is safe to receive twice: runs are idempotent by run id under
their run lock, and a slice it takes over gets a new generation that fences the old task.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from jobs.backfill import slices
from jobs.backups import leftovers
from jobs.config import Settings, Target
from jobs.dispatch import SendRun, SendSlice
from jobs.errors import RunbookError
from jobs.ledger import leases, schema
from jobs.pg import db
from jobs.run import lease

log = logging.getLogger("runbook.reconcile")

# One reconciler per target at a time. Not db.ADMISSION_LOCK_KEY ('runbook' + 2): sharing it
# made every `apply` wait for a reconciler pass, and a pass skip while a run was admitted.
RECONCILE_LOCK_KEY = 0x72756E626F6F6B03  # "runbook" + 3


@dataclass
class Report:
    runs_sent: list[str] = field(default_factory=list)
    runs_failed: list[str] = field(default_factory=list)
    slices_sent: list[tuple[str, int, int]] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    leftovers_removed: list[str] = field(default_factory=list)


def reconcile(
    settings: Settings,
    send_run: SendRun,
    send_slice: SendSlice,
    *,
    lease_s: float = lease.LEASE_S,
    members: Iterable[Target] = (),
) -> Report:
    """One pass over every configured target, and ``members``: catalog members with a run in
    flight (jobs/fleet/reconcile.py ``members_in_flight``), which runbook.toml does not name."""
    report = Report()
    for target in [*settings.targets.values(), *members]:
        try:
            _target(target, send_run, send_slice, lease_s, report)
        except (DBAPIError, RunbookError) as exc:
            report.unreachable.append(target.name)
            log.warning("reconcile %s: %s", target.name, exc)
    return report


def _target(
    target: Target,
    send_run: SendRun,
    send_slice: SendSlice,
    lease_s: float,
    report: Report,
) -> None:
    with db.connect(target) as conn:
        if not schema.exists(conn):
            return
        locked = conn.execute(
            text("SELECT pg_try_advisory_lock(:k)"), {"k": RECONCILE_LOCK_KEY}
        ).scalar_one()
        conn.commit()
        if not locked:
            return
        try:
            _leftovers(target, report)  # before a stale run is sent again and sweeps them
            for run in leases.stale_runs(conn, lease_s):
                if run.unfinished >= lease.MAX_UNFINISHED:
                    lease.give_up(target, run.id, run.unfinished)
                    report.runs_failed.append(run.id)
                    continue
                log.warning("run %s on %s has no live lease: sending it again", run.id, target.name)
                send_run(run.id, target.name)
                report.runs_sent.append(run.id)
            for backfill_id, name, number, generation in leases.take_stale_slices(conn, lease_s):
                log.warning(
                    "backfill %s slice %d on %s has no live lease: sending it again",
                    backfill_id,
                    number,
                    name,
                )
                slices.send_slices(conn, name, backfill_id, [(number, generation)], send_slice)
                report.slices_sent.append((backfill_id, number, generation))
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": RECONCILE_LOCK_KEY})
            conn.commit()


def _leftovers(target: Target, report: Report) -> None:
    """Remove the scratch databases and partial dumps of dead runs (jobs/backups/leftovers.py), one
    log line each; a failure is logged and the pass goes on."""
    try:
        removed = leftovers.sweep(target)
    except (DBAPIError, RunbookError, OSError) as exc:
        log.warning("reconcile %s: could not look for leftovers: %s", target.name, exc)
        return
    report.leftovers_removed += [item.name for item in removed]
