"""What `runbook exporter` reads from one target's ledger at each scrape, as plain records.

Read with plain psycopg2 on a read-only session (jobs/pg/connect.py ``reading``; the reads of
jobs/ledger/read.py and jobs/ledger/overview.py), as `runbook status` reads: no SQLAlchemy, so
the exporter stays light and a scrape costs a handful of indexed queries per target. A target
that cannot be read (broken entry, database down, no ledger yet) gives facts with ``up``
false and the one line saying why; nothing is raised to the scrape.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from jobs.config import Settings, Target, redact
from jobs.errors import RunbookError
from jobs.fleet import groups
from jobs.fleet import overview as control_overview
from jobs.fleet.overview import RolloutFacts
from jobs.ledger import overview, read
from jobs.ledger.records import Run

# Finished backfills (and settled rollouts) stay on the board this long, and at most this
# many per target (rollouts: in all).
RECENT_HOURS = 24
MAX_BACKFILLS = 50
MAX_ROLLOUTS = 50


@dataclass
class SliceThrottle:
    slice: int
    throttled_s: float
    reason: str | None  # the latest reason the slice waited for, as the ledger words it


@dataclass
class BackfillFacts:
    progress: dict[str, Any]  # records.backfill_progress, as `runbook status` shows it
    throttles: list[SliceThrottle] = field(default_factory=list)


@dataclass
class TargetFacts:
    target: str
    up: bool
    read_s: float = 0.0
    error: str | None = None  # why it is not up: one line, password redacted
    runs_by_state: dict[str, int] = field(default_factory=dict)
    current: Run | None = None
    last: Run | None = None
    backfills: list[BackfillFacts] = field(default_factory=list)


@dataclass
class ControlFacts:
    up: bool
    read_s: float = 0.0
    error: str | None = None  # why it is not up: one line, password redacted
    rollouts: list[RolloutFacts] = field(default_factory=list)


def _read_ledger(t: Target) -> TargetFacts:
    return read.reading(t, lambda conn: _facts(conn, t))


def _facts(conn: Any, t: Target) -> TargetFacts:
    if not read.exists(conn):
        return TargetFacts(t.name, up=False, error=f"target {t.name!r} has no ledger yet")
    found = overview.recent_backfills(conn, t.name, RECENT_HOURS, MAX_BACKFILLS)
    return TargetFacts(
        t.name,
        up=True,
        runs_by_state=overview.runs_by_state(conn, t.name),
        current=overview.current_run(conn, t.name),
        last=overview.last_finished_run(conn, t.name),
        backfills=[
            BackfillFacts(
                overview.progress(conn, bf),
                [
                    SliceThrottle(n, ms / 1000, reason)
                    for n, ms, reason in overview.slice_throttles(conn, bf.id)
                ],
            )
            for bf in found
        ],
    )


def _why(exc: Exception) -> str:
    """Why a ledger or the control database could not be read, in one line: a RunbookError's
    own (unreachable, login refused, a broken entry), else the error's first line (gone
    mid-read, a timeout), password redacted."""
    if isinstance(exc, RunbookError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return redact(f"{type(exc).__name__}: {first}")


def read_target(settings: Settings, name: str) -> TargetFacts:
    """One target's facts; ``up`` false with the reason when its ledger cannot be read."""
    started = time.monotonic()
    if name in settings.broken:
        facts = TargetFacts(name, up=False, error=settings.broken[name])
    else:
        try:
            facts = _read_ledger(settings.targets[name])
        except Exception as exc:  # the other targets still scrape
            facts = TargetFacts(name, up=False, error=_why(exc))
    facts.read_s = time.monotonic() - started
    return facts


def read_all(settings: Settings) -> list[TargetFacts]:
    """Every configured target's facts, read side by side: a slow host holds the scrape up by
    its connect timeout at most (jobs/pg/connect.py), not by the sum of them."""
    names = settings.names
    if not names:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        return list(pool.map(lambda n: read_target(settings, n), names))


def read_control(settings: Settings) -> ControlFacts | None:
    """The rollouts' facts from the control database; None when none is configured, ``up``
    false with the reason when it cannot be read."""
    if not groups.has_control(settings):
        return None
    from jobs.pg import connect

    started = time.monotonic()
    try:
        with connect.reading(groups.control_target(settings)) as conn:
            found = control_overview.recent_rollouts(conn, RECENT_HOURS, MAX_ROLLOUTS)
        facts = ControlFacts(up=True, rollouts=found)
    except Exception as exc:  # the targets still scrape
        facts = ControlFacts(up=False, error=_why(exc))
    facts.read_s = time.monotonic() - started
    return facts
