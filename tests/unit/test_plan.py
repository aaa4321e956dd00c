"""The plan's pieces without a database: transaction detection, squawk findings, tables."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy.engine import make_url

from jobs.cli import render_plan
from jobs.config import Target
from jobs.errors import BadDeclaration, LintFailed, LintUnavailable
from jobs.insight import lint, parse, plan
from jobs.project.runtime import Project
from jobs.project.scripts import Revision
from tests.projects import Rev, write_project


def framed(*statements: str, before: str = "a", after: str = "b") -> str:
    """One revision as Alembic's offline mode renders it (transaction_per_migration)."""
    body = "\n\n".join(f"{s};" for s in statements)
    return (
        f"BEGIN;\n\n-- Running upgrade {before} -> {after}\n\n{body}\n\n"
        f"UPDATE alembic_version SET version_num='{after}' "
        f"WHERE alembic_version.version_num = '{before}';\n\nCOMMIT;\n\n"
    )


def rules(findings: list[lint.Finding]) -> set[str]:
    return {f["rule"] for f in findings}


def by_rule(findings: list[lint.Finding], rule: str) -> lint.Finding:
    return next(f for f in findings if f["rule"] == rule)


def lint_one(sql: str, pg_version: str | None = "15.0") -> list[lint.Finding]:
    return lint.lint({"r": sql}, pg_version=pg_version)["r"]


def project_for(tmp_path: Path, revisions: list[Rev]) -> Project:
    ini = write_project(tmp_path, revisions)
    target = Target(
        name="t",
        url=make_url("postgresql+psycopg2://h/db"),
        alembic_ini=ini,
        backup_dir=tmp_path / "b",
    )
    return Project(target)


# -- outside a transaction --------------------------------------------------------------------


def test_plain_revision_stays_inside_its_transaction() -> None:
    assert not parse.outside_transaction(framed("ALTER TABLE t ADD COLUMN c text"))
    # A DO block that mentions COMMIT is one statement, still inside the transaction.
    assert not parse.outside_transaction(framed("DO $$ BEGIN RAISE NOTICE 'COMMIT;'; END $$"))


def test_autocommit_block_is_outside_the_transaction(tmp_path: Path) -> None:
    project = project_for(
        tmp_path,
        [
            Rev(
                "e1",
                """
                with op.get_context().autocommit_block():
                    op.execute("ANALYZE t")
                op.execute("UPDATE t SET c = 1")
                """,
            )
        ],
    )
    sql = project.upgrade_sql(project.revision("e1"))
    assert "COMMIT;" in sql.split("ANALYZE")[0]  # Alembic's framing, as rendered
    assert parse.outside_transaction(sql)


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE INDEX CONCURRENTLY ix ON t (c)",
        "CREATE UNIQUE INDEX CONCURRENTLY ix ON t (c)",
        "DROP INDEX CONCURRENTLY ix",
        "ALTER TYPE mood ADD VALUE 'meh'",
        "ALTER TYPE mood ADD VALUE IF NOT EXISTS 'meh' AFTER 'ok'",
        "VACUUM ANALYZE t",
        "REINDEX INDEX CONCURRENTLY ix",
        "ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY",
    ],
)
def test_statements_that_cannot_run_in_a_transaction(statement: str) -> None:
    assert parse.outside_transaction(framed(statement))
    assert parse.outside_transaction(f"{statement};\n")


def test_unframed_sql_and_comments_do_not_count() -> None:
    assert not parse.outside_transaction("ALTER TABLE t ADD COLUMN c text;\n")
    assert not parse.outside_transaction(framed("-- CREATE INDEX CONCURRENTLY later\nSELECT 1"))
    assert not parse.outside_transaction("")


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


# -- tables (pglast) --------------------------------------------------------------------------


def test_tables_from_the_parse_tree() -> None:
    sql = framed(
        "ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (c) REFERENCES customers (id)",
        "WITH recent AS (SELECT id FROM audit.events) UPDATE orders SET n = 1 "
        "WHERE id IN (SELECT id FROM recent)",
        "CREATE INDEX ix ON Line_Items (c)",
        'CREATE TABLE "New Table" (id int)',
        "DROP TABLE IF EXISTS old_stuff, archive.old_things",
        "TRUNCATE scratch",
        "ALTER TYPE mood ADD VALUE 'meh'",
    )
    assert parse.tables_in(sql) == [
        "orders",
        "customers",
        "audit.events",
        "line_items",
        "New Table",
        "old_stuff",
        "archive.old_things",
        "scratch",
        "alembic_version",
    ]


def test_tables_inside_a_do_block() -> None:
    sql = (
        "DO $$\nDECLARE last_id bigint := (SELECT min(id) FROM big);\nBEGIN\n"
        "  LOOP\n    UPDATE big SET c = 1 WHERE id > last_id;\n    EXIT WHEN NOT FOUND;\n"
        "    COMMIT;\n  END LOOP;\n  INSERT INTO log SELECT * FROM other;\nEND\n$$;\n"
    )
    assert parse.tables_in(sql) == ["big", "log", "other"]


def test_unparseable_statements_give_no_tables() -> None:
    assert parse.tables_in("SELEC broken FROM nowhere;\n") == []
    assert parse.tables_in("") == []
    # One bad statement does not hide the others.
    assert parse.tables_in("UPDATE a SET x = 1;\nSELEC broken;\nUPDATE b SET x = 1;\n") == [
        "a",
        "b",
    ]


def test_bookkeeping_statements() -> None:
    stmts = parse.statements(framed("UPDATE alembic_version_history SET n = 1"))
    assert [parse.is_bookkeeping(s, "alembic_version") for s in stmts] == [
        False,
        False,
        True,
        False,
    ]


# -- backfills and human output ---------------------------------------------------------------


def revision_with(**attrs: object) -> Revision:
    module = types.ModuleType("rev")
    for key, value in attrs.items():
        setattr(module, key, value)
    return Revision(id="r1", down=None, message="m", path="/nowhere.py", module=module)


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


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ("big", "backfills must be a list of dicts"),
        (["big"], "give a dict with table, set"),
        ([{"table": "big"}], "'set' is required"),
        ([{"table": "big", "set": "v = 1", "sett": "x"}], "unknown field 'sett'"),
        ([{"table": "big; drop", "set": "v = 1"}], "table 'big; drop' is not a plain name"),
        ([{"table": "big", "set": "v = pg_sleep(1)"}], "set calls pg_sleep()"),
        (
            [{"table": "big", "set": "v = 1", "where": "true; DELETE FROM big"}],
            "where contains ';'",
        ),
        ([{"table": "big", "set": "id = 1", "key": "id"}], "assigns the key id"),
        ([{"table": "big", "set": "v = 1", "batch_size": 0}], "batch_size must be a positive"),
        ([{"table": "big", "set": "v = 1", "slices": 1000}], "--slices must be between 1 and"),
        ([{"table": "big", "set": "v = 1", "on_error": "ignore"}], "--on-error must be one of"),
    ],
)
def test_a_bad_declaration_is_refused_in_one_line(declared: object, message: str) -> None:
    with pytest.raises(BadDeclaration) as refused:
        revision_with(backfills=declared).backfills  # noqa: B018 - reading it is the check
    assert message in str(refused.value)
    assert str(refused.value).startswith("revision r1")
    assert "\n" not in str(refused.value)


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
