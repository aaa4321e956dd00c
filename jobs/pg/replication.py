"""What the target's replication looks like: its streaming standbys, its replication slots,
and how far behind each is; and whether that is within a target's (or a backfill's) bounds.

Read on the primary from ``pg_stat_replication`` (replay lag by time, and by bytes behind
``pg_current_wal_lsn()``: the time reads NULL or stays stale once replay has stopped, the
bytes keep growing) and ``pg_replication_slots`` (the WAL each slot holds back). Where the
primary's view is not enough, ``replica_urls`` name the standbys themselves, which report
their own replay position (``pg_last_wal_replay_lsn()``, ``pg_last_xact_replay_timestamp()``).

A standby that is gone from ``pg_stat_replication`` (stopped, or its connection lost) cannot
be waited for: under ``replicas = "check"`` (the default) it is reported, not waited on; its
slot, if it has one, still counts against ``max_retained_wal``. ``replicas = "require"``
treats a ``replica_urls`` standby that does not answer as over the bounds (wait, refuse), and
``replicas = "ignore"`` checks nothing.

Detail of the other sessions' replication needs the ``pg_read_all_stats`` role (or a
superuser): without it PostgreSQL shows NULL positions, and the bounds cannot be checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from jobs.config import Target
    from jobs.pg.url import PgURL

# On a server in recovery (the target is itself a standby) there is no current WAL position.
# Standbys, slots and the position in one statement (one round trip: a backfill asks every
# throttle_check, jobs/backfill/replicas.py); json, which psycopg2 decodes. The standbys are
# pg_stat_replication's rows, read from its functions: the view joins every backend's
# activity (0.5 ms here), pg_stat_get_activity(pid) only the WAL senders'.
_READ = (
    "SELECT (SELECT coalesce(json_agg(json_build_object('name', r.name, 'state', r.state, "
    "'lag_s', r.lag_s, 'lag_bytes', r.lag_bytes) ORDER BY r.name), '[]') FROM ("
    "  SELECT coalesce(nullif(a.application_name, ''), host(a.client_addr), w.pid::text) "
    "  AS name, w.state, extract(epoch FROM w.replay_lag)::float8 AS lag_s, "
    "  CASE WHEN pg_is_in_recovery() THEN NULL "
    "  ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), w.replay_lsn)::bigint END AS lag_bytes "
    "  FROM pg_stat_get_wal_senders() w, LATERAL pg_stat_get_activity(w.pid) a) r) "
    "AS standbys, "
    "(SELECT coalesce(json_agg(json_build_object('name', slot_name, 'kind', slot_type, "
    "'active', active, 'wal_status', wal_status, 'retained_bytes', "
    "CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint END) ORDER BY slot_name), "
    "'[]') FROM pg_replication_slots) AS slots, "
    "CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint END AS position"
)
_WAL_POSITION = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint END"
)
# Asked of a standby itself (replica_urls). Caught up with what it received: no lag, however
# old its last replayed transaction (an idle primary sends none).
_REPLAY = (
    "SELECT pg_is_in_recovery() AS in_recovery, "
    "pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint AS replayed, "
    "CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 "
    "ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END AS lag_s"
)
CONNECT_TIMEOUT_S = 2


@dataclass(frozen=True)
class Standby:
    """One standby, as the primary (or the standby itself) reports it."""

    name: str
    state: str  # streaming, catchup, … (pg_stat_replication); "unreachable" for a replica URL
    lag_s: float | None
    lag_bytes: int | None
    source: str = "primary"  # "primary" (pg_stat_replication) or "replica_url"


@dataclass(frozen=True)
class Slot:
    """One replication slot and the WAL it holds back on the primary."""

    name: str
    kind: str  # physical or logical
    active: bool
    retained_bytes: int | None
    wal_status: str | None = None


@dataclass(frozen=True)
class Replication:
    """The target's standbys and slots at one moment, and its WAL position then (bytes)."""

    standbys: tuple[Standby, ...] = ()
    slots: tuple[Slot, ...] = ()
    wal_position: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "standbys": [asdict(s) for s in self.standbys],
            "slots": [asdict(s) for s in self.slots],
            "wal_position": self.wal_position,
        }


@dataclass(frozen=True)
class Bounds:
    """How far behind standbys and slots may be (a target's settings, or a backfill's)."""

    max_lag_s: float = 2.0
    max_lag_bytes: int = 64 << 20
    max_retained_bytes: int = 1 << 30
    mode: str = "check"  # check | ignore | require (module docstring)

    @classmethod
    def of_target(cls, target: Target) -> Bounds:
        return cls(
            max_lag_s=target.max_replica_lag_ms / 1000,
            max_lag_bytes=target.max_replica_lag_bytes,
            max_retained_bytes=target.max_retained_wal_bytes,
            mode=target.replicas,
        )


