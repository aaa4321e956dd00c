"""The commands of backfills (jobs/api/backfills.py): backfill, pause, the list, and
following one to its end (status --watch of a backfill uses it too)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, cast

import click

from jobs.cli.options import Command
from jobs.cli.render import (
    LazyConsole,
    backfill_line,
    duration,
    err,
    friendly,
    out,
    statement,
)
from jobs.lazy import lazy, lazy_callable
from jobs.states import BACKFILL_SETTLED, SUCCEEDED

# The heavy modules load on first use: `runbook --help` imports none of them and `runbook
# status` only what reading the ledger needs (tests/unit/test_cli_imports.py).
if TYPE_CHECKING:
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    from jobs import api
else:
    BarColumn = lazy_callable("rich.progress", "BarColumn")
    Progress = lazy_callable("rich.progress", "Progress")
    TextColumn = lazy_callable("rich.progress", "TextColumn")
    Table = lazy_callable("rich.table", "Table")
    api = lazy("jobs.api")


def follow_backfill(backfill_id: str, target: str | None, as_json: bool) -> None:
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
            if now["state"] in BACKFILL_SETTLED:
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
                if now["state"] in BACKFILL_SETTLED:
                    break
                now = next(updates)
    if as_json:
        click.echo(json.dumps(now, indent=2))
    elif now["error"]:
        err.print(f"  error: {now['error']}")
    sys.exit(0 if now["state"] == SUCCEEDED else 1)


@click.command(cls=Command)
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
            f"{'' if b['estimate'] == 'counted' else '~'}{b['rows_total']}",
            str(len(b["slices"])),
            b["run_id"] or "",
            (b["error"] or "")[:60],
        )
    out.print(table)


@click.command(cls=Command)
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
    "--max-replica-lag",
    help="Wait while a standby replays this far behind (default: the target's, 2s).",
)
@click.option(
    "--max-replica-lag-bytes", help="Wait while a standby is this many bytes behind (64MiB)."
)
@click.option("--max-wal-rate", help="MB of WAL a second it may write (20, or 512kB/s; no bound).")
@click.option("--max-retained-wal", help="Wait while a replication slot holds back more (1GiB).")
@click.option("--max-throttle", help="Pause when one throttle holds longer than this (30min).")
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
    max_replica_lag: str | None,
    max_replica_lag_bytes: str | None,
    max_wal_rate: str | None,
    max_retained_wal: str | None,
    max_throttle: str | None,
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
        max_replica_lag=max_replica_lag,
        max_replica_lag_bytes=max_replica_lag_bytes,
        max_wal_rate=max_wal_rate,
        max_retained_wal=max_retained_wal,
        max_throttle=max_throttle,
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
        follow_backfill(backfill_id, target, as_json)
    click.echo(json.dumps({"id": backfill_id}) if as_json else backfill_id)


@click.command(cls=Command)
@click.argument("backfill_id")
@click.option("--target", "-t", help="Look only in this target's ledger.")
@friendly
def pause(backfill_id: str, target: str | None) -> None:
    """Pause a backfill before its next batch (resume continues from the checkpoint), or a
    rollout before its next member."""
    from jobs.cli import fleet

    if fleet.is_rollout(backfill_id, target):
        fleet.control("pause", backfill_id)
        return
    done = api.control_backfill("pause", backfill_id, target)
    err.print(f"backfill {backfill_id} {done['state']}")
