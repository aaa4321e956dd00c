"""Which rendered statements rewrite a table (jobs/insight/rewrites.py); no database."""

from __future__ import annotations

import pytest

from jobs.insight.rewrites import by_revision, rewrites


@pytest.mark.parametrize(
    ("sql", "why"),
    [
        ("ALTER TABLE t ALTER COLUMN c TYPE bigint", "changes a column's type"),
        ("ALTER TABLE t ALTER c TYPE text USING c::text", "changes a column's type"),
        (
            "ALTER TABLE t ADD COLUMN u uuid DEFAULT gen_random_uuid() NOT NULL",
            "adds column u with volatile default gen_random_uuid()",
        ),
        (
            "ALTER TABLE t ADD COLUMN r float8 DEFAULT coalesce(NULL, random())",
            "adds column r with volatile default random()",
        ),
        ("ALTER TABLE t ADD COLUMN s bigserial", "adds bigserial column s, filled for every row"),
        (
            "ALTER TABLE t ADD COLUMN i int GENERATED ALWAYS AS IDENTITY",
            "adds identity column i, filled for every row",
        ),
        (
            "ALTER TABLE t ADD COLUMN g int GENERATED ALWAYS AS (a * 2) STORED",
            "adds stored generated column g",
        ),
        ("VACUUM FULL t", "VACUUM FULL rewrites the table"),
        ("VACUUM (FULL, ANALYZE) t", "VACUUM FULL rewrites the table"),
        ("CLUSTER t USING t_pkey", "CLUSTER rewrites the table"),
        ("ALTER TABLE t SET LOGGED", "sets the table LOGGED"),
        ("ALTER TABLE t SET TABLESPACE fast", "moves the table to another tablespace"),
    ],
)
def test_statements_that_rewrite_are_found_with_why(sql: str, why: str) -> None:
    assert rewrites(f"BEGIN;\n{sql};\nCOMMIT;\n") == [f"{sql} — {why}"]


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE t ADD COLUMN n timestamptz DEFAULT now()",  # stored once in the catalog
        "ALTER TABLE t ADD COLUMN k int NOT NULL DEFAULT 0",
        "ALTER TABLE t ADD COLUMN note text",
        "ALTER TABLE t ALTER COLUMN c SET NOT NULL",  # a scan, not a rewrite
        "ALTER TABLE t ADD CONSTRAINT c_pos CHECK (c > 0)",
        "CREATE INDEX CONCURRENTLY t_c ON t (c)",
        "VACUUM ANALYZE t",
        "UPDATE alembic_version SET version_num='b2' WHERE alembic_version.version_num = 'a1'",
        "SELEC broken",
    ],
)
def test_statements_that_do_not_rewrite_are_left_out(sql: str) -> None:
    assert rewrites(f"{sql};\n") == []


def test_a_rendered_range_is_cut_at_each_revision() -> None:
    sql = (
        "BEGIN;\n\nCREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL);\n\n"
        "-- Running upgrade  -> a1\n\nCREATE TABLE x (id int);\n\n"
        "INSERT INTO alembic_version (version_num) VALUES ('a1');\n\n"
        "-- Running upgrade a1 -> a2\n\nALTER TABLE x ALTER COLUMN id TYPE bigint;\n\n"
        "-- Running upgrade a2, b2 -> m3\n\nVACUUM FULL x;\n\nCOMMIT;\n"
    )
    parts = by_revision(sql)
    assert list(parts) == ["a1", "a2", "m3"]
    assert rewrites(parts["a1"]) == []
    assert rewrites(parts["a2"]) == [
        "ALTER TABLE x ALTER COLUMN id TYPE bigint — changes a column's type"
    ]
    assert rewrites(parts["m3"]) == ["VACUUM FULL x — VACUUM FULL rewrites the table"]
    assert by_revision("SELECT 1;") == {}
