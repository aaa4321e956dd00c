"""The plan as the CLI prints it: revisions first, then their findings."""

from __future__ import annotations

import io

from rich.console import Console

from jobs.cli import render_plan
from jobs.insight import lint


def test_format_plan_shows_revisions_then_findings() -> None:
    long_stmt = "CREATE INDEX ix_orders_customer ON orders (customer_id" + ", c" * 40 + ")"
    finding = lint.Finding(
        rule="require-concurrent-index-creation",
        message="During normal index creation, table updates are blocked",
        help=None,
        level="error",
        line=5,
        statement=long_stmt,
    )
    doc = {
        "target": "prod",
        "current": "a1",
        "to": "c3",
        "lint_errors": 1,
        "generated_at": "2026-01-01T00:00:00+00:00",
        "revisions": [
            {"id": "a1", "message": "initial", "status": "current"},
            {
                "id": "b2",
                "message": "index orders",
                "status": "pending",
                "render_error": None,
                "lint": [finding],
                "irreversible": None,
                "outside_transaction": False,
                "tables": [
                    {
                        "name": "orders",
                        "exists": True,
                        "size_bytes": 3 << 20,
                        "estimated_rows": 3000,
                    },
                    {"name": "fresh", "exists": False, "size_bytes": None, "estimated_rows": None},
                ],
            },
            {
                "id": "c3",
                "message": "reads data",
                "status": "pending",
                "render_error": "cannot render the upgrade of c3 offline (AttributeError: x)",
                "lint": [],
                "irreversible": "its downgrade() does nothing",
                "outside_transaction": None,
                "tables": [],
            },
        ],
    }
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(render_plan.format_plan(doc))
    out = console.export_text()
    assert "target prod: a1 -> c3, 2 pending revision(s), 1 lint error(s)" in out
    assert "orders 3.0 MiB, ~3,000 rows" in out and "fresh (new)" in out
    assert "render failed" in out and "1 (1 error)" in out
    assert (
        f"b2  require-concurrent-index-creation  During normal index creation, table updates "
        f"are blocked  — {long_stmt[:80]}\n"
    ) in out
    assert "c3  render-error  cannot render the upgrade of c3 offline" in out


def test_format_plan_lists_rewrites_standbys_and_what_is_over_the_bounds() -> None:
    doc = {
        "target": "prod",
        "current": None,
        "to": "b2",
        "lint_errors": 0,
        "revisions": [
            {
                "id": "b2",
                "message": "widen",
                "status": "pending",
                "render_error": None,
                "lint": [],
                "irreversible": None,
                "outside_transaction": False,
                "tables": [],
                "rewrites": ["ALTER TABLE t ALTER COLUMN c TYPE bigint — changes a column's type"],
            }
        ],
        "replication": {
            "mode": "check",
            "lines": ["standby standby1: streaming, lag 0.0 s, 0 B behind"],
            "over_bounds": ["slot cdc retains 5.0 MB of WAL (max_retained_wal 1.0 MB)"],
        },
    }
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(render_plan.format_plan(doc))
    out = console.export_text()
    assert (
        "b2  rewrite  ALTER TABLE t ALTER COLUMN c TYPE bigint — changes a column's type "
        "(the run waits for standbys)"
    ) in out
    assert "replication: standby standby1: streaming, lag 0.0 s, 0 B behind" in out
    assert (
        "replication: over bounds: slot cdc retains 5.0 MB of WAL (max_retained_wal 1.0 MB); "
        "apply would refuse in preflight"
    ) in out
