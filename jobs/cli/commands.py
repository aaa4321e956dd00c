"""The ``runbook`` command: a thin layer over jobs.api.

Exit codes: 0 the run succeeded (or there was nothing to do); 1 the run ended in any other
state; 2 bad input or configuration, with nothing enqueued and nothing changed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, cast

import click

from jobs.lazy import lazy, lazy_callable
from jobs.states import SUCCEEDED, TERMINAL

# The heavy modules load on first use: `runbook --help` imports none of them and `runbook
# status` only what reading the ledger needs (tests/unit/test_cli_imports.py).
if TYPE_CHECKING:
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    from jobs import api, ids
    from jobs.config import load_settings
else:
    BarColumn = lazy_callable("rich.progress", "BarColumn")
    Progress = lazy_callable("rich.progress", "Progress")
    TextColumn = lazy_callable("rich.progress", "TextColumn")
    Table = lazy_callable("rich.table", "Table")
    api = lazy("jobs.api")
    ids = lazy("jobs.ids")
    load_settings = lazy_callable("jobs.config", "load_settings")
from jobs.cli.options import Group
from jobs.cli.render import (
    BACKFILL_STOPS,
    LazyConsole,
    backfill_line,
    duration,
    err,
    friendly,
    out,
    progress_printer,
    statement,
    summary,
)


def _follow_backfill(backfill_id: str, target: str | None, as_json: bool) -> None:
    """Follow the backfill until it stops (a progress bar on a terminal, lines otherwise);
    exit 0 only when it succeeded."""
    updates = api.follow_backfill(backfill_id, target)  # woken by the ledger at each change
    now = next(updates)
    if not as_json:
        err.print(statement(now))
    if as_json or not err.is_terminal:
        last = None
        while True:
            if not as_json and (now["state"], now["rows_done"]) != last:
                err.print(backfill_line(now))
                last = (now["state"], now["rows_done"])
            if now["state"] in BACKFILL_STOPS:
                break
            now = next(updates)
    else:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[detail]}"),
        )
        console = cast(LazyConsole, err).resolve()
        with Progress(*columns, console=console, transient=False) as bar:
            # Every field the columns format must exist from the first refresh on.
            task = bar.add_task(
                f"backfill {backfill_id}", total=now["rows_total"] or None, detail=""
            )
            while True:
                detail = backfill_line(now).split(" ", 2)[2]  # "<state>: <rows> of ..."
                bar.update(task, completed=now["rows_done"], detail=detail)
                if now["state"] in BACKFILL_STOPS:
                    break
                now = next(updates)
    if as_json:
        click.echo(json.dumps(now, indent=2))
    elif now["error"]:
        err.print(f"  error: {now['error']}")
    sys.exit(0 if now["state"] == "succeeded" else 1)


def _exit_for(run: dict[str, Any]) -> None:
    sys.exit(0 if run["state"] == SUCCEEDED else 1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runbook")
def cli() -> None:
    """Production schema changes for Alembic projects, as queued, resumable jobs."""


@cli.command()
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
    _follow(
        run_id, target, wait, as_json, f"target {settings.target(target).name} is already at {to}"
    )


def _follow(run_id: str | None, target: str | None, wait: bool, as_json: bool, what: str) -> None:
    """Print the run id, or follow the run to its end; exit by its outcome."""
    if run_id is None:
        if as_json:
            click.echo(json.dumps({"id": None, "state": "noop"}))
        else:
            err.print(f"nothing to do: {what}")
        return
    if not wait:
        click.echo(json.dumps({"id": run_id, "state": "enqueued"}) if as_json else run_id)
        return
    if not as_json:
        click.echo(run_id)
    final = api.wait(run_id, target, on_change=None if as_json else progress_printer())
    if as_json:
        click.echo(json.dumps(final, indent=2))
    else:
        summary(final)
    _exit_for(final)


@cli.command()
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--wait", is_flag=True, help="Follow the run to its end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@friendly
def backup(target: str | None, wait: bool, as_json: bool) -> None:
    """Take a verified backup of TARGET now (a run of its own)."""
    _follow(api.enqueue_backup(target), target, wait, as_json, "")


@cli.command()
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--json", "as_json", is_flag=True, help="Print the backups as JSON.")
@friendly
def backups(target: str | None, as_json: bool) -> None:
    """List a target's backups, newest first."""
    found = api.list_backups(target)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    table = Table("id", "run", "taken", "size", "sha256", "verified", "copies", "revision")
    for b in found:
        verified = "restore" if isinstance(b["verification"].get("restore"), dict) else "list"
        table.add_row(
            b["id"],
            b["run"] or "",
            (b["taken_at"] or "")[:19],
            str(b["size"]),
            b["sha256"][:12],
            verified if b["verified"] else "no",
            str(len(b["copies"])),
            b["revision"] or "base",
        )
    out.print(table)


