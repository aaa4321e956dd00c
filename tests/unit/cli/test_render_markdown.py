"""The plan as a pull-request comment: cells that cannot break the table, SQL that cannot
break its fence, and a plan with nothing to do."""

from __future__ import annotations

import re
from typing import Any

from jobs.cli import render_markdown
from jobs.cli.render_markdown import cell, fenced, format_markdown


def finding(rule: str, level: str, statement: str, fix: str | None) -> dict[str, Any]:
    return {
        "rule": rule,
        "message": "squawk's message",
        "help": fix,
        "level": level,
        "line": 3,
        "statement": statement,
    }


def revision(rev: str, message: str, **fields: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": rev,
        "message": message,
        "status": "pending",
        "sql": "BEGIN;\nSELECT 1;\nCOMMIT;",
        "render_error": None,
        "lint": [],
        "irreversible": None,
        "outside_transaction": False,
        "rewrites": [],
        "tables": [],
        "backfills": [],
    }
    entry.update(fields)
    return entry


def plan(*revisions: dict[str, Any], **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "target": "prod",
        "current": "a1",
        "to": revisions[-1]["id"] if revisions else "a1",
        "revisions": [{"id": "a1", "message": "initial", "status": "current"}, *revisions],
        "lint_errors": 0,
        "replication": {"lines": ["no standbys or replication slots"], "over_bounds": []},
        "rehearsal": None,
        "generated_at": "2026-01-01T00:00:00+00:00",
    }
    doc.update(fields)
    return doc


def table_rows(md: str) -> list[list[str]]:
    """Each table row split on the pipes Markdown splits on (those not escaped)."""
    return [re.split(r"(?<!\\)\|", line)[1:-1] for line in md.splitlines() if line.startswith("| ")]


def test_pipes_backticks_html_and_newlines_cannot_break_a_cell() -> None:
    assert cell("a | b") == "a \\| b"
    assert cell("`x`") == "\\`x\\`"
    assert cell("<script>") == "&lt;script&gt;"
    assert cell("one\n\ntwo") == "one<br>two"
    assert cell("E'\\|'") == "E'\\\\\\|'"  # a backslash before a pipe cannot escape it away
    assert cell("SELECT * FROM t WHERE a * 2 > 1") == "SELECT \\* FROM t WHERE a \\* 2 &gt; 1"
    assert cell("~3,000 rows, ~20 rows") == "\\~3,000 rows, \\~20 rows"
    assert cell("_tmp_ next_plan_start_date") == "\\_tmp\\_ next_plan_start_date"
    assert cell(None) == " " and cell("") == " "


def test_a_message_and_a_statement_with_pipes_keep_their_table_shape() -> None:
    bad = finding(
        "require-concurrent-index-creation",
        "error",
        "CREATE INDEX ix ON t ((a || '|' || b))",
        "Use `CREATE INDEX CONCURRENTLY`",
    )
    doc = plan(revision("b2", "split | join `names`", lint=[bad]))
    md = format_markdown(doc)
    revisions_row, header, finding_row = table_rows(md)[1], table_rows(md)[0], table_rows(md)[3]
    assert len(revisions_row) == len(header) == 7
    assert len(finding_row) == 5
    assert revisions_row[1].strip() == "split \\| join \\`names\\`"
    assert finding_row[2].strip() == "**error**"
    assert finding_row[3].strip() == "CREATE INDEX ix ON t ((a \\|\\| '\\|' \\|\\| b))"
    assert finding_row[4].strip() == "Use \\`CREATE INDEX CONCURRENTLY\\`"
    assert "lint: 1 error, 0 warnings" in md and "**1 error**, 0 warnings" in md


def test_sql_with_backticks_gets_a_longer_fence() -> None:
    assert fenced("SELECT 1;") == "```sql\nSELECT 1;\n```"
    tricky = "COMMENT ON TABLE t IS '```not a fence```';"
    assert fenced(tricky) == f"````sql\n{tricky}\n````"
    md = format_markdown(plan(revision("b2", "comment", sql=tricky)))
    assert f"````sql\n{tricky}\n````" in md
    assert "<summary><code>b2</code> comment</summary>" in md


