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


def test_names_compare_as_postgresql_stores_them() -> None:
    assert sql_findings._ident('"Mixed ""Case"""') == 'Mixed "Case"'
    assert sql_findings._ident(" Accounts ") == "accounts"
    # public is the default schema: public.T, "public"."t" and t are one table; s.t is another.
    assert {sql_findings._key(n) for n in ("public.T", '"public"."t"', "t")} == {"t"}
    assert sql_findings._key('s."T"') == "s.T"
    assert sql_findings._sibling("s.accounts", "ix") == "s.ix"
    assert sql_findings._sibling("accounts", "ix") == "ix"


def test_clauses_split_on_top_level_commas_only() -> None:
    body = "ADD COLUMN a numeric(10, 2) DEFAULT 0, ALTER COLUMN b SET DEFAULT 'x, y', DROP c"
    assert sql_findings._clauses(body) == [
        "ADD COLUMN a numeric(10, 2) DEFAULT 0",
        "ALTER COLUMN b SET DEFAULT 'x, y'",
        "DROP c",
    ]
    assert sql_findings._clauses(" , ") == []


def test_the_plan_remembers_what_earlier_pending_sql_does() -> None:
    plan = sql_findings.Plan()
    sql = (
        "CREATE TABLE s.fresh (id int);\n"
        "ALTER TABLE public.Accounts ADD COLUMN plan text NOT NULL DEFAULT 'free', "
        "ADD COLUMN note text, DROP COLUMN old, RENAME COLUMN nick TO handle;\n"
        "UPDATE accounts SET Email = lower(email);\n"
    )
    for event in sql_findings.events(sql):
        plan.record(event)
    assert plan.touched == {"s.fresh"}
    # A renamed column's new name has no definition: nothing is known about how it fills.
    assert plan.added == {("accounts", "plan"): True, ("accounts", "note"): False}
    assert plan.dropped_columns == {("accounts", "old"), ("accounts", "nick")}
    assert plan.filled == {("accounts", "email")}
