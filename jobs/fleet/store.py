"""The control database: where rollouts and their members live, and the index of work ids.

Its schema ``runbook_control`` is created and upgraded by runbook (migrations/NNNN_*.sql
here, applied in order under an advisory lock, as the ledger's are, jobs/ledger/schema.py).
Every statement is a named query of queries.sql. Rows, not lists in memory: a rollout of
10,000 members is read a page or a wave at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, TextClause, text

from jobs.config import Settings, redact
from jobs.errors import TargetUnreachable
from jobs.fleet.groups import control_target
from jobs.ledger.sql import iso, parse_queries, tx
from jobs.pg import db
from jobs.states import ROLLOUT_SETTLED, check_rollout_transition

SCHEMA = "runbook_control"
_HERE = Path(__file__).parent
# Not the ledger's admission lock: the control database may also be a target.
CONTROL_LOCK_KEY = 0x72756E626F6F6B05  # "runbook" + 5


@functools.cache
def _queries() -> dict[str, str]:
    return parse_queries((_HERE / "queries.sql").read_text(), "jobs/fleet/queries.sql")


@functools.cache
def query(name: str) -> TextClause:
    return text(_queries()[name])


@functools.cache
def migrations() -> list[str]:
    files = sorted((_HERE / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    assert [int(p.name[:4]) for p in files] == list(range(1, len(files) + 1))
    return [p.read_text() for p in files]


@dataclass
class Rollout:
    id: str
    group_name: str
    state: str
    to_revision: str | None
    canary: int
    parallel: int
    max_failures: int
    strict: bool
    accept_data_loss: bool
    members_listed: bool
    error: str | None
    created_at: datetime | None
    updated_at: datetime | None
    advanced_at: datetime | None
    settled_at: datetime | None
    pass_token: str | None = None
    pass_wanted: bool = False
    pass_sent_at: datetime | None = None


@dataclass
class MemberRow:
    rollout_id: str
    ordinal: int
    target: str
    canary: bool
    state: str
    run_id: str | None
    rollback_run_id: str | None
    from_revision: str | None
    to_revision: str | None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ordinal": self.ordinal,
            "canary": self.canary,
            "state": self.state,
            "run_id": self.run_id,
            "rollback_run_id": self.rollback_run_id,
            "from_revision": self.from_revision,
            "to_revision": self.to_revision,
            "error": self.error,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


def _record(cls: type, row: Any) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in row._mapping.items() if k in names})


@contextmanager
def connect(
    settings: Settings, *, create: bool = False, passing: bool = False
) -> Iterator[Connection]:
    """A connection to the control database; with ``create``, its schema made or upgraded
    first (the commands that write: rollout, and the worker's passes). ``passing``: an
    advancing pass's, whose commits do not wait for their WAL flush: what a pass writes is
    found again from the members' own ledgers (a claim by its run's rollout tag, an end by
    the run's state), so a crash that loses its last few commits costs a pass, not a member.
    The commands' writes (a rollout asked for, paused, rolled back) stay synchronous."""
    target = control_target(settings)
    with _named_control(), db.connect(target) as conn:
        if passing:
            conn.execute(text("SET synchronous_commit = off"))
            conn.commit()
        if create:
            ensure(conn)
        yield conn


@contextmanager
def _named_control() -> Iterator[None]:
    """Connection errors name the control database, not a target called 'control'."""
    try:
        yield
    except TargetUnreachable as exc:
        message = str(exc).replace("target 'control'", "the control database ([control])")
        raise TargetUnreachable(message) from None


def exists(conn: Connection) -> bool:
    found = bool(conn.execute(query("control_exists")).scalar_one())
    conn.rollback()
    return found


def ensure(conn: Connection) -> None:
    """Create or upgrade the control schema; safe to call concurrently. Commits."""
    if exists(conn) and _version(conn) == len(migrations()):
        return
    with tx(conn):
        conn.execute(query("take_control_lock"), {"k": CONTROL_LOCK_KEY})
        conn.execute(query("create_control_schema"))
        conn.execute(query("create_control_version"))
        version = conn.execute(query("control_version")).scalar()
        for number, ddl in enumerate(migrations(), start=1):
            if version is None or number > version:
                conn.execute(text(ddl))
                conn.execute(query("record_control_version"), {"v": number})


def _version(conn: Connection) -> int | None:
    found = conn.execute(query("control_version")).scalar()
    conn.rollback()
    return None if found is None else int(found)


# -- rollouts --------------------------------------------------------------------------------


def insert_rollout(conn: Connection, **values: Any) -> None:
    with tx(conn):
        conn.execute(query("insert_rollout"), values)


def get_rollout(conn: Connection, rollout_id: str) -> Rollout | None:
    row = conn.execute(query("get_rollout"), {"id": rollout_id}).first()
    conn.rollback()
    return None if row is None else _record(Rollout, row)


def list_rollouts(conn: Connection, group_name: str | None, limit: int) -> list[Rollout]:
    rows = conn.execute(query("list_rollouts"), {"group_name": group_name, "limit": limit}).all()
    conn.rollback()
    return [_record(Rollout, r) for r in rows]


def set_state(
    conn: Connection,
    rollout: Rollout,
    state: str,
    *,
    error: str | None = None,
    in_flight: int = 0,
    accept_data_loss: bool | None = None,
) -> None:
    """Move ``rollout`` to ``state`` (the table in jobs/states.py); the same state again only
    renews whether it has settled."""
    if state != rollout.state:
        check_rollout_transition(rollout.state, state)
    settled = state in ROLLOUT_SETTLED and in_flight == 0
    with tx(conn):
        conn.execute(
            query("set_rollout_state"),
            {
                "id": rollout.id,
                "state": state,
                "error": None if error is None else redact(error),
                "settled": settled,
                "accept_data_loss": accept_data_loss,
            },
        )
    rollout.state, rollout.error = state, error


def touch(conn: Connection, rollout_id: str) -> None:
    with tx(conn):
        conn.execute(query("touch_rollout"), {"id": rollout_id})


def want_pass(conn: Connection, rollout_id: str) -> None:
    with tx(conn):
        conn.execute(query("want_pass"), {"id": rollout_id})


def take_wanted(conn: Connection, rollout_id: str) -> bool:
    """Whether a pass was asked for since the last look (and no longer)."""
    with tx(conn):
        return conn.execute(query("take_wanted"), {"id": rollout_id}).first() is not None


def next_pass(conn: Connection, rollout_id: str, token: str) -> None:
    with tx(conn):
        conn.execute(query("next_pass"), {"id": rollout_id, "token": token})


def stale_rollouts(conn: Connection, after_s: float) -> list[str]:
    rows = conn.execute(query("stale_rollouts"), {"after_s": after_s}).all()
    conn.rollback()
    return [str(r[0]) for r in rows]


def targets_in_flight(conn: Connection) -> list[str]:
    rows = conn.execute(query("targets_in_flight")).all()
    conn.rollback()
    return [str(r[0]) for r in rows]


# -- members ---------------------------------------------------------------------------------


def insert_members(conn: Connection, rollout_id: str, rows: list[dict[str, Any]]) -> None:
    """Record the members (ordinal, target, canary, error) and mark the listing done, in one
    transaction: a pass that dies half-way lists them again from the start."""
    with tx(conn):
        for start in range(0, len(rows), 1000):
            conn.execute(
                query("insert_member"),
                [{"rollout_id": rollout_id, **r} for r in rows[start : start + 1000]],
            )
        conn.execute(query("members_listed"), {"id": rollout_id})


def counts(conn: Connection, rollout_id: str) -> dict[str, int]:
    rows = conn.execute(query("member_counts"), {"id": rollout_id}).all()
    conn.rollback()
    return {str(r[0]): int(r[1]) for r in rows}


def canaries(conn: Connection, rollout_id: str) -> tuple[int, int]:
    """(canaries not yet through, canaries failed)."""
    row = conn.execute(query("canary_counts"), {"id": rollout_id}).one()
    conn.rollback()
    return int(row[0]), int(row[1])


def _members(conn: Connection, name: str, params: dict[str, Any]) -> list[MemberRow]:
    rows = conn.execute(query(name), params).all()
    conn.rollback()
    return [_record(MemberRow, r) for r in rows]


def in_flight(conn: Connection, rollout_id: str) -> list[MemberRow]:
    return _members(conn, "members_in_flight", {"id": rollout_id})


def member_of_run(conn: Connection, rollout_id: str, run_id: str) -> MemberRow | None:
    found = _members(conn, "member_of_run", {"id": rollout_id, "run": run_id})
    return found[0] if found else None


def next_pending(
    conn: Connection, rollout_id: str, n: int, *, canaries_only: bool
) -> list[MemberRow]:
    return _members(
        conn, "next_pending", {"id": rollout_id, "n": n, "canaries_only": canaries_only}
    )


def next_advanced(conn: Connection, rollout_id: str, n: int) -> list[MemberRow]:
    return _members(conn, "next_advanced", {"id": rollout_id, "n": n})


def page(conn: Connection, rollout_id: str, limit: int, offset: int = 0) -> list[MemberRow]:
    return _members(conn, "members_page", {"id": rollout_id, "limit": limit, "offset": offset})


def claim(conn: Connection, member: MemberRow, state: str) -> bool:
    """Move ``member`` from the state it was read in to ``state``; False when another pass
    did first."""
    with tx(conn):
        row = conn.execute(
            query("claim_member"),
            {
                "id": member.rollout_id,
                "ordinal": member.ordinal,
                "state": state,
                "seen": member.state,
            },
        ).first()
    if row is not None:
        member.state = state
    return row is not None


def note_run(
    conn: Connection,
    member: MemberRow,
    run_id: str | None,
    *,
    forward: bool,
    from_revision: str | None = None,
    to_revision: str | None = None,
) -> None:
    with tx(conn):
        conn.execute(
            query("member_run"),
            {
                "id": member.rollout_id,
                "ordinal": member.ordinal,
                "run_id": run_id if forward else None,
                "rollback_run_id": None if forward else run_id,
                "forward": forward,
                "from_revision": from_revision,
                "to_revision": to_revision,
            },
        )


def end_member(
    conn: Connection,
    member: MemberRow,
    state: str,
    *,
    error: str | None = None,
    from_revision: Any = ...,
) -> None:
    """Record how a member ended; ``from_revision`` as its run recorded it, when known."""
    with tx(conn):
        conn.execute(
            query("end_member"),
            {
                "id": member.rollout_id,
                "ordinal": member.ordinal,
                "state": state,
                "error": None if error is None else redact(error),
                "from_known": from_revision is not ...,
                "from_revision": None if from_revision is ... else from_revision,
            },
        )
    member.state = state


def retry_failed(conn: Connection, rollout_id: str) -> None:
    with tx(conn):
        conn.execute(query("retry_failed"), {"id": rollout_id})


def retry_rollbacks(conn: Connection, rollout_id: str) -> None:
    with tx(conn):
        conn.execute(query("retry_rollbacks"), {"id": rollout_id})


# -- the index of work ids -------------------------------------------------------------------


def note_work(
    conn: Connection, work_id: str, kind: str, target: str, rollout_id: str | None = None
) -> None:
    with tx(conn):
        conn.execute(
            query("note_work"),
            {"id": work_id, "kind": kind, "target": target, "rollout_id": rollout_id},
        )
