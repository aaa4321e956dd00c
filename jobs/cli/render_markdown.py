"""A plan as a pull-request comment (GitHub-flavoured Markdown), from the same plan dict that
``runbook plan --json`` prints (jobs/insight/plan.py), so the two never disagree."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Any

from jobs.cli.render_plan import table_cell


def cell(value: object) -> str:
    """Text safe inside a table cell: a pipe would end the cell, a backtick open a code span,
    ``<`` start HTML, ``*``, ``~`` and a word-edge ``_`` emphasise or strike out (GitHub
    strikes out ``~a~``: two tables' ``~3,000 rows`` in one cell), a newline end the row."""
    text = "" if value is None else str(value)
    text = re.sub(r"([\\|`*~])", r"\\\1", text)
    text = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "<br>".join(line for line in text.splitlines() if line.strip()) or " "


def fenced(code: str, lang: str = "sql") -> str:
    """``code`` in a fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{code.rstrip()}\n{fence}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _pending(plan: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [e for e in plan["revisions"] if e["status"] == "pending"]


def _findings(plan: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [(e["id"], f) for e in _pending(plan) for f in e.get("lint") or []]


def heading(plan: Mapping[str, Any]) -> str:
    return (
        f"### runbook plan for `{plan['target']}`: "
        f"`{plan['current'] or 'base'}` → `{plan['to'] or 'base'}`"
    )


def summary(plan: Mapping[str, Any]) -> str:
    """One line: how many revisions, irreversible ones, lint errors and warnings, rewrites."""
    pending = _pending(plan)
    if not pending:
        return "Nothing to apply: the target is already there."
    levels = [f["level"] for _, f in _findings(plan)]
    errors = levels.count("error")
    parts = [
        f"**{_plural(len(pending), 'pending revision')}**",
        f"{sum(bool(e.get('irreversible')) for e in pending)} irreversible",
        f"lint: {_plural(errors, 'error')}, {_plural(len(levels) - errors, 'warning')}",
        _rewrites(sum(bool(e.get("rewrites")) for e in pending)),
    ]
    unrendered = sum(bool(e.get("render_error")) for e in pending)
    if unrendered:
        parts.append(f"{unrendered} cannot be rendered offline")
    return " · ".join(parts)


def _rewrites(n: int) -> str:
    if not n:
        return "no table rewrites"
    return f"{n} rewrite{'s' if n == 1 else ''} a table"


def _yes_no(value: object, yes: str = "yes") -> str:
    if value is None:
        return "?"
    return yes if value else "no"


def _lint_cell(entry: Mapping[str, Any]) -> str:
    if entry.get("render_error"):
        return "not rendered"
    levels = [f["level"] for f in entry.get("lint") or []]
    errors = levels.count("error")
    if not levels:
        return "clean"
    text = _plural(len(levels) - errors, "warning")
    return f"**{_plural(errors, 'error')}**, {text}" if errors else text


def revisions_table(plan: Mapping[str, Any]) -> list[str]:
    """One row per pending revision: what a reviewer weighs before approving."""
    lines = [
        "| revision | message | reversible | rewrites a table | outside a transaction "
        "| tables (live size, estimated rows) | lint |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in _pending(plan):
        irreversible = e.get("irreversible")
        reversible = f"**no**: {cell(irreversible)}" if irreversible else "yes"
        rewrites = e.get("rewrites")
        rewrite = "?" if rewrites is None else ("**yes**" if rewrites else "no")
        tables = "<br>".join(cell(table_cell(t)) for t in e.get("tables") or []) or " "
        lines.append(
            f"| `{e['id']}` | {cell(e['message'])} | {reversible} | {rewrite} "
            f"| {_yes_no(e.get('outside_transaction'))} | {tables} | {_lint_cell(e)} |"
        )
    return lines


# GitHub refuses a comment body over 65,536 characters; the rest of the comment keeps room.
COMMENT_LIMIT = 65_536
SQL_OMITTED = "SQL not shown: the comment would pass GitHub's size limit; `runbook plan` shows it"


def sql_blocks(plan: Mapping[str, Any], budget: int = COMMENT_LIMIT) -> list[str]:
    """Each revision's SQL, folded: a reviewer opens the ones the table made interesting.
    Within ``budget`` characters: a block that would not fit is one line saying so."""
    lines: list[str] = []
    for e in _pending(plan):
        title = f"<code>{html.escape(e['id'])}</code> {html.escape(e['message'] or '')}"
        if e.get("render_error"):
            lines += [f"- {title}: SQL not shown, {cell(e['render_error'])}"]
            continue
        block = [
            "<details>",
            f"<summary>{title}</summary>",
            "",
            fenced(e.get("sql") or "-- no SQL"),
            "",
            "</details>",
        ]
        size = sum(len(line) + 1 for line in block)
        if size > budget:
            block, size = [f"- {title}: {SQL_OMITTED}"], 0
        budget -= size
        lines += block
    return lines


def findings_table(plan: Mapping[str, Any]) -> list[str]:
    found = _findings(plan)
    if not found:
        return ["No lint findings."]
    lines = ["| revision | rule | level | statement | fix |", "|---|---|---|---|---|"]
    for rev, f in found:
        level = "**error**" if f["level"] == "error" else f["level"]
        statement = f["statement"] if len(f["statement"]) <= 160 else f["statement"][:159] + "…"
        fix = f.get("help") or f.get("message") or ""
        lines.append(f"| `{rev}` | {cell(f['rule'])} | {level} | {cell(statement)} | {cell(fix)} |")
    return lines


def backfill_lines(plan: Mapping[str, Any]) -> list[str]:
    lines = []
    for e in _pending(plan):
        for b in e.get("backfills") or []:
            where = f" WHERE {b['where']}" if b.get("where") else ""
            rows = b.get("estimated_rows")
            size = "" if rows is None else f" (~{rows:,} rows in the table)"
            what = cell(f"{b['table']} SET {b['set']}{where}")
            lines.append(f"- `{e['id']}`: {what}{size}")
    return lines


def replication_lines(plan: Mapping[str, Any]) -> list[str]:
    """The standbys and slots as preflight will see them (jobs/pg/replication.py describe)."""
    found = plan.get("replication") or {}
    if found.get("error"):
        return [f"- {cell(found['error'])}"]
    lines = [f"- {cell(line)}" for line in found.get("lines") or []]
    refuses = "" if found.get("mode") == "ignore" else "; apply would refuse in preflight"
    lines += [f"- **over bounds**: {cell(r)}{refuses}" for r in found.get("over_bounds") or []]
    return lines


def rehearsal_line(plan: Mapping[str, Any]) -> str:
    rehearsal = plan.get("rehearsal")
    if not rehearsal:
        return "No rehearsal of these revisions yet (`runbook rehearse`)."
    failed = ", ".join(rehearsal.get("irreversible") or {}) or "none"
    return (
        f"Last rehearsal: run `{rehearsal['run']}` {rehearsal['state']} "
        f"({rehearsal.get('finished_at') or ''}); downgrades that failed: {cell(failed)}."
    )


def format_markdown(plan: Mapping[str, Any]) -> str:
    """The whole comment: heading, summary, revisions, SQL, findings, backfills, replicas."""
    head = [heading(plan), "", summary(plan)]
    rest: list[str] = []
    if _pending(plan):
        head += ["", *revisions_table(plan), "", "#### SQL", ""]
        rest += ["", "#### Lint findings", "", *findings_table(plan)]
        backfills = backfill_lines(plan)
        if backfills:
            rest += ["", "#### Declared backfills", "", *backfills]
    replication = replication_lines(plan)
    if replication:
        rest += ["", "#### Standbys and replication slots", "", *replication]
    rest += ["", rehearsal_line(plan), "", f"<sub>generated {plan.get('generated_at', '')}</sub>"]
    # The SQL gets what the rest leaves of the limit, with room for the omission lines.
    used = sum(len(line) + 1 for line in (*head, *rest))
    omitted = len(_pending(plan)) * (len(SQL_OMITTED) + 200)
    sql = sql_blocks(plan, COMMENT_LIMIT - used - omitted) if _pending(plan) else []
    return "\n".join([*head, *sql, *rest]) + "\n"
