"""What an id is: every piece of work the CLI names by id (a run, a backfill) gets one here,
and one query tells which kind an id is (``KIND_OF``, run by jobs/api/common.py ``locate``).

Ids of all kinds share one space: `runbook status ID`, `resume ID` and `cancel ID` take any of
them. A new kind gets its constant, its ``new_…_id`` and a branch in ``KIND_OF``.
"""

from __future__ import annotations

import uuid

from jobs.ledger.read import SCHEMA

RUN = "run"
BACKFILL = "backfill"
# A rollout's id lives in the control database (jobs/fleet/store.py), not in a ledger.
ROLLOUT = "rollout"

# The kind of an id, in one round trip; no row when the ledger has none with that id.
# psycopg2's parameters, so that it runs as it is on a plain psycopg2 connection too.
KIND_OF = (
    f"SELECT '{RUN}' FROM {SCHEMA}.runs WHERE id = %(id)s "
    f"UNION ALL SELECT '{BACKFILL}' FROM {SCHEMA}.backfills WHERE id = %(id)s LIMIT 1"
)


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


def new_run_id() -> str:
    return _new_id()


def new_backfill_id() -> str:
    return _new_id()


def new_rollout_id() -> str:
    return _new_id()
