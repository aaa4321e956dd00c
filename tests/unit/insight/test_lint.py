"""squawk's findings on a revision's rendered SQL, Alembic's framing left out (no database)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobs.errors import LintFailed, LintUnavailable
from jobs.insight import lint
from tests.unit.revisions import framed


def rules(findings: list[lint.Finding]) -> set[str]:
    return {f["rule"] for f in findings}


def by_rule(findings: list[lint.Finding], rule: str) -> lint.Finding:
    return next(f for f in findings if f["rule"] == rule)


def lint_one(sql: str, pg_version: str | None = "15.0") -> list[lint.Finding]:
    return lint.lint({"r": sql}, pg_version=pg_version)["r"]


# -- squawk -----------------------------------------------------------------------------------


def test_non_concurrent_index_on_an_existing_table() -> None:
    found = lint_one(framed("CREATE INDEX ix_orders_customer ON orders (customer_id)"))
    f = by_rule(found, "require-concurrent-index-creation")
    assert f["level"] == "error"
    assert f["statement"] == "CREATE INDEX ix_orders_customer ON orders (customer_id)"
    assert f["line"] == 5  # 1-based, in the rendered SQL


def test_index_on_a_table_created_in_the_same_transaction_is_fine() -> None:
    found = lint_one(
        framed("CREATE TABLE fresh (id int PRIMARY KEY, c text)", "CREATE INDEX ix ON fresh (c)")
    )
    assert "require-concurrent-index-creation" not in rules(found)


def test_set_not_null_on_an_existing_column() -> None:
    found = lint_one(framed("ALTER TABLE orders ALTER COLUMN note SET NOT NULL"))
    f = by_rule(found, "adding-not-nullable-field")
    assert f["level"] == "error"
    assert f["statement"] == "ALTER TABLE orders ALTER COLUMN note SET NOT NULL"


def test_foreign_key_without_not_valid() -> None:
    stmt = (
        "ALTER TABLE orders ADD CONSTRAINT orders_customer_fk "
        "FOREIGN KEY (customer_id) REFERENCES customers (id)"
    )
    found = lint_one(framed(stmt))
    assert {"adding-foreign-key-constraint", "constraint-missing-not-valid"} <= rules(found)
    assert by_rule(found, "adding-foreign-key-constraint")["statement"] == stmt
    assert by_rule(found, "adding-foreign-key-constraint")["level"] == "error"
    # NOT VALID, validated after the commit (Alembic's autocommit_block): nothing to say.
    safe = (
        framed(stmt + " NOT VALID") + "ALTER TABLE orders VALIDATE CONSTRAINT orders_customer_fk;\n"
    )
    assert not {"adding-foreign-key-constraint", "constraint-missing-not-valid"} & rules(
        lint_one(safe)
    )


def test_enum_value_added() -> None:
    found = lint_one(framed("ALTER TYPE order_status ADD VALUE 'shipped'"))
    assert {"ban-add-enum-value", "require-enum-value-ordering"} <= rules(found)
    assert by_rule(found, "ban-add-enum-value")["statement"] == (
        "ALTER TYPE order_status ADD VALUE 'shipped'"
    )
    assert by_rule(found, "ban-add-enum-value")["level"] == "warning"


def test_alembic_framing_and_bookkeeping_are_not_linted() -> None:
    sql = (
        "BEGIN;\n\nCREATE TABLE alembic_version (\n    version_num VARCHAR(32) NOT NULL, \n"
        "    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)\n);\n\n"
        "-- Running upgrade  -> a\n\nALTER TABLE orders ADD COLUMN c text;\n\n"
        "INSERT INTO alembic_version (version_num) VALUES ('a') RETURNING "
        "alembic_version.version_num;\n\nCOMMIT;\n\n"
    )
    blank = lint.lint_text(sql)
    assert "alembic_version" not in blank and "ALTER TABLE orders" in blank
    assert len(blank) == len(sql) and blank.count("\n") == sql.count("\n")
    found = lint_one(sql)
    assert not [f for f in found if "alembic_version" in f["statement"]]
    assert "transaction-nesting" not in rules(found)
    assert "require-lock-timeout" not in rules(found)  # runbook sets lock_timeout itself


def test_autocommit_block_statements_are_not_rerunnable() -> None:
    sql = framed("SELECT 1") + "ALTER TABLE orders ADD COLUMN c text;\n\n"
    f = by_rule(lint_one(sql), "prefer-robust-stmts")
    assert f["statement"] == "ALTER TABLE orders ADD COLUMN c text"


def test_concurrently_left_inside_the_transaction_is_an_error() -> None:
    found = lint_one(framed("CREATE INDEX CONCURRENTLY ix ON orders (c)"))
    assert by_rule(found, "ban-concurrent-index-creation-in-transaction")["level"] == "error"


def test_pg_version_reaches_squawk() -> None:
    sql = framed("ALTER TABLE orders ADD COLUMN c int DEFAULT 1")
    assert "adding-field-with-default" in rules(lint_one(sql, pg_version="10.0"))
    assert "adding-field-with-default" not in rules(lint_one(sql, pg_version="15.0"))


def test_statement_timeout_rule_can_be_excluded() -> None:
    sql = framed("ALTER TABLE orders ALTER COLUMN note SET NOT NULL")
    assert "require-statement-timeout" in rules(lint_one(sql))
    found = lint.lint({"r": sql}, exclude=["require-statement-timeout"])["r"]
    assert "require-statement-timeout" not in rules(found)


def test_one_squawk_run_keeps_each_script_apart() -> None:
    found = lint.lint(
        {
            "one": framed("CREATE INDEX ix ON orders (c)"),
            "two": framed("ALTER TYPE s ADD VALUE 'x'"),
            "three": framed("SELECT 1"),
        }
    )
    assert "require-concurrent-index-creation" in rules(found["one"])
    assert "ban-add-enum-value" not in rules(found["one"])
    assert "ban-add-enum-value" in rules(found["two"])
    assert found["three"] == []
    assert lint.lint({}) == {}


def test_syntax_error_is_an_error_finding() -> None:
    found = lint_one(framed("ALTER TABLE orders ADD COLUMN c text", "SELEC broken"))
    f = by_rule(found, "syntax-error")
    assert f["level"] == "error"
    assert "SELEC broken" in f["statement"]


def test_missing_squawk_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LintUnavailable, match="squawk not found; pip install squawk-cli"):
        lint.lint({"r": framed("SELECT 1")})


def test_squawk_without_a_report_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "squawk"
    fake.write_text("#!/bin/sh\necho 'boom: no config' >&2\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setattr(lint, "squawk_binary", lambda: str(fake))
    with pytest.raises(LintFailed, match=r"squawk gave no report \(boom: no config\)"):
        lint.lint({"r": framed("SELECT 1")})
