"""The commands of runs (jobs/api/runs.py): apply, rollback, rehearse, stamp, and what
reads or steers a run: plan, check, doctor, status, history, resume, cancel."""

from __future__ import annotations

import json
import sys
from collections import deque
from collections.abc import Callable, Iterator
from functools import wraps
from typing import TYPE_CHECKING, Any, cast

import click

from jobs.cli import fleet
from jobs.cli.backfills import follow_backfill
from jobs.cli.options import Command
from jobs.cli.render import (
    LazyConsole,
    backfill_line,
    err,
    friendly,
    out,
    statement,
    step_notes,
    summary,
)
from jobs.lazy import lazy, lazy_callable
from jobs.states import ENQUEUED, SUCCEEDED, TERMINAL

# The heavy modules load on first use: `runbook --help` imports none of them and `runbook
# status` only what reading the ledger needs (tests/unit/test_cli_imports.py).
if TYPE_CHECKING:
    from rich.table import Table

    from jobs import api, ids
    from jobs.cli.render_run import RunLines
    from jobs.config import load_settings
else:
    Table = lazy_callable("rich.table", "Table")
    RunLines = lazy_callable("jobs.cli.render_run", "RunLines")
    api = lazy("jobs.api")
    ids = lazy("jobs.ids")
    load_settings = lazy_callable("jobs.config", "load_settings")


def _exit_for(run: dict[str, Any]) -> None:
    sys.exit(0 if run["state"] == SUCCEEDED else 1)


def follow_run(
    run_id: str | None, target: str | None, wait: bool, as_json: bool, what: str
) -> None:
    """Print the run id, or follow the run to its end; exit by its outcome."""
    if run_id is None:
        if as_json:
            click.echo(json.dumps({"id": None, "state": "noop"}))
        else:
            err.print(f"nothing to do: {what}")
        return
    if not wait:
        click.echo(json.dumps({"id": run_id, "state": ENQUEUED}) if as_json else run_id)
        return
    if not as_json:
        click.echo(run_id)
    _watch(run_id, target, as_json)


def _watch(run_id: str, target: str | None, as_json: bool) -> None:
    """Follow the run to its end (a live table on a terminal, a line per change otherwise,
    nothing but the final record with --json); exit by its outcome, as `status` does."""
    updates = api.follow_run(run_id, target)
    if as_json:
        final = deque(updates, maxlen=1)[0]  # the last: the run as it ended
        click.echo(json.dumps(final["run"], indent=2))
    elif err.is_terminal:
        final = _draw(updates)
    else:
        lines = RunLines()
        for final in updates:
            for line in lines(final):
                err.print(line)
    if not as_json:
        summary(final["run"])
    _exit_for(final["run"])


