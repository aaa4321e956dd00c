"""Reading a revision's rendered SQL into what it creates, drops, updates and alters, the
events doctor checks against the live database (jobs/insight/sql_findings.py); no database."""

from __future__ import annotations

import pytest

from jobs.insight import sql_findings


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            'CREATE TABLE IF NOT EXISTS "Mixed"."T" (id int);',
            [("create", "table", '"Mixed"."T"', "", True)],
        ),
        (
            "CREATE UNIQUE INDEX CONCURRENTLY ix ON ONLY app.t (a);",
            [("create", "index", "app.ix", "", False)],
        ),
        ("CREATE TYPE mood AS ENUM ('a', 'b');", [("create", "type", "mood", "", False)]),
        (
            "ALTER TABLE t ADD CONSTRAINT c CHECK (x IS NOT NULL) NOT VALID, "
            "ADD COLUMN y numeric(10, 2) NOT NULL, ALTER COLUMN x SET NOT NULL, "
            "DROP CONSTRAINT c, DROP COLUMN z;",
            [
                ("add_column", "column", "t", "y", False),
                ("set_not_null", "column", "t", "x", False),
                ("drop_column", "column", "t", "z", False),
            ],
        ),
        (
            "ALTER TABLE s.old RENAME TO new;",
            [("drop", "table", "s.old", "", False), ("create", "relation", "s.new", "", False)],
        ),
        (
            "UPDATE accounts AS a SET email = 'x', plan = 'free' WHERE email IS NULL;",
            [
                ("update", "column", "accounts", "email", False),
                ("update", "column", "accounts", "plan", False),
            ],
        ),
        (
            "DROP TABLE IF EXISTS a, b CASCADE;",
            [("drop", "table", "a", "", False), ("drop", "table", "b", "", False)],
        ),
    ],
    ids=["quoted", "index", "type", "alter clauses", "rename", "update", "drop list"],
)
def test_reading_rendered_sql(sql: str, expected: list[tuple[str, str, str, str, bool]]) -> None:
    found = [(e.kind, e.what, e.name, e.column, e.if_not_exists) for e in sql_findings.events(sql)]
    assert found == expected