def test_irreversible_rewrites_and_render_errors_are_flagged() -> None:
    doc = plan(
        revision(
            "b2", "enum", irreversible="cannot remove an ENUM value", outside_transaction=True
        ),
        revision("c3", "retype", rewrites=["ALTER TABLE t ALTER COLUMN a TYPE bigint"]),
        revision(
            "d4",
            "reads",
            sql=None,
            render_error="cannot render d4 offline",
            outside_transaction=None,
            rewrites=None,
        ),
    )
    md = format_markdown(doc)
    rows = {r[0].strip(): r for r in table_rows(md) if r[0].strip().startswith("`")}
    assert rows["`b2`"][2].strip() == "**no**: cannot remove an ENUM value"
    assert rows["`b2`"][4].strip() == "yes"
    assert rows["`c3`"][3].strip() == "**yes**"
    assert rows["`d4`"][3].strip() == "?" and rows["`d4`"][6].strip() == "not rendered"
    assert "- <code>d4</code> reads: SQL not shown, cannot render d4 offline" in md
    assert md.count("```sql") == 2
    summary = md.splitlines()[2]
    assert summary == (
        "**3 pending revisions** · 1 irreversible · lint: 0 errors, 0 warnings · "
        "1 rewrites a table · 1 cannot be rendered offline"
    )


def test_tables_backfills_and_replication_facts() -> None:
    doc = plan(
        revision(
            "b2",
            "backfill",
            tables=[
                {"name": "orders", "exists": True, "size_bytes": 3 << 20, "estimated_rows": 3000},
                {"name": "fresh", "exists": False, "size_bytes": None, "estimated_rows": None},
            ],
            backfills=[
                {"table": "orders", "set": "a = 1", "where": "a IS NULL", "estimated_rows": 3000}
            ],
        ),
        replication={
            "lines": ["standby standby1: streaming, lag 4.0 s, 2.0 MB behind"],
            "over_bounds": ["standby standby1 lags 4.0 s (max_replica_lag 2.0 s)"],
            "mode": "check",
        },
    )
    md = format_markdown(doc)
    assert "| orders 3.0 MiB, \\~3,000 rows<br>fresh (new) |" in md
    assert "- `b2`: orders SET a = 1 WHERE a IS NULL (~3,000 rows in the table)" in md
    assert "- standby standby1: streaming, lag 4.0 s, 2.0 MB behind" in md
    assert (
        "- **over bounds**: standby standby1 lags 4.0 s (max_replica_lag 2.0 s); "
        "apply would refuse in preflight"
    ) in md


def test_a_plan_with_nothing_pending_says_so_without_empty_tables() -> None:
    md = format_markdown(plan())
    assert md.splitlines()[0] == "### runbook plan for `prod`: `a1` → `a1`"
    assert "Nothing to apply: the target is already there." in md
    assert "| revision |" not in md and "#### SQL" not in md and "#### Lint" not in md
    assert md.endswith("</sub>\n")


def test_replication_that_cannot_be_read_is_one_line() -> None:
    doc = plan(replication={"error": "cannot read the standbys: permission denied", "lines": []})
    assert render_markdown.replication_lines(doc) == [
        "- cannot read the standbys: permission denied"
    ]


def test_sql_that_would_pass_githubs_comment_limit_is_left_out_by_revision() -> None:
    huge = "INSERT INTO t VALUES " + ", ".join(f"({i})" for i in range(12_000)) + ";"
    doc = plan(
        revision("b2", "small"),
        revision("c3", "huge seed", sql=huge),
        revision("d4", "small again"),
    )
    assert len(huge) > render_markdown.COMMENT_LIMIT
    md = format_markdown(doc)
    assert len(md) <= render_markdown.COMMENT_LIMIT
    assert f"- <code>c3</code> huge seed: {render_markdown.SQL_OMITTED}" in md
    assert md.count("```sql") == 2  # b2 and d4 still shown
    assert "| `c3` | huge seed |" in md and "#### Lint findings" in md
