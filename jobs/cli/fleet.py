"""The commands of fleets (jobs/api/rollouts.py): `rollout` and `rollouts`, and what `status`,
`pause`, `resume`, `cancel` and `rollback` do when given a rollout's id."""

from __future__ import annotations

import json
import sys
from collections import deque
from typing import TYPE_CHECKING, Any

import click

from jobs.cli.options import Command
from jobs.cli.render import err, friendly, out
from jobs.ids import ROLLOUT
from jobs.lazy import lazy, lazy_callable

if TYPE_CHECKING:
    from rich.table import Table

    from jobs.api import rollouts as api_rollouts
else:
    Table = lazy_callable("rich.table", "Table")
    api_rollouts = lazy("jobs.api.rollouts")

# The states a member's count is shown for, in the order a person reads them.
_SHOWN = [
    "succeeded",
    "skipped",
    "running",
    "pending",
    "failed",
    "rolling_back",
    "rolled_back",
    "rollback_failed",
]


def counts_line(found: dict[str, Any]) -> str:
    """``12 members: 9 succeeded, 1 skipped, 2 pending`` (states with members only)."""
    counts = found.get("counts") or {}
    total = sum(counts.values())
    parts = [f"{counts[s]} {s}" for s in _SHOWN if counts.get(s)]
    return f"{total} members: {', '.join(parts) or 'not listed yet'}"


def bar(found: dict[str, Any], width: int = 30) -> str:
    """The fleet as a bar: ``#`` done (succeeded or skipped; rolled back, while a rollback
    runs), ``x`` failed, ``>`` in flight, ``.`` not started."""
    counts = found.get("counts") or {}
    total = sum(counts.values()) or 1
    backwards = found.get("state") in ("rolling_back", "rolled_back") or any(
        counts.get(s) for s in ("rolling_back", "rolled_back", "rollback_failed")
    )
    # Rolling back, a member the rollout advanced is work still to do, not done.
    finished = ("rolled_back", "skipped") if backwards else ("succeeded", "skipped")
    done = sum(counts.get(s, 0) for s in finished)
    bad = sum(counts.get(s, 0) for s in ("failed", "rollback_failed"))
    flying = sum(counts.get(s, 0) for s in ("running", "rolling_back"))
    cells = [("#", done), ("x", bad), (">", flying)]
    drawn = "".join(ch * round(width * n / total) for ch, n in cells)[:width]
    return f"[{drawn.ljust(width, '.')}]"


def summary_line(found: dict[str, Any]) -> str:
    to = found.get("to_revision") or "base"
    return (
        f"rollout {found['id']} of group {found['group']} to {to}: {found['state']} "
        f"{bar(found)} {counts_line(found)}"
    )


def _exit_for(found: dict[str, Any]) -> None:
    sys.exit(0 if found["state"] in ("succeeded", "rolled_back") else 1)


def print_status(found: dict[str, Any], as_json: bool, *, headline: bool = True) -> None:
    """A rollout's status: JSON, or its line (unless a watch just printed it), its error and
    a table of its members."""
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if headline:
        click.echo(summary_line(found))
    if found.get("error"):
        click.echo(f"  error: {found['error']}")
    members = found.get("members") or []
    table = Table("#", "member", "state", "from", "to", "run", "error")
    for m in members:
        table.add_row(
            str(m["ordinal"] + 1) + ("*" if m["canary"] else ""),
            m["target"],
            m["state"],
            m["from_revision"] or ("" if m["state"] == "pending" else "base"),
            m["to_revision"] or "",
            m["rollback_run_id"] or m["run_id"] or "",
            (m["error"] or "")[:80],
        )
    if members:
        out.print(table)
        click.echo("  * canary")


def watch(rollout_id: str, as_json: bool) -> dict[str, Any]:
    """Follow the rollout until it settles: a line per change (its bar and counts), nothing
    but the final status with --json; the final status."""
    updates = api_rollouts.follow_rollout(rollout_id)
    if as_json:
        return dict(deque(updates, maxlen=1)[0])
    last = None
    final: dict[str, Any] = {}
    for final in updates:
        line = summary_line(final)
        if line != last:
            err.print(line)
        last = line
    return final


@click.command(cls=Command)
@click.option("--group", "-g", "group", required=True, help="Group name from runbook.toml.")
@click.option("--to", "to", default="head", show_default=True, help="Revision to reach.")
@click.option(
    "--canary",
    type=click.IntRange(0),
    default=None,
    help="Members that run alone first [default: 1, or the group's named canaries].",
)
@click.option(
    "--parallel", type=click.IntRange(1), default=4, show_default=True, help="Member runs at once."
)
@click.option(
    "--max-failures",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Failed members allowed before the rollout halts.",
)
@click.option("--strict", is_flag=True, help="Refuse a member whose plan has lint errors.")
@click.option("--wait", is_flag=True, help="Follow the rollout until it settles.")
@click.option("--json", "as_json", is_flag=True, help="Print the rollout as JSON.")
@friendly
def rollout(
    group: str,
    to: str,
    canary: int | None,
    parallel: int,
    max_failures: int,
    strict: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Bring every member of GROUP to a revision: canary first, then in waves, halted by a
    failure budget; prints the rollout's id."""
    rollout_id = api_rollouts.start_rollout(
        group, to, canary=canary, parallel=parallel, max_failures=max_failures, strict=strict
    )
    if not wait:
        click.echo(json.dumps({"id": rollout_id, "state": "enqueued"}) if as_json else rollout_id)
        return
    if not as_json:
        click.echo(rollout_id)
    final = watch(rollout_id, as_json)
    print_status(final, as_json, headline=False)
    _exit_for(final)


@click.command(cls=Command)
@click.option("--group", "-g", "group", default=None, help="Only this group's rollouts.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print the rollouts as JSON.")
@friendly
def rollouts(group: str | None, limit: int, as_json: bool) -> None:
    """List the newest rollouts, with their members' counts."""
    found = api_rollouts.list_rollouts(group, limit=limit)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    table = Table("rollout", "group", "to", "state", "members", "created", "error")
    for r in found:
        table.add_row(
            r["id"],
            r["group"],
            r["to_revision"] or "base",
            r["state"],
            counts_line(r),
            (r["created_at"] or "")[:19],
            (r["error"] or "")[:60],
        )
    out.print(table)


def is_rollout(work_id: str, target: str | None = None) -> bool:
    """Whether ``work_id`` names a rollout: asked of the control database only when there is
    one (`runbook status RUN` without one loads nothing more, tests/unit/test_cli_imports.py)."""
    from jobs.config import load_settings
    from jobs.fleet import index

    if target is not None:
        return False
    found = index.find(load_settings(), work_id)
    return found is not None and found[0] == ROLLOUT


def status(rollout_id: str, as_json: bool, watching: bool) -> None:
    if watching:
        watch(rollout_id, as_json)
    found = api_rollouts.rollout_status(rollout_id)
    print_status(found, as_json, headline=not watching)
    if found["settled_at"] is not None:
        _exit_for(found)


def control(action: str, rollout_id: str) -> None:
    done = api_rollouts.control_rollout(action, rollout_id)
    err.print(f"rollout {rollout_id} {done['state']}")


def rollback(rollout_id: str, accept_data_loss: bool, wait: bool, as_json: bool) -> None:
    done = api_rollouts.rollback_rollout(rollout_id, accept_data_loss=accept_data_loss)
    if not wait:
        click.echo(json.dumps(done) if as_json else f"rollout {rollout_id} {done['state']}")
        return
    final = watch(rollout_id, as_json)
    print_status(final, as_json, headline=False)
    _exit_for(final)
