"""Reading a revision's rendered SQL: whether it leaves its transaction, the tables it
names, Alembic's bookkeeping (no database)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import Target
from jobs.insight import parse
from jobs.pg.url import parse as make_url
from jobs.project.runtime import Project
from tests.projects import Rev, write_project
from tests.unit.revisions import framed


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
