"""The commands of backups (jobs/api/backups.py): backup, restore, and the list."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from jobs.cli.options import Command
from jobs.cli.render import friendly, out
from jobs.cli.runs import follow_run
from jobs.lazy import lazy, lazy_callable

# The heavy modules load on first use: `runbook --help` imports none of them and `runbook
# status` only what reading the ledger needs (tests/unit/test_cli_imports.py).
if TYPE_CHECKING:
    from rich.table import Table

    from jobs import api
else:
    Table = lazy_callable("rich.table", "Table")
    api = lazy("jobs.api")


@click.command(cls=Command)
@click.option("--target", "-t", help="Target name (default: the only one).")
@click.option("--wait", is_flag=True, help="Follow the run to its end.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@friendly
def backup(target: str | None, wait: bool, as_json: bool) -> None:
    """Take a verified backup of TARGET now (a run of its own)."""
    follow_run(api.enqueue_backup(target), target, wait, as_json, "")


@click.command(cls=Command)
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


@click.command(cls=Command)
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
    follow_run(run_id, target, wait, as_json, "")
