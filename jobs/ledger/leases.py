"""The ledger's leases: deliveries of runs and slices that started, heartbeats, and the stale
ones the reconciler takes over.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from jobs.ledger.sql import query, tx

# -- leases and reconciliation ------------------------------------------------------------------
# A delivery of a run's task holds a lease (heartbeat_at, renewed while it works) and counts
# itself in `unfinished` until it returns normally; a slice's lease is its updated_at (every
# batch and hand-off renews it) and its `unfinished` the same count. The reconciler sends
# again what has no live lease; a count that keeps growing is a poison message.


def begin_delivery(conn: Connection, run_id: str, worker: str) -> int | None:
    """A delivery of the run's task starts: take the lease; how many deliveries in a row have
    now started without returning (this one included). None when the run has ended. Commits."""
    with tx(conn):
        value = conn.execute(query("begin_delivery"), {"id": run_id, "w": worker}).scalar()
    return None if value is None else int(value)


def heartbeat(conn: Connection, run_id: str) -> None:
    """Renew the run's lease. Commits."""
    with tx(conn):
        conn.execute(query("heartbeat"), {"id": run_id})


def end_delivery(conn: Connection, run_id: str) -> None:
    """The delivery returned normally: the run is not poison, and its lease is given back."""
    with tx(conn):
        conn.execute(query("end_delivery"), {"id": run_id})


def begin_slice_delivery(conn: Connection, backfill_id: str, slice_no: int, generation: int) -> int:
    """A slice's task starts: how many in a row have started without returning (this one
    included); 0 when the task is not the slice's current generation. Commits."""
    with tx(conn):
        value = conn.execute(
            query("begin_slice_delivery"), {"id": backfill_id, "n": slice_no, "g": generation}
        ).scalar()
    return 0 if value is None else int(value)


def unsent_continuation(
    conn: Connection, backfill_id: str, slice_no: int, generation: int
) -> int | None:
    """The generation ``generation`` handed its active slice to, when no task of that next
    generation has started yet: the task that handed it over may have died before it queued
    the continuation, leaving the slice to wait for its lease. None otherwise."""
    with tx(conn):
        value = conn.execute(
            query("unsent_continuation"), {"id": backfill_id, "n": slice_no, "g": generation}
        ).scalar()
    return None if value is None else int(value)


def end_slice_delivery(conn: Connection, backfill_id: str, slice_no: int) -> None:
    """The slice's task returned normally."""
    with tx(conn):
        conn.execute(query("end_slice_delivery"), {"id": backfill_id, "n": slice_no})


@dataclass
class StaleRun:
    id: str
    target: str
    state: str
    unfinished: int


def stale_runs(conn: Connection, lease_s: float) -> list[StaleRun]:
    """Unfinished runs nobody holds: no live lease (or, never started, queued longer than a
    lease), and no backfill of theirs still going (that backfill sends the run on)."""
    rows = conn.execute(query("stale_runs"), {"lease": lease_s}).all()
    if conn.in_transaction():
        conn.rollback()
    return [StaleRun(r.id, r.target, r.state, int(r.unfinished)) for r in rows]


def take_stale_slices(conn: Connection, lease_s: float) -> list[tuple[str, str, int, int]]:
    """Active slices of going backfills whose lease ran out, each taken over with a new
    generation (fencing a worker that may still wake up); [(backfill, target, slice,
    generation)] to send. A backfill created but never started is started. Commits."""
    with tx(conn):
        started = conn.execute(query("start_stale_backfills"), {"lease": lease_s}).scalars()
        for backfill_id in list(started):
            conn.execute(query("expire_backfill_slices"), {"id": backfill_id, "lease": lease_s})
        rows = conn.execute(query("take_stale_slices"), {"lease": lease_s}).all()
    return [(r.backfill_id, r.target, int(r.slice), int(r.generation)) for r in rows]


# -- leftovers (jobs/backups/leftovers.py): whose scratch database or partial dump is dead --


@dataclass
class RunDeliveries:
    id: str
    target: str
    state: str
    finished: bool
    deliveries: int


def run_deliveries(conn: Connection, run_ids: set[str]) -> dict[str, RunDeliveries]:
    """State and delivery count of each of ``run_ids`` this ledger holds."""
    rows = conn.execute(query("run_deliveries"), {"ids": sorted(run_ids)}).all()
    if conn.in_transaction():
        conn.rollback()
    return {
        r.id: RunDeliveries(r.id, r.target, r.state, bool(r.finished), int(r.deliveries))
        for r in rows
    }