def _draw(updates: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The run redrawn in place until it ends; the last snapshot (left on the screen)."""
    from rich.live import Live

    from jobs.cli.render_run import REFRESH_PER_SECOND, LiveRun

    view = LiveRun()
    view.update(next(updates))
    console = cast(LazyConsole, err).resolve()
    with Live(view, console=console, refresh_per_second=REFRESH_PER_SECOND) as live:
        for now in updates:
            view.update(now)
            live.refresh()
    assert view.watch is not None
    return view.watch


@click.command(cls=Command)
@click.option("--target", "-t", help="Target name from runbook.toml (default: the only one).")
@click.option("--to", "to", default="head", show_default=True, help="Revision to reach.")
@click.option("--wait", is_flag=True, help="Follow the run to its end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@click.option("--no-backup", is_flag=True, help="Skip the backup step (recorded on the run).")
@click.option("--strict", is_flag=True, help="Refuse when the plan has lint errors not allowed.")
@friendly
def apply(
    target: str | None, to: str, wait: bool, as_json: bool, no_backup: bool, strict: bool
) -> None:
    """Enqueue a run that brings TARGET up to a revision, one revision at a time."""
    settings = load_settings()
    run_id = api.enqueue(
        target, to, backup=False if no_backup else None, strict=strict, settings=settings
    )
    follow_run(
        run_id, target, wait, as_json, f"target {settings.target(target).name} is already at {to}"
    )


@click.command(cls=Command)
@click.argument("rollout_id", required=False)
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--to", "to", help="Revision to go down to (or base).")
@click.option(
    "--accept-data-loss",
    is_flag=True,
    help="Allow downgrades that drop tables or columns holding rows (backup first).",
)
@click.option("--wait", is_flag=True, help="Follow the run to its end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@friendly
def rollback(
    rollout_id: str | None,
    target: str | None,
    to: str | None,
    accept_data_loss: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Downgrade a target to a revision (--to), one revision per step, backup first; or,
    given a ROLLOUT id, bring back every member that rollout advanced."""
    if rollout_id is not None:
        if to is not None or target is not None:
            raise click.UsageError("a ROLLOUT is rolled back as a whole: drop --to and --target")
        fleet.rollback(rollout_id, accept_data_loss, wait, as_json)
        return
    if to is None:
        raise click.UsageError("give --to REVISION (or base), or a ROLLOUT id")
    run_id = api.enqueue_rollback(target, to, accept_data_loss=accept_data_loss)
    follow_run(run_id, target, wait, as_json, f"the target is already at {to}")


def _one_format(fn: Callable[..., None]) -> Callable[..., None]:
    """``--json`` is ``--format json``; with another --format it is bad input (exit 2, from
    outside ``friendly`` so that click's usage line says it)."""

    @wraps(fn)
    def wrapper(*, as_json: bool, fmt: str | None, **kwargs: Any) -> None:
        if as_json and fmt not in (None, "json"):
            raise click.UsageError(f"--json and --format {fmt} disagree; give one of them")
        fn(fmt="json" if as_json else (fmt or "text"), **kwargs)

    return wrapper


@click.command(cls=Command)
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--to", "to", default="head", show_default=True, help="Revision to plan up to.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (= --format json).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "markdown", "json"]),
    default=None,
    help="text (default), markdown (for a pull-request comment) or json.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Exit 1 when the plan has lint errors apply --strict would refuse (after printing it).",
)
@_one_format
@friendly
def plan(target: str | None, to: str, fmt: str, strict: bool) -> None:
    """Show what an apply would do: SQL, lint findings, irreversible revisions, tables."""
    found = api.plan(target, to)
    if fmt == "json":
        click.echo(json.dumps(found, indent=2))
    elif fmt == "markdown":
        from jobs.cli.render_markdown import format_markdown

        click.echo(format_markdown(found), nl=False)
    else:
        _print_plan(found)
    refusal = api.strict_refusal(target, found) if strict else None
    if refusal:  # the same line apply --strict refuses with; exit 1 (2 is bad input)
        click.echo(f"runbook: {refusal}", err=True)
        sys.exit(1)


def _print_plan(found: dict[str, Any]) -> None:
    from jobs.cli.render_plan import format_plan

    out.print(format_plan(found))
    rehearsal = found.get("rehearsal")
    if rehearsal:
        irreversible = ", ".join(rehearsal.get("irreversible") or {}) or "none"
        out.print(
            f"last rehearsal: run {rehearsal['run']} {rehearsal['state']} "
            f"({rehearsal.get('finished_at') or ''}); downgrades that failed: {irreversible}"
        )
    else:
        out.print("no rehearsal of these revisions yet (runbook rehearse)")


@click.command(cls=Command)
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@friendly
def check(target: str | None, as_json: bool) -> None:
    """Drift: models vs the live schema, and applied revisions edited since. Exit 1 on drift."""
    found = api.check(target)
    if as_json:
        click.echo(json.dumps(found, indent=2))
    else:
        for line in found["schema"]:
            out.print(f"schema: {line}")
        for e in found["edited"]:
            out.print(
                f"edited: revision {e['revision']} ({e['path']}) changed since run "
                f"{e['run_id']} applied it"
            )
        if found.get("pending"):
            out.print(
                f"note: {len(found['pending'])} revisions are not applied yet; the schema "
                "differences include what they will change"
            )
        if not found["drift"]:
            out.print("no drift")
    sys.exit(1 if found["drift"] else 0)


@click.command(cls=Command)
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@friendly
def doctor(target: str | None, as_json: bool) -> None:
    """Diagnose the common migration errors; each finding with its fix."""
    findings = api.doctor(target)
    problems = [f for f in findings if f.get("level") != "info"]  # facts: standbys, slots
    if as_json:
        click.echo(json.dumps(findings, indent=2))
    else:
        for f in findings:
            fix = "" if f.get("level") == "info" else f" — fix: {f['fix']}"
            out.print(f"{f['code']}: {f['message']}{fix}")
        if not problems:
            out.print("no problems found")
    sys.exit(1 if problems else 0)


