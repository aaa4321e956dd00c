"""The advancing pass of a rollout: one short, idempotent step, run by the task
runbook.advance_rollout, that moves a rollout as far as it can go now and sends itself again.

A pass, under the rollout's advisory lock in the control database (a second pass at the same
time gives way):
1. lists the group's members into rows, once (the first pass);
2. follows the members in flight: reads each one's run in its own ledger, records how it
   ended, and sends again a run whose lease has died (its message lost with Redis);
3. checks the failure budget (a failed canary, or more than max_failures failed members,
   halts the rollout: no new member starts, the ones in flight finish);
4. starts members up to ``parallel`` in flight: canaries first and alone, then the rest in
   order; a member already at the revision is skipped without a run;
5. settles the state, and, unless nothing more can happen by itself, sends itself again.

Every member's work is an ordinary run of its target, admitted through the same function as
`runbook apply` (or `rollback --to` when the rollout is rolled back), passed in by the worker
(worker/tasks.py) as ``Senders``: jobs/fleet/ does not depend on jobs/api/.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from jobs import states as st
from jobs.config import Settings, Target, redact
from jobs.dispatch import SendRun
from jobs.errors import BrokerUnavailable, RunbookError, TargetBusy, TargetUnreachable
from jobs.fleet import groups, store
from jobs.fleet.store import MemberRow, Rollout
from jobs.ledger import read
from jobs.ledger.sql import iso
from jobs.run import lease

log = logging.getLogger("runbook.fleet")

R, M = st.RolloutState, st.MemberState
# While members are in flight, the next pass comes this soon (a member's run that ends sends
# one at once, worker/tasks.py); the reconciler sends one for a rollout not advanced for
# STALE_AFTER_S (jobs/fleet/reconcile.py).
ADVANCE_EVERY_S = 1.0
# A pass a member's end asked for reads only the members in flight for longer than this.
RECHECK_AFTER_S = 2 * ADVANCE_EVERY_S
# A pass stops starting members after this long and sends the next pass at once: a wave of
# thousands of members already at the revision is skipped over several short tasks.
PASS_BUDGET_S = 10.0

# (settings, target, to, strict, rollout id) -> the run's id, or None when already there.
StartApply = Callable[[Settings, str, str, bool, str], "str | None"]
# (settings, target, to, accept_data_loss, rollout id) -> the run's id, or None.
StartRollback = Callable[[Settings, str, str, bool, str], "str | None"]


@dataclass
class Senders:
    """What a pass sends through the queue, passed in by the worker."""

    # (rollout id, countdown in seconds, the pass's token: None for a kick, which always runs)
    advance: Callable[[str, float, str | None], None]
    send_run: SendRun
    apply: StartApply
    rollback: StartRollback


# One pass at a time per rollout: a session lock on the pass's own connection.
_TRY_LOCK = text("SELECT pg_try_advisory_lock(hashtext('runbook-rollout:' || :id))")
_UNLOCK = text("SELECT pg_advisory_unlock(hashtext('runbook-rollout:' || :id))")


def advance(
    settings: Settings, rollout_id: str, senders: Senders, token: str | None = None
) -> dict[str, Any]:
    """One pass over rollout ``rollout_id``; a summary (state and counts) for Flower.

    Each pass sends the next with a new token, and only the pass carrying the latest token
    goes on: the passes that a member's end, the CLI or the reconciler send as kicks (no
    token) would otherwise each start a chain of their own, one more per member."""
    with store.connect(settings, create=True, passing=True) as conn:
        if not _locked(conn, rollout_id):
            # The pass at work goes again when it is done (it looks before it lets go); had
            # it looked already, the lock is free by now and this one takes it.
            store.want_pass(conn, rollout_id)
            if not _locked(conn, rollout_id):
                return {"rollout": rollout_id, "note": "another pass is advancing it"}
        try:
            deadline = time.monotonic() + PASS_BUDGET_S
            found = _pass(settings, conn, rollout_id, senders, token)
            while store.take_wanted(conn, rollout_id) and time.monotonic() < deadline:
                found = _pass(settings, conn, rollout_id, senders, None)
            return found
        finally:
            conn.rollback()
            conn.execute(_UNLOCK, {"id": rollout_id})
            conn.commit()


def _locked(conn: Connection, rollout_id: str) -> bool:
    locked = bool(conn.execute(_TRY_LOCK, {"id": rollout_id}).scalar_one())
    conn.commit()
    return locked


def _pass(
    settings: Settings, conn: Connection, rollout_id: str, senders: Senders, token: str | None
) -> dict[str, Any]:
    r = store.get_rollout(conn, rollout_id)
    if r is None:
        return {"rollout": rollout_id, "note": "no such rollout in the control database"}
    if token is not None and token != r.pass_token:
        return {"rollout": rollout_id, "note": "a newer pass has taken over"}
    if r.settled_at is not None:
        return summary(conn, r)
    store.touch(conn, r.id)
    if not r.members_listed:
        try:
            list_members(settings, conn, r)
        except RunbookError as exc:
            store.set_state(conn, r, R.FAILED, error=f"cannot list group {r.group_name!r}: {exc}")
            return summary(conn, r)
    if r.state == R.ENQUEUED:
        store.set_state(conn, r, R.RUNNING)
    flying = follow(settings, conn, r, senders, full=token is not None)
    if r.state == R.RUNNING:
        check_budget(conn, r, flying)
    more = False  # members left to start that this pass had no time for
    if r.state == R.RUNNING:
        started, more = start_members(settings, conn, r, senders, flying)
        flying += started
    elif r.state == R.ROLLING_BACK:
        started, more = start_rollbacks(settings, conn, r, senders, r.parallel - flying)
        flying += started
    settle(conn, r, flying)
    found = summary(conn, r)
    if found["settled_at"] is None and (token is not None or more or not _chain_alive(r)):
        following = uuid.uuid4().hex
        store.next_pass(conn, r.id, following)
        senders.advance(r.id, 0.0 if more else ADVANCE_EVERY_S, following)
    return found


def _chain_alive(r: Rollout) -> bool:
    """Whether the chain's next pass was sent lately: a pass a member's end asked for then
    leaves it be instead of sending one more (which would only find itself replaced)."""
    if r.pass_token is None or r.pass_sent_at is None:
        return False
    return time.time() - r.pass_sent_at.timestamp() < 3 * ADVANCE_EVERY_S


def list_members(settings: Settings, conn: Connection, r: Rollout) -> None:
    """Record the group's members (the first pass); the first ``canary`` (or the group's
    named canaries, if more) are the canaries."""
    g = groups.group(settings, r.group_name)
    found = groups.members(settings, g)
    canaries = max(r.canary, sum(m.canary for m in found))
    rows = [
        {"ordinal": i, "target": m.name, "canary": i < canaries, "error": m.broken}
        for i, m in enumerate(found)
    ]
    store.insert_members(conn, r.id, rows)


def _member_target(settings: Settings, name: str) -> Target:
    t = groups.resolve(settings, name)
    if t is None:
        raise RunbookError(f"member {name!r} is no longer in runbook.toml or its group's catalog")
    return t


# A member run with no live lease, and no going backfill of its own: a run waiting for its
# declared backfill holds no lease (its delivery ended), while the backfill's slices hold
# theirs; sending the run again would take the walking slices over. Lost slices are the
# reconciler's, which visits the members in flight too (jobs/fleet/reconcile.py). A backfill
# that ended less than a lease ago has just sent its run on. As
# jobs/ledger/queries/leases.sql ``stale_runs`` has it for a target's own runs.
_STALE = (
    "SELECT 1 FROM runbook.runs r WHERE r.id = %(id)s AND r.finished_at IS NULL "
    "AND (r.heartbeat_at IS NULL OR r.heartbeat_at < now() - %(s)s * interval '1 second') "
    "AND NOT EXISTS (SELECT 1 FROM runbook.backfills b WHERE b.run_id = r.id "
    "AND (b.state IN ('enqueued', 'running', 'pausing', 'cancelling') "
    "OR b.finished_at > now() - %(s)s * interval '1 second'))"
)


def _read_run(t: Target, run_id: str, check_lease: bool) -> tuple[Any, bool]:
    """The run, and whether its lease is dead (asked only with ``check_lease``)."""

    def work(c: Any) -> tuple[Any, bool]:
        run = read.get_run(c, run_id)
        if run is None or run.terminal or not check_lease:
            return run, False
        with c.cursor() as cur:
            cur.execute(_STALE, {"id": run_id, "s": lease.LEASE_S})
            return run, cur.fetchone() is not None

    return read.reading(t, work)


def member_ended(settings: Settings, rollout_id: str, run_id: str, target: str) -> None:
    """A member's run ended (said by the task that ran it): record it now, before the pass
    that fills the freed slot, which then need not read every member in flight."""
    with store.connect(settings, passing=True) as conn:
        m = store.member_of_run(conn, rollout_id, run_id)
        if m is None:  # recorded already, or not this rollout's
            return
        run = read.reading(_member_target(settings, target), lambda c: read.get_run(c, run_id))
        if run is not None and run.terminal:
            _ended(conn, m, run, m.state == M.RUNNING)


def follow(
    settings: Settings, conn: Connection, r: Rollout, senders: Senders, *, full: bool = True
) -> int:
    """Record the members in flight whose run has ended; how many are still in flight.

    Not ``full`` (a pass a member's end asked for): a member started less than
    RECHECK_AFTER_S ago is not read, its own end records it (``member_ended``); the passes of
    the chain read them all, so an end whose task died is seen within a second."""
    flying = 0
    for m in store.in_flight(conn, r.id):
        forward = m.state == M.RUNNING
        run_id = m.run_id if forward else m.rollback_run_id
        age = time.time() - m.started_at.timestamp() if m.started_at else 0.0
        if not full and run_id is not None and age < RECHECK_AFTER_S:
            flying += 1
            continue
        try:
            t = _member_target(settings, m.target)
            if run_id is None:  # claimed by a pass that died before it recorded the run
                run_id = _adopt(conn, t, m, forward)
                if run_id is None:
                    continue
            run, dead = _read_run(t, run_id, age > lease.LEASE_S)
        except TargetUnreachable as exc:  # a member's Postgres restarting: ask again later
            log.warning("rollout %s: member %s: %s", r.id, m.target, redact(str(exc)))
            flying += 1
            continue
        except RunbookError as exc:
            store.end_member(conn, m, M.FAILED if forward else M.ROLLBACK_FAILED, error=str(exc))
            continue
        except Exception as exc:  # one member's odd answer must not stop the others
            log.warning("rollout %s: member %s not read: %s", r.id, m.target, redact(str(exc)))
            flying += 1
            continue
        if run is None or run.terminal:
            _ended(conn, m, run, forward)
            continue
        if dead:
            log.warning(
                "rollout %s: run %s of %s has no live lease: sending it again",
                r.id,
                run_id,
                m.target,
            )
            senders.send_run(run_id, m.target)
            store.claim(conn, m, m.state)  # renews started_at: one re-send per lease
        flying += 1
    return flying


_TAGGED = (
    "SELECT id FROM runbook.runs WHERE options->>'rollout' = %(rollout)s AND kind = %(kind)s "
    "ORDER BY created_at DESC LIMIT 1"
)


def _adopt(conn: Connection, t: Target, m: MemberRow, forward: bool) -> str | None:
    """The run a dead pass admitted for ``m`` without recording it (found in the member's
    ledger by its rollout tag), now recorded; None, and the member set back to be started
    again, when there is none."""
    kind = st.RunKind.APPLY if forward else st.RunKind.ROLLBACK

    def tagged(c: Any) -> str | None:
        if not read.exists(c):
            return None
        with c.cursor() as cur:
            cur.execute(_TAGGED, {"rollout": m.rollout_id, "kind": kind})
            row = cur.fetchone()
        return None if row is None else str(row[0])

    run_id = read.reading(t, tagged)
    if run_id is None:
        store.claim(conn, m, M.PENDING if forward else M.SUCCEEDED)
        return None
    store.note_run(conn, m, run_id, forward=forward)
    return run_id


def _ended(conn: Connection, m: MemberRow, run: Any, forward: bool) -> None:
    if run is None:
        store.end_member(
            conn,
            m,
            M.FAILED if forward else M.ROLLBACK_FAILED,
            error="its run is missing from the target's ledger",
        )
    elif forward:
        ok = run.state == st.SUCCEEDED
        error = None if ok else f"run {run.id} {run.state}: {run.error or 'no error recorded'}"
        state = M.SUCCEEDED if ok else M.FAILED
        store.end_member(conn, m, state, error=error, from_revision=run.from_revision)
    else:
        ok = run.state == st.SUCCEEDED
        error = None if ok else f"rollback run {run.id} {run.state}: {run.error or ''}".rstrip(": ")
        store.end_member(conn, m, M.ROLLED_BACK if ok else M.ROLLBACK_FAILED, error=error)


def check_budget(conn: Connection, r: Rollout, flying: int) -> None:
    """Halt on a failed canary, or on more failed members than ``max_failures``. Halted is
    settled only once the ``flying`` members in flight have ended: a watcher must not see
    the rollout come to rest while some of its members still run."""
    counts = store.counts(conn, r.id)
    _, canary_failed = store.canaries(conn, r.id)
    failed = counts.get(M.FAILED, 0)
    if canary_failed:
        store.set_state(
            conn,
            r,
            R.HALTED,
            error=f"a canary failed ({_first_error(conn, r)}); no other member started",
            in_flight=flying,
        )
    elif failed > r.max_failures:
        store.set_state(
            conn,
            r,
            R.HALTED,
            error=(
                f"{failed} member(s) failed, more than --max-failures {r.max_failures} "
                f"({_first_error(conn, r)})"
            ),
            in_flight=flying,
        )


def _first_error(conn: Connection, r: Rollout) -> str:
    for m in store.page(conn, r.id, 1000):
        if m.state in (M.FAILED, M.ROLLBACK_FAILED):
            return f"{m.target}: {m.error}"
    return "no error recorded"


def start_members(
    settings: Settings, conn: Connection, r: Rollout, senders: Senders, flying: int
) -> tuple[int, bool]:
    """Start pending members into the slots ``flying`` members leave free: canaries alone
    first. (started, more to start now: the pass ran out of time)."""
    slots = r.parallel - flying
    started, deadline = 0, time.monotonic() + PASS_BUDGET_S
    while slots - started > 0:
        open_canaries, _ = store.canaries(conn, r.id)
        batch = store.next_pending(conn, r.id, slots - started, canaries_only=open_canaries > 0)
        if not batch:
            return started, False
        for m in batch:
            if time.monotonic() > deadline:
                return started, True
            if _start_one(settings, conn, r, m, senders):
                started += 1
            elif m.state == M.FAILED:  # refused at admission: the budget may be spent now
                check_budget(conn, r, flying + started)
                if r.state != R.RUNNING:
                    return started, False
    return started, False


def _start_one(
    settings: Settings, conn: Connection, r: Rollout, m: MemberRow, senders: Senders
) -> bool:
    """Admit member ``m``'s run; True when it is now in flight (not skipped, not refused)."""
    if not store.claim(conn, m, M.RUNNING):
        return False
    to = r.to_revision or "base"
    try:
        served = groups.serving(settings, m.target)
        run_id = senders.apply(served, m.target, to, r.strict, r.id)
    except BrokerUnavailable:  # not the member's fault: it starts on a later pass
        store.claim(conn, m, M.PENDING)
        raise
    except TargetBusy as exc:
        if exc.holder is None or not _tagged_by(served, m.target, exc.holder, r.id):
            store.end_member(conn, m, M.FAILED, error=str(exc))  # someone else's run
            return False
        run_id = exc.holder  # this rollout's run, admitted by a pass that died
    except RunbookError as exc:
        store.end_member(conn, m, M.FAILED, error=str(exc))
        log.warning("rollout %s: member %s refused: %s", r.id, m.target, redact(str(exc)))
        return False
    if run_id is None:
        store.note_run(
            conn, m, None, forward=True, from_revision=r.to_revision, to_revision=r.to_revision
        )
        store.end_member(conn, m, M.SKIPPED)
        return False
    store.note_run(conn, m, run_id, forward=True, from_revision=None, to_revision=r.to_revision)
    store.note_work(conn, run_id, "run", m.target, r.id)
    return True


def _tagged_by(settings: Settings, name: str, run_id: str, rollout_id: str) -> bool:
    run = read.reading(settings.target(name), lambda c: read.get_run(c, run_id))
    return run is not None and (run.options or {}).get("rollout") == rollout_id


def start_rollbacks(
    settings: Settings, conn: Connection, r: Rollout, senders: Senders, slots: int
) -> tuple[int, bool]:
    """Start the rollback runs of advanced members into ``slots``, each to its own
    from_revision."""
    started, deadline = 0, time.monotonic() + PASS_BUDGET_S
    while slots - started > 0:
        batch = store.next_advanced(conn, r.id, slots - started)
        if not batch:
            return started, False
        for m in batch:
            if time.monotonic() > deadline:
                return started, True
            if not store.claim(conn, m, M.ROLLING_BACK):
                continue
            try:
                served = groups.serving(settings, m.target)
                run_id = senders.rollback(
                    served, m.target, m.from_revision or "base", r.accept_data_loss, r.id
                )
            except BrokerUnavailable:
                store.claim(conn, m, M.SUCCEEDED)
                raise
            except RunbookError as exc:
                store.end_member(conn, m, M.ROLLBACK_FAILED, error=str(exc))
                continue
            if run_id is None:  # already back where it started
                store.end_member(conn, m, M.ROLLED_BACK)
                continue
            store.note_run(conn, m, run_id, forward=False)
            store.note_work(conn, run_id, "run", m.target, r.id)
            started += 1
    return started, False


def settle(conn: Connection, r: Rollout, flying: int) -> None:
    """The state the rollout comes to, now that ``flying`` members are in flight."""
    counts = store.counts(conn, r.id)
    failed = counts.get(M.FAILED, 0)
    if r.state == R.RUNNING and flying == 0 and not counts.get(M.PENDING):
        if failed:
            store.set_state(
                conn, r, R.FAILED, error=f"{failed} member(s) failed ({_first_error(conn, r)})"
            )
        else:
            store.set_state(conn, r, R.SUCCEEDED)
    elif r.state == R.PAUSING and flying == 0:
        store.set_state(conn, r, R.PAUSED)
    elif r.state == R.CANCELLING and flying == 0:
        store.set_state(conn, r, R.CANCELLED, error=r.error)
    elif r.state == R.ROLLING_BACK and flying == 0 and not counts.get(M.SUCCEEDED):
        bad = counts.get(M.ROLLBACK_FAILED, 0)
        if bad:
            store.set_state(
                conn,
                r,
                R.FAILED,
                error=f"{bad} member(s) could not be rolled back ({_first_error(conn, r)})",
            )
        else:
            store.set_state(conn, r, R.ROLLED_BACK)
    elif r.state in st.ROLLOUT_SETTLED:
        store.set_state(conn, r, r.state, error=r.error, in_flight=flying)


def summary(conn: Connection, r: Rollout) -> dict[str, Any]:
    """The rollout's record without its members: what Flower and `runbook rollouts` show."""
    fresh = store.get_rollout(conn, r.id) or r
    return {
        "id": fresh.id,
        "kind": "rollout",
        "group": fresh.group_name,
        "state": fresh.state,
        "to_revision": fresh.to_revision,
        "canary": fresh.canary,
        "parallel": fresh.parallel,
        "max_failures": fresh.max_failures,
        "counts": store.counts(conn, fresh.id),
        "error": fresh.error,
        "created_at": iso(fresh.created_at),
        "settled_at": iso(fresh.settled_at),
    }
