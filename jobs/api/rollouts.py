"""Rollouts: one revision across a group of targets (jobs/fleet/): start, status, list, wait,
follow, pause, resume, cancel and rollback. Each call checks its input, writes the rollout's
record in the control database and sends the rollout's advancing task; the members' runs are
started by that task, on the workers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from jobs import dispatch, ids
from jobs.api.common import check_broker, resolve_settings
from jobs.config import Settings, Target
from jobs.errors import (
    BrokerUnavailable,
    ConfigError,
    RunbookError,
    UnknownRollout,
    UnrenderableRevision,
)
from jobs.fleet import groups, index
from jobs.lazy import lazy
from jobs.states import MEMBER_ADVANCED, MemberState, RolloutState

# Loaded on first use: `import jobs.api` (and so `runbook status`) must not load SQLAlchemy
# (tests/integration/test_status_imports.py).
if TYPE_CHECKING:
    from sqlalchemy import Connection

    from jobs.fleet import advance, store
    from jobs.project import losses
else:
    advance = lazy("jobs.fleet.advance")
    store = lazy("jobs.fleet.store")
    losses = lazy("jobs.project.losses")

R = RolloutState
# What `pause`, `resume` and `cancel` may act on, and the state each moves a rollout to.
_CONTROLS: dict[str, tuple[frozenset[str], str]] = {
    "pause": (frozenset({R.ENQUEUED, R.RUNNING}), R.PAUSING),
    "resume": (frozenset({R.PAUSING, R.PAUSED, R.HALTED, R.FAILED}), R.RUNNING),
    "cancel": (frozenset({R.ENQUEUED, R.RUNNING, R.PAUSING, R.PAUSED, R.HALTED}), R.CANCELLING),
}
# Member states a rollback leaves: a rollout holding any of them is not resumed forward.
_ROLLED = (MemberState.ROLLING_BACK, MemberState.ROLLED_BACK, MemberState.ROLLBACK_FAILED)
# `rollback ROLLOUT` once no member starts any more by itself.
_ROLLBACK_FROM = frozenset({R.SUCCEEDED, R.HALTED, R.PAUSED, R.CANCELLED, R.FAILED})


def _send(settings: Settings, rollout_id: str) -> None:
    dispatch.for_settings(settings).send_rollout(rollout_id)


def _project_revision(settings: Settings, g: groups.Group, to: str) -> str | None:
    """``to`` resolved once for the whole rollout, so that every member goes to the same
    revision even if one is added while it runs. The members' projects must agree."""
    from jobs.project.runtime import Project

    if g.is_catalog:
        projects: list[Target] = [groups.row_template(settings, g)]
    else:
        by_ini: dict[str, Target] = {}
        for m in groups.members(settings, g):
            if m.target is not None:
                by_ini.setdefault(str(m.target.alembic_ini), m.target)
        projects = list(by_ini.values())
    if not projects:
        raise ConfigError(f"group {g.name!r}: no member is usable (each is broken)")
    resolved = {Project(t).resolve(to) for t in projects}
    if len(resolved) > 1:
        raise ConfigError(
            f"group {g.name!r}: its members' Alembic projects disagree on what --to {to} is "
            f"({', '.join(sorted(r or 'base' for r in resolved))}); give a revision id"
        )
    return resolved.pop()


def start_rollout(
    group: str,
    to: str = "head",
    *,
    canary: int | None = None,
    parallel: int = 4,
    max_failures: int = 0,
    strict: bool = False,
    settings: Settings | None = None,
) -> str:
    """Check the request, record the rollout and send its first pass; its id. RunbookError,
    with nothing recorded, on bad input (unknown group, no control database, bad revision,
    broker away)."""
    settings = resolve_settings(settings)
    g = groups.group(settings, group)
    groups.control_target(settings)  # no control database: one line before anything else
    if parallel < 1 or max_failures < 0 or (canary is not None and canary < 0):
        raise ConfigError("--parallel must be >= 1, --canary and --max-failures >= 0")
    if not g.is_catalog:
        groups.members(settings, g)  # a name that is not configured: refused now
    to_revision = _project_revision(settings, g, to)
    check_broker(settings)
    rollout_id = ids.new_rollout_id()
    with store.connect(settings, create=True) as conn:
        store.insert_rollout(
            conn,
            id=rollout_id,
            group_name=g.name,
            to_revision=to_revision,
            canary=1 if canary is None else canary,
            parallel=parallel,
            max_failures=max_failures,
            strict=strict,
        )
        try:
            _send(settings, rollout_id)
        except BrokerUnavailable as exc:
            r = _get(conn, rollout_id)
            store.set_state(conn, r, R.CANCELLED, error=str(exc))
            raise BrokerUnavailable(f"{exc} (rollout {rollout_id} is cancelled)") from None
    return rollout_id