def size(n: int | float | None) -> str:
    """Bytes for a person: 512 B, 3.4 MB, 1.2 GB."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover - the loop returns at GB


def read(conn: Connection, replica_urls: tuple[PgURL, ...] = ()) -> Replication:
    """The target's replication now, from the primary (``conn``) and any ``replica_urls``.
    Leaves ``conn`` outside a transaction."""
    row = conn.exec_driver_sql(_READ).one()
    if conn.in_transaction():
        conn.rollback()
    standbys = [Standby(s["name"], s["state"], s["lag_s"], s["lag_bytes"]) for s in row.standbys]
    slots = [
        Slot(s["name"], s["kind"], bool(s["active"]), s["retained_bytes"], s["wal_status"])
        for s in row.slots
    ]
    position = None if row.position is None else int(row.position)
    standbys += [_ask_standby(url, position) for url in replica_urls]
    return Replication(tuple(standbys), tuple(slots), position)


def wal_position(conn: Connection) -> int | None:
    """The primary's current WAL position in bytes (None on a standby)."""
    value = conn.exec_driver_sql(_WAL_POSITION).scalar()
    return None if value is None else int(value)


def _ask_standby(url: PgURL, primary_position: int | None) -> Standby:
    """A standby's own report of its replay (replica_urls), or "unreachable"."""
    import psycopg2

    name = f"{url.host or 'localhost'}:{url.port or 5432}"
    try:
        conn = psycopg2.connect(
            **url.connect_kwargs(),
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="runbook replica check",
        )
    except psycopg2.Error:
        return Standby(name, "unreachable", None, None, "replica_url")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(_REPLAY)
            in_recovery, replayed, lag_s = cur.fetchone()
    except psycopg2.Error:
        return Standby(name, "unreachable", None, None, "replica_url")
    finally:
        conn.close()
    if not in_recovery:
        return Standby(name, "not a standby", None, None, "replica_url")
    behind = None if primary_position is None or replayed is None else primary_position - replayed
    return Standby(
        name, "streaming", lag_s, max(0, behind) if behind is not None else None, "replica_url"
    )


@dataclass
class Verdict:
    """Why replication is over its bounds (the first reason, for a person), or not."""

    reasons: list[str] = field(default_factory=list)
    # What each reason is about, in the same order: ("standby" | "slot", its name).
    subjects: list[tuple[str, str]] = field(default_factory=list)

    def add(self, kind: str, name: str, reason: str) -> None:
        self.reasons.append(reason)
        self.subjects.append((kind, name))

    @property
    def reason(self) -> str | None:
        return self.reasons[0] if self.reasons else None

    def __bool__(self) -> bool:
        return bool(self.reasons)


def over_bounds(rep: Replication, bounds: Bounds, ahead_bytes: int = 0) -> Verdict:
    """Every standby lagging past the bounds and every slot retaining too much WAL, each as
    one line (``replica lag 3.4 s on standby1``); empty when all is within them.

    ``ahead_bytes``: the WAL the caller is about to write (a backfill's next batch). A standby
    whose lag would pass max_replica_lag_bytes with it counts as over now, so that the lag
    stays under the bound rather than under the bound plus a batch."""
    verdict = Verdict()
    ahead = max(ahead_bytes, 0)
    if bounds.mode == "ignore":
        return verdict
    for s in rep.standbys:
        if s.state == "unreachable" or s.state == "not a standby":
            if bounds.mode == "require":
                verdict.add(
                    "standby", s.name, f'standby {s.name} is {s.state} (replicas = "require")'
                )
            continue
        if s.lag_s is not None and s.lag_s > bounds.max_lag_s:
            verdict.add(
                "standby",
                s.name,
                f"replica lag {s.lag_s:.1f} s on {s.name} (max_replica_lag {bounds.max_lag_s:g} s)",
            )
        elif s.lag_bytes is not None and s.lag_bytes + ahead > bounds.max_lag_bytes:
            coming = (
                f", with the next {size(ahead)}"
                if ahead and s.lag_bytes <= bounds.max_lag_bytes
                else ""
            )
            verdict.add(
                "standby",
                s.name,
                f"replica lag {size(s.lag_bytes)} on {s.name} "
                f"(max_replica_lag_bytes {size(bounds.max_lag_bytes)}{coming})",
            )
    for slot in rep.slots:
        if slot.retained_bytes is not None and slot.retained_bytes > bounds.max_retained_bytes:
            verdict.add(
                "slot",
                slot.name,
                f"slot {slot.name} retains {size(slot.retained_bytes)} of WAL "
                f"(max_retained_wal {size(bounds.max_retained_bytes)})",
            )
    return verdict


def describe(rep: Replication) -> list[str]:
    """One line per standby and slot, for preflight, plan and doctor."""
    lines = []
    for s in rep.standbys:
        lag = "lag ?" if s.lag_s is None else f"lag {s.lag_s:.1f} s"
        lines.append(f"standby {s.name}: {s.state}, {lag}, {size(s.lag_bytes)} behind")
    for slot in rep.slots:
        active = "active" if slot.active else "inactive"
        lines.append(
            f"slot {slot.name} ({slot.kind}, {active}): retains {size(slot.retained_bytes)}"
        )
    return lines or ["no standbys or replication slots"]