@cli.command()
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--to", "to", required=True, help="Revision to go down to (or base).")
@click.option(
    "--accept-data-loss",
    is_flag=True,
    help="Allow downgrades that drop tables or columns holding rows (backup first).",
)
@click.option("--wait", is_flag=True, help="Follow the run to its end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@friendly
def rollback(
    target: str | None, to: str, accept_data_loss: bool, wait: bool, as_json: bool
) -> None:
    """Downgrade TARGET to a revision, one revision per step, backup first."""
    run_id = api.enqueue_rollback(target, to, accept_data_loss=accept_data_loss)
    _follow(run_id, target, wait, as_json, f"the target is already at {to}")


@cli.command()
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--backup", "backup_id", required=True, help="Backup id (runbook backups).")
@click.option("--table", "tables", multiple=True, help="Restore only this table (repeatable).")
@click.option("--wait", is_flag=True, help="Follow the run to its end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@friendly
def restore(
    target: str | None, backup_id: str, tables: tuple[str, ...], wait: bool, as_json: bool
) -> None:
    """Restore a backup into TARGET (whole, or some tables), verified, backup first."""
    run_id = api.enqueue_restore(backup_id, target, tables=list(tables))
    _follow(run_id, target, wait, as_json, "")


@cli.command()
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--to", "to", default="head", show_default=True, help="Revision to plan up to.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@friendly
def plan(target: str | None, to: str, as_json: bool) -> None:
    """Show what an apply would do: SQL, lint findings, irreversible revisions, tables."""
    from jobs.cli.render_plan import format_plan

    found = api.plan(target, to)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
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


@cli.command()
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


@cli.command()
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@friendly
def doctor(target: str | None, as_json: bool) -> None:
    """Diagnose the runbook's common migration errors (§8); each finding with its fix."""
    findings = api.doctor(target)
    if as_json:
        click.echo(json.dumps(findings, indent=2))
    else:
        for f in findings:
            out.print(f"{f['code']}: {f['message']} — fix: {f['fix']}")
        if not findings:
            out.print("no problems found")
    sys.exit(1 if findings else 0)


@cli.command()
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--to", "to", default="head", show_default=True, help="Revision to rehearse up to.")
@click.option("--wait", is_flag=True, help="Follow the run to its end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@friendly
def rehearse(target: str | None, to: str, wait: bool, as_json: bool) -> None:
    """Rehearse the pending revisions (up, down, up) on a scratch copy of TARGET."""
    run_id = api.enqueue_rehearse(target, to)
    _follow(run_id, target, wait, as_json, f"no revision is pending up to {to}")


@cli.command()
@click.argument("revision")
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--wait", is_flag=True, help="Follow the run to its end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@friendly
def stamp(revision: str, target: str | None, wait: bool, as_json: bool) -> None:
    """Record REVISION in the version table without migrating (the runbook's §8 fix)."""
    _follow(api.enqueue_stamp(revision, target), target, wait, as_json, "")


@cli.command()
@click.argument("run_id")
@click.option("--target", "-t", help="Look only in this target's ledger.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@click.option("--watch", is_flag=True, help="Follow the run until it ends.")
@friendly
def status(run_id: str, target: str | None, as_json: bool, watch: bool) -> None:
    """Show a run (or a backfill): its state, revisions, backup and steps."""
    kind, found_on = api.locate(run_id, target)
    target = found_on.name
    if kind == ids.BACKFILL:
        found = api.backfill_status(run_id, target)
        if watch:
            _follow_backfill(run_id, target, as_json)
        click.echo(json.dumps(found, indent=2) if as_json else backfill_line(found))
        if not as_json:
            click.echo(f"  {statement(found)}")
        if not as_json and found["error"]:
            click.echo(f"  error: {found['error']}")
        return
    run = api.status(run_id, target)
    if watch:
        final = api.wait(run_id, target, on_change=None if as_json else progress_printer())
        if as_json:
            click.echo(json.dumps(final, indent=2))
        else:
            summary(final)
        _exit_for(final)
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
    if run["state"] in TERMINAL:
        _exit_for(run)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the targets as JSON.")
@friendly
def targets(as_json: bool) -> None:
    """List the configured targets with their health; exit 1 when any is broken."""
    found = api.targets()
    if as_json:
        click.echo(json.dumps(found, indent=2))
    else:
        table = Table("target", "health", "database", "revision", "pending", "last run")
        for row in found:
            health = (
                "ok"
                if row["ok"]
                else "broken config"
                if row["config"] == "broken"
                else "unreachable"
                if row["reachable"] is False
                else "error"
            )
            last = row["last_run"]
            table.add_row(
                row["name"],
                health,
                row["database"] or "",
                (row["current_revision"] or "base") if row["ok"] else "",
                "" if row["pending"] is None else str(len(row["pending"])),
                f"{last['id']} {last['kind']} {last['state']}" if last else "",
            )
        out.print(table)
        for row in found:
            if row["error"]:
                named = f"{row['name']!r}" in row["error"]
                out.print(row["error"] if named else f"target {row['name']!r}: {row['error']}")
    sys.exit(0 if all(row["ok"] for row in found) else 1)


@cli.command()
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


@cli.command()
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print the backfills as JSON.")
@friendly
def backfills(target: str | None, limit: int, as_json: bool) -> None:
    """List a target's recent backfills, newest first."""
    found = api.list_backfills(target, limit=limit)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    table = Table("backfill", "table", "state", "rows", "of", "slices", "run", "error")
    for b in found:
        table.add_row(
            b["backfill_id"],
            b["table"],
            b["state"],
            str(b["rows_done"]),
            f"~{b['rows_total']}",
            str(len(b["slices"])),
            b["run_id"] or "",
            (b["error"] or "")[:60],
        )
    out.print(table)


@cli.command()
@click.argument("run_id")
@click.option("--target", "-t", help="Look only in this target's ledger.")
@friendly
def resume(run_id: str, target: str | None) -> None:
    """Send an unfinished run to the workers again (after a worker died)."""
    kind, found_on = api.locate(run_id, target)
    if kind == ids.BACKFILL:
        done = api.control_backfill("resume", run_id, found_on.name)
        err.print(
            f"backfill {run_id} {done['state']} from its checkpoint ({done['rows_done']} rows done)"
        )
        return
    run = api.resume(run_id, found_on.name)
    err.print(f"run {run['id']} ({run['state']}) sent to the workers again")


@cli.command()
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--table", required=True, help="Table to update, e.g. large_table.")
@click.option(
    "--set",
    "set_sql",
    required=True,
    multiple=True,
    help='Assignments, e.g. "col = \'v\'" or "a = 1, b = 2" (repeatable: all of them apply).',
)
@click.option("--where", help='Only rows matching this condition, e.g. "col IS NULL".')
@click.option("--key", help="Unique NOT NULL column to walk (default: the primary key).")
@click.option("--batch-size", default=1000, show_default=True, type=int, help="First batch size.")
@click.option(
    "--slices", default=1, show_default=True, type=int, help="Parallel tasks over the key range."
)
@click.option(
    "--on-error",
    type=click.Choice(["stop", "isolate"]),
    default="stop",
    show_default=True,
    help="On a failing row: stop (errored, resumable) or isolate (skip the rows, go on).",
)
@click.option(
    "--dry-run", is_flag=True, help="Run 3 sample batches, roll them back, project the time."
)
@click.option("--wait", is_flag=True, help="Follow the backfill until it stops.")
@click.option("--json", "as_json", is_flag=True, help="Print the backfill as JSON.")
@friendly
def backfill(
    target: str | None,
    table: str,
    set_sql: tuple[str, ...],
    where: str | None,
    key: str | None,
    batch_size: int,
    slices: int,
    on_error: str,
    dry_run: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Start a batched, resumable UPDATE on the workers; prints its id."""
    options = dict(
        target=target,
        where=where,
        key=key,
        batch_size=batch_size,
        slices=slices,
        on_error=on_error,
    )
    if dry_run:
        report = api.dry_run_backfill(table, list(set_sql), **options)  # type: ignore[arg-type]
        if as_json:
            click.echo(json.dumps(report, indent=2))
            return
        for number, sample in enumerate(report["batches"], start=1):
            click.echo(
                f"batch {number}: {sample['keys']} keys, {sample['rows']} rows, {sample['ms']} ms"
            )
        where = f" WHERE {report['where']}" if report["where"] else ""
        click.echo(f"UPDATE {report['table']} SET {report['set']}{where}")
        click.echo(
            f"{report['table']}: ~{report['table_rows']} rows, ~{report['rows_to_update']} to "
            f"update ({report['estimate']}); projected {duration(report['projected_s'])} with "
            f"{report['slices']} slice(s). Rolled back: nothing changed."
        )
        return
    backfill_id = api.enqueue_backfill(table, list(set_sql), **options)  # type: ignore[arg-type]
    if wait:
        if not as_json:
            click.echo(backfill_id)
        _follow_backfill(backfill_id, target, as_json)
    click.echo(json.dumps({"id": backfill_id}) if as_json else backfill_id)


@cli.command()
@click.argument("backfill_id")
@click.option("--target", "-t", help="Look only in this target's ledger.")
@friendly
def pause(backfill_id: str, target: str | None) -> None:
    """Pause a backfill before its next batch (resume continues from the checkpoint)."""
    done = api.control_backfill("pause", backfill_id, target)
    err.print(f"backfill {backfill_id} {done['state']}")


@cli.command()
@click.argument("run_id")
@click.option("--target", "-t", help="Look only in this target's ledger.")
@friendly
def cancel(run_id: str, target: str | None) -> None:
    """Cancel a run that no worker has started yet."""
    kind, found_on = api.locate(run_id, target)
    if kind == ids.BACKFILL:
        done = api.control_backfill("cancel", run_id, found_on.name)
        err.print(f"backfill {run_id} {done['state']}")
        return
    run = api.cancel(run_id, found_on.name)
    err.print(f"run {run['id']} {run['state']}")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@friendly
def worker(celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker for runbook's queue, and start it again should it die (extra
    arguments go to `celery worker`)."""
    from worker import supervise

    sys.exit(supervise.main(load_settings().queue, celery_args))


@cli.command()
@friendly
def demo() -> None:
    """Run the reference history against a scratch database with a real worker."""
    from jobs.cli.demo import run_demo

    sys.exit(run_demo())


def main() -> None:
    try:
        cli(prog_name="runbook", standalone_mode=False)
    except click.UsageError as exc:  # a wrong option or value: one line, like every bad input
        where = f"runbook {exc.ctx.info_name}" if exc.ctx and exc.ctx.parent else "runbook"
        err.print(f"runbook: error: {exc.format_message().rstrip('.')}; see `{where} --help`")
        sys.exit(2)
    except click.Abort:
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def run() -> None:
    """The console script: main(), then exit without tearing the interpreter down.

    A project's env.py and revision files import its application (MLflow's: some 1,500
    modules), and freeing all of that took 0.7 s after every apply (bench/README.md). The
    atexit handlers still run and the streams are flushed; with other threads alive, Python
    exits as usual.
    """
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if threading.active_count() > 1:
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
