"""The command of targets (jobs/api/targets.py): the configured targets and their health."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from jobs.cli.options import Command
from jobs.cli.render import friendly, out
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
@click.option("--group", "-g", "group", default=None, help="Only this group's members.")
@click.option("--json", "as_json", is_flag=True, help="Print the targets as JSON.")
@friendly
def targets(group: str | None, as_json: bool) -> None:
    """List the configured targets (or a group's members, with the fleet's revision mix)
    with their health; exit 1 when any is broken."""
    fleet: dict[str, Any] | None = None
    if group is not None:
        fleet = api.group_targets(group)
        found = fleet["members"]
    else:
        found = api.targets()
    if as_json:
        click.echo(json.dumps(fleet if fleet is not None else found, indent=2))
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
        if fleet is not None:
            mix = ", ".join(f"{n} at {rev}" for rev, n in fleet["revisions"].items())
            out.print(f"group {fleet['group']}: {len(found)} members; {mix}")
    sys.exit(0 if all(row["ok"] for row in found) else 1)
