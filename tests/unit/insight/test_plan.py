"""The plan's backfills: what a revision declares, with the rows they would touch (no
database)."""

from __future__ import annotations

from pathlib import Path

from jobs.config import Target, normalize_url
from jobs.insight import plan
from jobs.insight.lint import Finding
from tests.unit.revisions import revision_with


def test_declared_backfills_get_estimated_rows() -> None:
    def tables(name: str) -> plan.TableInfo:
        return plan.TableInfo(name=name, exists=True, size_bytes=8192, estimated_rows=42)

    assert plan.backfills(revision_with(), tables) == []
    declared = revision_with(
        backfills=[
            {"table": "big", "set": "v = 1", "where": "v IS NULL", "key": "id", "batch_size": 500},
            {"table": "other", "set": "w = lower(w)"},
        ]
    )
    assert plan.backfills(declared, tables) == [
        {
            "table": "big",
            "set": "v = 1",
            "where": "v IS NULL",
            "key": "id",
            "batch_size": 500,
            "slices": 1,
            "estimated_rows": 42,
        },
        {
            "table": "other",
            "set": "w = lower(w)",
            "where": None,
            "key": None,
            "batch_size": 1000,
            "slices": 1,
            "estimated_rows": 42,
        },
    ]


def _target(**options: object) -> Target:
    return Target(
        name="prod",
        url=normalize_url("postgresql://h/db"),
        alembic_ini=Path("alembic.ini"),
        backup_dir=Path("b"),
        **options,  # type: ignore[arg-type]
    )


def test_statement_timeout_rule_is_dropped_only_where_runbook_sets_one() -> None:
    assert plan.excluded_rules(_target()) == ()
    assert plan.excluded_rules(_target(statement_timeout_ms=900_000)) == (
        "require-statement-timeout",
    )


def test_statement_timeout_finding_names_the_targets_setting() -> None:
    raised = Finding(
        rule="require-statement-timeout",
        message="Missing `set statement_timeout`",
        help="Configure a `statement_timeout` before this statement",
        level="warning",
        line=4,
        statement="ALTER TABLE t ADD COLUMN c text",
    )
    fixed = plan._under_runbook(_target(), raised)
    assert fixed["help"] == (
        'set statement_timeout (e.g. "15min") on target prod in runbook.toml; '
        "runbook then sets it on every session and drops this rule"
    )
    assert {**fixed, "help": raised["help"]} == raised
    other = Finding(**{**raised, "rule": "ban-drop-column"})
    assert plan._under_runbook(_target(), other) is other
