"""A plan as a person reads it: one table per revision, its tables, findings and backfills."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

# -- human output -----------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def table_cell(info: Mapping[str, Any]) -> str:
    """A touched table as one phrase: its size and estimated rows, or that it is new."""
    if not info["exists"]:
        return f"{info['name']} (new)"
    rows = info["estimated_rows"]
    counted = "never analyzed" if rows is None else f"~{rows:,} rows"
    return f"{info['name']} {_size(info['size_bytes'])}, {counted}"


def _yes(value: object) -> str:
    if value is None:
        return "?"
    return "yes" if value else ""


def _row(entry: Mapping[str, Any]) -> list[str]:
    if entry["status"] == "current":
        return [f"{entry['id']} (current)", entry["message"], "", "", "", ""]
    lint_cell = "render failed" if entry.get("render_error") else str(len(entry["lint"]))
    errors = sum(f["level"] == "error" for f in entry["lint"])
    if errors:
        lint_cell += f" ({errors} error{'s' if errors > 1 else ''})"
    return [
        entry["id"],
        entry["message"],
        "yes" if entry["irreversible"] else "",
        _yes(entry["outside_transaction"]),
        "\n".join(table_cell(t) for t in entry["tables"]),
        lint_cell,
    ]


def _backfill_line(rev: str, item: Mapping[str, Any]) -> Text:
    where = f" WHERE {item['where']}" if item.get("where") else ""
    rows = item.get("estimated_rows")
    size = "" if rows is None else f" (~{rows:,} rows in the table)"
    return Text(f"{rev}  backfill  {item['table']} SET {item['set']}{where}{size}")


def _finding_lines(plan: Mapping[str, Any]) -> list[Text]:
    lines = []
    for entry in plan["revisions"]:
        for item in entry.get("backfills") or []:
            lines.append(_backfill_line(entry["id"], item))
        if entry.get("render_error"):
            lines.append(Text(f"{entry['id']}  render-error  {entry['render_error']}"))
        for stmt in entry.get("rewrites") or []:
            lines.append(Text(f"{entry['id']}  rewrite  {stmt[:120]} (the run waits for standbys)"))
        for f in entry.get("lint", []):
            stmt = f["statement"][:80]
            line = f"{entry['id']}  {f['rule']}  {f['message']}  — {stmt}"
            lines.append(Text(line, style="bold" if f["level"] == "error" else ""))
    return lines


def format_plan(plan: Mapping[str, Any]) -> RenderableType:
    """The plan for a person: one row per revision, then every finding on its own line."""
    pending = sum(e["status"] == "pending" for e in plan["revisions"])
    head = (
        f"target {plan['target']}: {plan['current'] or 'base'} -> {plan['to'] or 'base'}, "
        f"{pending} pending revision(s), {plan['lint_errors']} lint error(s)"
    )
    table = Table("revision", "message", "irreversible", "outside txn", "tables", "lint")
    for entry in plan["revisions"]:
        table.add_row(*_row(entry))
    return Group(Text(head), table, *_finding_lines(plan), *_replication_lines(plan))


def _replication_lines(plan: Mapping[str, Any]) -> list[Text]:
    """The standbys and slots preflight will check, and any over the target's bounds."""
    found = plan.get("replication") or {}
    if found.get("error"):
        return [Text(f"replication: {found['error']}")]
    lines = [Text(f"replication: {line}") for line in found.get("lines", [])]
    mode = found.get("mode")
    for reason in found.get("over_bounds") or []:
        refuses = "" if mode == "ignore" else "; apply would refuse in preflight"
        lines.append(Text(f"replication: over bounds: {reason}{refuses}", style="bold"))
    return lines
