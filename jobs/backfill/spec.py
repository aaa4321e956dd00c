"""What a backfill is asked to do (Spec), and the SQL fragments it embeds.

The SET and WHERE texts are SQL fragments interpolated into the UPDATE: validate an
operator's input with ``jobs.backfill.sqlguard`` before it reaches a Spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.errors import BadSpec

if TYPE_CHECKING:
    from jobs.config import Target

# format_type() of a usable key -> the type its cursor is cast to.
KEY_TYPES = {
    "smallint": "smallint",
    "integer": "integer",
    "bigint": "bigint",
    "uuid": "uuid",
    "text": "text",
    "character varying": "varchar",
}

MAX_SLICES = 64
ON_ERROR = ("stop", "isolate")
# How far a batch size may drift from the chosen one while the walk aims at its target
# duration (jobs/backfill/sizing.py): widened when the chosen size lies outside.
MIN_BATCH = 100
MAX_BATCH = 50000


def batch_bounds(batch_size: int) -> tuple[int, int]:
    """(min_batch, max_batch) for a backfill that starts with ``batch_size`` rows a batch:
    an operator's (jobs/api/backfills.py) and a revision's (jobs/project/scripts.py) alike."""
    return min(MIN_BATCH, batch_size), max(MAX_BATCH, batch_size)


@dataclass(frozen=True)
class Spec:
    """What to update and how fast. ``set_sql``/``where_sql`` must be validated SQL."""

    table: str
    key: str
    set_sql: str
    where_sql: str | None = None
    batch_size: int = 1000
    min_batch: int = MIN_BATCH
    max_batch: int = MAX_BATCH
    target_batch_ms: int = 50
    sleep_ms: int = 0
    lock_timeout_ms: int = 2000
    statement_timeout_ms: int = 30000
    slices: int = 1
    on_error: str = "stop"  # or "isolate": bisect a failing batch, skip the offending rows
    max_xact_age_s: int = 600  # wait while a transaction this old holds back vacuum; 0: never
    # Replica-aware throttling (jobs/backfill/replicas.py); replica_bounds() gives a target's.
    max_replica_lag_ms: int = 2000
    max_replica_lag_bytes: int = 64 << 20
    max_retained_wal_bytes: int = 1 << 30
    max_wal_rate_bytes: int | None = None  # bytes of WAL a second; None: no bound
    max_throttle_ms: int = 30 * 60_000  # one throttle held longer pauses the backfill

    def check(self) -> None:
        """Raise BadSpec for settings that cannot work."""
        if not self.set_sql.strip():
            raise BadSpec("the backfill has nothing to SET; give --set 'column = expression'")
        if not 1 <= self.min_batch <= self.batch_size <= self.max_batch:
            raise BadSpec(
                f"batch sizes must satisfy 1 <= min ({self.min_batch}) <= batch size "
                f"({self.batch_size}) <= max ({self.max_batch})"
            )
        for name in ("target_batch_ms", "lock_timeout_ms", "statement_timeout_ms"):
            if getattr(self, name) < 1:
                raise BadSpec(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sleep_ms < 0:
            raise BadSpec(f"sleep_ms must be 0 or more, got {self.sleep_ms}")
        if not 1 <= self.slices <= MAX_SLICES:
            raise BadSpec(f"--slices must be between 1 and {MAX_SLICES}, got {self.slices}")
        if self.on_error not in ON_ERROR:
            raise BadSpec(f"--on-error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}")
        if self.max_xact_age_s < 0:
            raise BadSpec(f"max_xact_age_s must be 0 (off) or more, got {self.max_xact_age_s}")
        for name in REPLICA_BOUNDS:
            value = getattr(self, name)
            if (value is not None or name != "max_wal_rate_bytes") and (value or 0) < 1:
                raise BadSpec(f"{name} must be at least 1, got {value}")

    def settings(self) -> dict[str, int | None]:
        """The batch sizes, pacing and timeouts, as the ledger stores them."""
        return {
            "batch_size": self.batch_size,
            "min_batch": self.min_batch,
            "max_batch": self.max_batch,
            "target_batch_ms": self.target_batch_ms,
            "sleep_ms": self.sleep_ms,
            "lock_timeout_ms": self.lock_timeout_ms,
            "statement_timeout_ms": self.statement_timeout_ms,
            "max_xact_age_s": self.max_xact_age_s,
            **{name: getattr(self, name) for name in REPLICA_BOUNDS},
        }


# The Spec's replica bounds, each named as the Target field it defaults to (jobs/config.py).
REPLICA_BOUNDS = (
    "max_replica_lag_ms",
    "max_replica_lag_bytes",
    "max_retained_wal_bytes",
    "max_wal_rate_bytes",
    "max_throttle_ms",
)


def replica_bounds(target: Target, **given: int | None) -> dict[str, Any]:
    """A backfill's replica bounds: those ``given`` (not None), the target's for the rest
    (Spec's keyword arguments)."""
    return {
        name: given[name] if given.get(name) is not None else getattr(target, name)
        for name in REPLICA_BOUNDS
    }


# -- creating a backfill ----------------------------------------------------------------------


def embed(fragment: str) -> str:
    """An SQL fragment made safe for ``text()``: its colons are not bind parameters."""
    return fragment.replace(":", "\\:")
