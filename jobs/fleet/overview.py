"""The control database as `runbook exporter` reads it at each scrape: the rollouts going or
settled lately, with their members counted by state. Plain psycopg2 on a read-only session,
as jobs/fleet/index.py reads it and for the same reason (jobs/ledger/read.py says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jobs.fleet.index import CONTROL_EXISTS

# Unsettled rollouts, and those settled within :hours; the newest first.
RECENT_ROLLOUTS = (
    "SELECT id, group_name, state, to_revision, created_at, settled_at "
    "FROM runbook_control.rollouts "
    "WHERE settled_at IS NULL OR settled_at > now() - %(hours)s * interval '1 hour' "
    "ORDER BY created_at DESC LIMIT %(limit)s"
)
# Members per state of those rollouts (an index-only scan of members_state).
MEMBER_COUNTS = (
    "SELECT rollout_id, state, count(*) FROM runbook_control.members "
    "WHERE rollout_id = ANY(%(ids)s) GROUP BY rollout_id, state"
)


@dataclass
class RolloutFacts:
    id: str
    group: str
    state: str
    to_revision: str | None
    created_at: datetime
    settled_at: datetime | None
    members: dict[str, int] = field(default_factory=dict)  # member state -> how many


def recent_rollouts(conn: Any, hours: float, limit: int) -> list[RolloutFacts]:
    """The rollouts of RECENT_ROLLOUTS with their members counted; none before the control
    schema exists (no rollout asked for yet)."""
    with conn.cursor() as cur:
        cur.execute(CONTROL_EXISTS)
        row = cur.fetchone()
        if not row or not row[0]:
            return []
        cur.execute(RECENT_ROLLOUTS, {"hours": hours, "limit": limit})
        found = {r[0]: RolloutFacts(*r) for r in cur.fetchall()}
        if found:
            cur.execute(MEMBER_COUNTS, {"ids": list(found)})
            for rollout_id, state, count in cur.fetchall():
                found[rollout_id].members[state] = int(count)
    return list(found.values())
