"""The rollouts' share of the reconciler (worker/reconciler.py): an unsettled rollout whose
advancing pass has not run for a while (its message lost with Redis, its worker killed) gets
a new pass. A pass is idempotent and takes the rollout's lock, so an extra one is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from jobs.config import Settings, Target
from jobs.errors import RunbookError
from jobs.fleet import groups, store

log = logging.getLogger("runbook.reconcile")

# A rollout's pass re-sends itself every second or so while members are in flight
# (jobs/fleet/advance.py ADVANCE_EVERY_S); one not seen for this long has lost its message.
STALE_AFTER_S = 10.0


def reconcile(
    settings: Settings,
    send_advance: Callable[[str, float, str | None], None],
    *,
    after_s: float = STALE_AFTER_S,
) -> list[str]:
    """Send a pass for every stale rollout; their ids. Nothing without a control database."""
    if not groups.has_control(settings):
        return []
    with store.connect(settings) as conn:
        if not store.exists(conn):
            return []
        stale = store.stale_rollouts(conn, after_s)
    for rollout_id in stale:
        log.warning("rollout %s has not advanced for %.0fs: sending a pass", rollout_id, after_s)
        send_advance(rollout_id, 0.0, None)
    return stale


def members_in_flight(settings: Settings) -> list[Target]:
    """The targets of members whose run is in flight that runbook.toml does not name (a
    catalog's rows): their slices and runs are reconciled like any target's. A member that
    cannot be resolved now is left to its rollout's pass, which fails it with its line."""
    if not groups.has_control(settings):
        return []
    with store.connect(settings) as conn:
        if not store.exists(conn):
            return []
        names = [n for n in store.targets_in_flight(conn) if n not in settings.targets]
    found = []
    for name in names:
        try:
            t = groups.resolve(settings, name)
        except RunbookError:
            continue
        if t is not None:
            found.append(t)
    return found