def _get(conn: Connection, rollout_id: str) -> store.Rollout:
    r = store.get_rollout(conn, rollout_id) if store.exists(conn) else None
    if r is None:
        raise UnknownRollout(f"unknown rollout {rollout_id!r}; `runbook rollouts` lists them")
    return r


def find_rollout(work_id: str, *, settings: Settings | None = None) -> bool:
    """Whether ``work_id`` is a rollout's id (False without a control database)."""
    found = index.find(resolve_settings(settings), work_id)
    return found is not None and found[0] == ids.ROLLOUT


def rollout_status(rollout_id: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """The rollout's record, its counts per member state and every member in order."""
    settings = resolve_settings(settings)
    with store.connect(settings) as conn:
        r = _get(conn, rollout_id)
        found = advance.summary(conn, r)
        members: list[dict[str, Any]] = []
        while True:
            page = store.page(conn, r.id, 1000, len(members))
            members += [m.as_dict() for m in page]
            if len(page) < 1000:
                break
        found["members"] = members
        return found


def list_rollouts(
    group: str | None = None, *, limit: int = 20, settings: Settings | None = None
) -> list[dict[str, Any]]:
    """The newest rollouts (of one group), newest first, with their counts."""
    settings = resolve_settings(settings)
    if group is not None:
        groups.group(settings, group)
    with store.connect(settings) as conn:
        if not store.exists(conn):
            return []
        return [advance.summary(conn, r) for r in store.list_rollouts(conn, group, limit)]


def control_rollout(
    action: str, rollout_id: str, *, settings: Settings | None = None
) -> dict[str, Any]:
    """pause (no new member starts), resume (go on; after a halt, the failed members are
    tried again) or cancel (no new member starts, for good)."""
    settings = resolve_settings(settings)
    allowed, new = _CONTROLS[action]
    check_broker(settings)
    with store.connect(settings) as conn:
        r = _get(conn, rollout_id)
        if r.state not in allowed:
            raise RunbookError(
                f"rollout {rollout_id} is {r.state}; {action} applies to a rollout that is "
                f"{', '.join(sorted(allowed))}"
            )
        if action == "resume" and r.state in (R.HALTED, R.FAILED):
            if any(store.counts(conn, r.id).get(s) for s in _ROLLED):
                raise RunbookError(
                    f"rollout {rollout_id} failed while rolling back; `runbook rollback "
                    f"{rollout_id}` tries the members left again"
                )
            store.retry_failed(conn, r.id)
        error = "cancelled by an operator" if action == "cancel" else None
        if action == "cancel" and r.state == R.ENQUEUED:
            new = R.CANCELLED
        store.set_state(conn, r, new, error=error)
        _send(settings, r.id)
        return advance.summary(conn, r)


# Members checked at once for the data their rollback would destroy: one connection each.
LOSS_CHECKS_AT_ONCE = 8
LOSSES_SHOWN = 3  # members named in the refusal; the rest counted


def _member_losses(
    settings: Settings, m: store.MemberRow, drops_of: losses.DropsOnce
) -> tuple[str, list[str], bool]:
    """What rolling ``m`` back to its from_revision would destroy, and whether it takes backups.
    A member that cannot be reached or read now is not held against the others: its own
    rollback run checks again (jobs/api/runs.py enqueue_rollback) and fails with its line. A
    downgrade that cannot be rendered is the project's, not the member's: refused for all."""
    from sqlalchemy.exc import DBAPIError

    from jobs.pg import db
    from jobs.project.runtime import Project

    try:
        t = groups.resolve(settings, m.target)
        if t is None:
            return m.target, [], True
        project = Project(t)
        try:
            with db.connect(t) as member:
                path = project.upgrade_path(m.from_revision, project.current(member))
                found = losses.data_loss(member, project, list(reversed(path)), drops_of)
        finally:
            project.close()
    except UnrenderableRevision as exc:  # every member's rollback run would fail on it
        raise UnrenderableRevision(
            f"{m.target}: {exc}; no member was sent a rollback: roll such a revision back by "
            "restoring each member from a backup taken before the rollout "
            "(`runbook restore --target MEMBER --backup ID`)"
        ) from None
    except (RunbookError, DBAPIError):  # gone mid-read, a permission: its own run says
        return m.target, [], True
    return t.name, [f"{t.name}: {loss}" for loss in found], t.backup


def _losses(settings: Settings, conn: Connection, r: store.Rollout) -> tuple[list[str], str | None]:
    """What rolling back every member the rollout advanced would destroy (tables and columns
    holding rows), member by member, before anything is sent, as `rollback --to` refuses it
    for one target: a refusal met half way through would leave the fleet split. Also the first
    such member that takes no backup, when one does not."""
    advanced: list[store.MemberRow] = []
    while page := store.page(conn, r.id, 1000, len(advanced)):
        advanced += page
    advanced = [m for m in advanced if m.state in MEMBER_ADVANCED]
    drops_of = losses.DropsOnce()  # each revision rendered once for the whole fleet
    with ThreadPoolExecutor(LOSS_CHECKS_AT_ONCE) as pool:
        checked = list(pool.map(lambda m: _member_losses(settings, m, drops_of), advanced))
    found = [(name, lost, backs_up) for name, lost, backs_up in checked if lost]
    lines = [line for _, lost, _ in found[:LOSSES_SHOWN] for line in lost]
    if len(found) > LOSSES_SHOWN:
        lines.append(f"and {len(found) - LOSSES_SHOWN} more member(s)")
    no_backup = next((name for name, _, backs_up in found if not backs_up), None)
    return lines, no_backup


def rollback_rollout(
    rollout_id: str, *, accept_data_loss: bool = False, settings: Settings | None = None
) -> dict[str, Any]:
    """Roll back exactly the members the rollout advanced, each to its own from_revision, in
    the same waves; refused, as `rollback --to` is, when that would destroy data."""
    settings = resolve_settings(settings)
    check_broker(settings)
    with store.connect(settings) as conn:
        r = _get(conn, rollout_id)
        if r.state not in _ROLLBACK_FROM:
            raise RunbookError(
                f"rollout {rollout_id} is {r.state}; pause or cancel it first (`runbook "
                f"cancel {rollout_id}`), then roll it back"
            )
        lost, no_backup = _losses(settings, conn, r)
        if lost and not accept_data_loss:
            raise RunbookError(
                f"{'; '.join(lost)}; pass --accept-data-loss to go ahead (each member takes a "
                "verified backup first)"
            )
        if lost and no_backup:
            raise RunbookError(
                f"{no_backup} would lose data; --accept-data-loss needs a backup, and that "
                "member has backup = false"
            )
        store.retry_rollbacks(conn, r.id)
        store.set_state(conn, r, R.ROLLING_BACK, accept_data_loss=accept_data_loss)
        _send(settings, r.id)
        return advance.summary(conn, r)


def follow_rollout(
    rollout_id: str, *, interval_s: float = 0.5, settings: Settings | None = None
) -> Iterator[dict[str, Any]]:
    """The rollout's summary now and every ``interval_s`` until it settles: the last one
    yielded (with its members)."""
    settings = resolve_settings(settings)
    with store.connect(settings) as conn:
        _get(conn, rollout_id)
        while True:
            r = _get(conn, rollout_id)
            if r.settled_at is not None:
                break
            yield advance.summary(conn, r)
            time.sleep(interval_s)
    yield rollout_status(rollout_id, settings=settings)


def wait_rollout(
    rollout_id: str,
    *,
    timeout_s: float | None = None,
    on_change: Callable[[dict[str, Any]], None] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Follow the rollout until nothing more happens by itself; its final status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: Any = None
    for found in follow_rollout(rollout_id, settings=settings):
        marker = (found["state"], found["counts"])
        if marker != last and on_change is not None:
            on_change(found)
        last = marker
        if "members" in found:
            return found
        if deadline is not None and time.monotonic() > deadline:
            raise RunbookError(
                f"rollout {rollout_id} is still {found['state']} after {timeout_s:.0f}s"
            )
    raise AssertionError("follow_rollout ends with the final status")
