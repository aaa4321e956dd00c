"""The ledger's records as plain dataclasses, and a backfill's progress drawn from them.

Kept apart from jobs/ledger/ (SQLAlchemy) so that `runbook status` builds them from plain
psycopg2 rows (jobs/ledger/read.py) without importing SQLAlchemy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from jobs.ledger.estimate import COUNTED, KIND_LABELS, SliceWalk, estimate_total, walked_fraction
from jobs.states import BACKFILL_ACTIVE, PAUSED, PAUSING, SUCCEEDED, TERMINAL, SliceState

# A backfill's states while work on it may still go on: an ETA is shown only in these.

# The states in which a pause's reason is shown.
BACKFILL_PAUSED_STATES = frozenset({PAUSING, PAUSED})


@dataclass
class Step:
    id: int
    run_id: str
    kind: str
    revision: str
    state: str
    started_at: datetime
    finished_at: datetime | None
    attempts: int
    error: str | None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "revision": self.revision or None,
            "state": self.state,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "attempts": self.attempts,
            "error": self.error,
            "detail": self.detail,
        }


@dataclass
class Run:
    id: str
    target: str
    kind: str
    state: str
    from_revision: str | None
    to_revision: str | None
    current_revision: str | None
    error: str | None
    options: dict[str, Any]
    backup: dict[str, Any] | None
    fingerprint_before: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deliveries: int
    irreversible: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def step(self, kind: str, revision: str | None = None) -> Step | None:
        for s in self.steps:
            if s.kind == kind and s.revision == (revision or ""):
                return s
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "target": self.target,
            "kind": self.kind,
            "state": self.state,
            "from_revision": self.from_revision,
            "to_revision": self.to_revision,
            "current_revision": self.current_revision,
            "backup": self.backup,
            "steps": [s.as_dict() for s in self.steps],
            "error": self.error,
            "options": self.options,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "deliveries": self.deliveries,
            "irreversible": self.irreversible,
        }


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


@dataclass
class Backfill:
    id: str
    target: str
    run_id: str | None
    revision: str | None
    table_name: str
    key_column: str
    key_type: str
    set_sql: str
    where_sql: str | None
    state: str
    upper_key: str | None
    batch_size: int
    min_batch: int
    max_batch: int
    target_batch_ms: int
    sleep_ms: int
    lock_timeout_ms: int
    statement_timeout_ms: int
    slices: int
    on_error: str
    max_xact_age_s: int
    # Replica-aware throttling (jobs/backfill/replicas.py): the backfill's own bounds.
    max_replica_lag_ms: int
    max_replica_lag_bytes: int
    max_retained_wal_bytes: int
    max_wal_rate_bytes: int | None
    max_throttle_ms: int
    pause_reason: str | None  # why it paused itself (a throttle held past max_throttle)
    standbys_seen: list[str]  # standbys it has seen streaming (one gone is noted)
    replica_note: str | None
    rows_total_estimate: int | None
    estimate_kind: str | None
    error: str | None
    error_range: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    # Summed over the slices.
    rows_done: int = 0
    throttled_ms: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for key in ("created_at", "started_at", "finished_at", "updated_at"):
            out[key] = iso(out[key])
        return out


# Slice fields only the progress reads (jobs/ledger/estimate.py); the walk's queries skip them.
SLICE_ESTIMATE_FIELDS = ("key_marks", "keys_estimate")


@dataclass
class Slice:
    backfill_id: str
    slice: int
    lower_key: str | None  # the walk starts after this key (None: at the first key)
    upper_key: str  # and ends with this one
    cursor: str | None  # the last key done (None: none yet)
    generation: int
    state: str
    batch_size: int  # the next batch's size
    rows_done: int
    throttled_ms: int
    updated_at: datetime
    # From creation, when the rows were not counted (jobs/backfill/marks.py): keys at equal
    # rank fractions of the slice, and how many keys it held. The walk's queries leave them out.
    key_marks: list[str] | None = None
    keys_estimate: int | None = None

    @property
    def position(self) -> str | None:
        """The key the next batch starts after."""
        return self.cursor if self.cursor is not None else self.lower_key

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "updated_at": iso(self.updated_at)}


@dataclass
class BackfillBatch:
    id: int
    backfill_id: str
    slice: int
    lo: str | None
    hi: str
    batch_size: int
    rows: int
    skipped: int
    duration_ms: int
    throttled_ms: int
    attempt: int
    generation: int
    committed_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "committed_at": iso(self.committed_at)}


@dataclass
class Throttle:
    """The latest reason a slice waited for, when, and since when while it still holds."""

    throttle_reason: str
    throttled_at: datetime
    throttle_since: datetime | None = None

    def holding_s(self) -> float | None:
        """How long the throttle has held so far; None when it no longer does."""
        if self.throttle_since is None:
            return None
        return max((datetime.now(UTC) - self.throttle_since).total_seconds(), 0.0)


def rows_total(bf: Backfill, slices: list[Slice]) -> tuple[int, str]:
    """The rows the backfill will have updated and how that is known (jobs/ledger/estimate.py):
    rows done once it succeeded; the creation's count; else each slice's cursor among its
    key marks, calibrated by the rows done."""
    stored = bf.rows_total_estimate or 0
    kind = bf.estimate_kind or COUNTED
    if bf.state == SUCCEEDED:
        return bf.rows_done, COUNTED
    if kind == COUNTED or not slices or any(s.key_marks is None for s in slices):
        return max(stored, bf.rows_done), kind
    walks = [
        SliceWalk(
            keys=s.keys_estimate or 0,
            walked=1.0
            if s.state == SliceState.DONE
            else walked_fraction(s.key_marks or [], s.cursor, bf.key_type),
            rows_done=s.rows_done,
        )
        for s in slices
    ]
    return estimate_total(walks, stored), kind


def backfill_progress(
    bf: Backfill,
    recent: tuple[int, float],
    throttle: Throttle | None,
    slices: list[Slice],
) -> dict[str, Any]:
    """Rows done, total (and how it was estimated), percent, rate, ETA (throttled time left
    out), throttling and each slice's position: what Flower, status and the API show.
    ``recent``: rows and busy seconds of the last minute of batches (the rate's basis)."""
    total, kind = rows_total(bf, slices)
    percent = min(round(100.0 * bf.rows_done / total, 1), 100.0) if total else None
    rows, busy_s = recent
    rate = rows / busy_s if busy_s > 0 and rows else None
    remaining = max(total - bf.rows_done, 0)
    eta = round(remaining / rate) if rate and bf.state in BACKFILL_ACTIVE else None
    holding = None if throttle is None else throttle.holding_s()
    return {
        "backfill_id": bf.id,
        "target": bf.target,
        "run_id": bf.run_id,
        "table": bf.table_name,
        "set": bf.set_sql,
        "where": bf.where_sql,
        "state": bf.state,
        "rows_done": bf.rows_done,
        "rows_total": total,
        "rows_left": remaining,
        "estimate": kind,
        "estimate_label": KIND_LABELS.get(kind, kind),
        "percent": percent,
        "rate_rows_s": round(rate) if rate else None,
        "eta_s": eta,
        "throttled_s": round(bf.throttled_ms / 1000, 1),
        "throttle": None if throttle is None else throttle.throttle_reason,
        # Held now (a slice is waiting for it), and for how long: the progress bar shows it.
        "throttling": throttle.throttle_reason if throttle and holding is not None else None,
        "throttling_s": None if holding is None else round(holding, 1),
        "pause_reason": bf.pause_reason if bf.state in BACKFILL_PAUSED_STATES else None,
        "replica_note": bf.replica_note,
        "skipped": bf.skipped,
        "slices": [
            {
                "slice": s.slice,
                "state": s.state,
                "cursor": s.cursor,
                "from": s.lower_key,
                "to": s.upper_key,
                "rows_done": s.rows_done,
            }
            for s in slices
        ],
        "error": bf.error,
        "error_range": bf.error_range,
    }