@click.command(cls=Command)
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--to", "to", default="head", show_default=True, help="Revision to rehearse up to.")
@click.option("--wait", is_flag=True, help="Follow the run to its end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@friendly
def rehearse(target: str | None, to: str, wait: bool, as_json: bool) -> None:
    """Rehearse the pending revisions (up, down, up) on a scratch copy of TARGET."""
    run_id = api.enqueue_rehearse(target, to)
    follow_run(run_id, target, wait, as_json, f"no revision is pending up to {to}")


@click.command(cls=Command)
@click.argument("revision")
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--wait", is_flag=True, help="Follow the run to its end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@friendly
def stamp(revision: str, target: str | None, wait: bool, as_json: bool) -> None:
    """Record REVISION in the version table without migrating (fixes a version table the
    scripts do not match)."""
    follow_run(api.enqueue_stamp(revision, target), target, wait, as_json, "")


@click.command(cls=Command)
@click.argument("run_id")
@click.option("--target", "-t", help="Look only in this target's ledger.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@click.option("--watch", is_flag=True, help="Follow the run until it ends.")
@friendly
def status(run_id: str, target: str | None, as_json: bool, watch: bool) -> None:
    """Show a run (or a backfill, or a rollout): its state, revisions, backup and steps."""
    if fleet.is_rollout(run_id, target):
        fleet.status(run_id, as_json, watch)
        return
    kind, found_on = api.locate(run_id, target)
    target = found_on.name
    if kind == ids.BACKFILL:
        found = api.backfill_status(run_id, target)
        if watch:
            follow_backfill(run_id, target, as_json)
        click.echo(json.dumps(found, indent=2) if as_json else backfill_line(found))
        if not as_json:
            click.echo(f"  {statement(found)}")
        if not as_json and found["error"]:
            click.echo(f"  error: {found['error']}")
        return
    if watch:
        _watch(run_id, target, as_json)
    run = api.status(run_id, target)
    if as_json:
        click.echo(json.dumps(run, indent=2))
        return
    summary(run)
    table = Table("step", "revision", "state", "attempts", "started", "finished", "error")
    for s in run["steps"]:
        table.add_row(
            s["kind"],
            s["revision"] or "",
            s["state"],
            str(s["attempts"]),
            (s["started_at"] or "")[11:19],
            (s["finished_at"] or "")[11:19],
            s["error"] or "",
        )
    out.print(table)
    for s in run["steps"]:
        for note in step_notes(s):
            out.print(f"  {note}")
    if run["state"] in TERMINAL:
        _exit_for(run)


@click.command(cls=Command)
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@friendly
def history(target: str | None, limit: int, as_json: bool) -> None:
    """List a target's recent runs, newest first."""
    runs = api.history(target, limit=limit)
    if as_json:
        click.echo(json.dumps(runs, indent=2))
        return
    table = Table("run", "kind", "state", "from", "to", "created", "error")
    for r in runs:
        table.add_row(
            r["id"],
            r["kind"],
            r["state"],
            r["from_revision"] or "base",
            r["to_revision"] or "base",
            (r["created_at"] or "")[:19],
            (r["error"] or "")[:60],
        )
    out.print(table)


@click.command(cls=Command)
@click.argument("run_id")
@click.option("--target", "-t", help="Look only in this target's ledger.")
@friendly
def resume(run_id: str, target: str | None) -> None:
    """Send an unfinished run to the workers again (after a worker died); a rollout goes on."""
    if fleet.is_rollout(run_id, target):
        fleet.control("resume", run_id)
        return
    kind, found_on = api.locate(run_id, target)
    if kind == ids.BACKFILL:
        done = api.control_backfill("resume", run_id, found_on.name)
        err.print(
            f"backfill {run_id} {done['state']} from its checkpoint ({done['rows_done']} rows done)"
        )
        return
    run = api.resume(run_id, found_on.name)
    err.print(f"run {run['id']} ({run['state']}) sent to the workers again")


@click.command(cls=Command)
@click.argument("run_id")
@click.option("--target", "-t", help="Look only in this target's ledger.")
@friendly
def cancel(run_id: str, target: str | None) -> None:
    """Cancel a run that no worker has started yet; a rollout starts no more members."""
    if fleet.is_rollout(run_id, target):
        fleet.control("cancel", run_id)
        return
    kind, found_on = api.locate(run_id, target)
    if kind == ids.BACKFILL:
        done = api.control_backfill("cancel", run_id, found_on.name)
        err.print(f"backfill {run_id} {done['state']}")
        return
    run = api.cancel(run_id, found_on.name)
    err.print(f"run {run['id']} {run['state']}")
