"""One readable line per schema difference, from the tuples Alembic's autogenerate compare
yields (``alembic.autogenerate.compare_metadata``), built here from real SQLAlchemy objects;
no database."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    UniqueConstraint,
    text,
)

from jobs.config import normalize_url
from jobs.insight.drift import _flatten, diff_line

metadata = MetaData()
accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("email", String(200)),
    Column("org_id", Integer),
    UniqueConstraint("email", name="uq_accounts_email"),
    ForeignKeyConstraint(["org_id"], ["billing.orgs.id"], name="fk_accounts_org"),
    CheckConstraint("id > 0"),
)
index = Index("ix_accounts_email", accounts.c.email)
orgs = Table("orgs", metadata, Column("id", Integer, primary_key=True), schema="billing")


def test_tables_columns_indexes_and_constraints() -> None:
    uq, fk, check = (
        next(c for c in accounts.constraints if isinstance(c, kind))
        for kind in (UniqueConstraint, ForeignKeyConstraint, CheckConstraint)
    )
    assert [
        diff_line(d)
        for d in [
            ("add_table", orgs),
            ("remove_table", accounts),
            ("add_column", None, "accounts", Column("plan", String)),
            ("remove_column", "billing", "orgs", Column("legacy", Integer)),
            ("add_index", index),
            ("remove_constraint", uq),
            ("add_fk", fk),
            ("add_constraint", check),
        ]
    ] == [
        "table billing.orgs is in the models but not in the database",
        "table accounts is in the database but not in the models",
        "table accounts: column 'plan' is in the models but not in the database",
        "table billing.orgs: column 'legacy' is in the database but not in the models",
        "table accounts: index ix_accounts_email (email) is in the models but not in the database",
        "table accounts: unique constraint uq_accounts_email (email) is in the database but not "
        "in the models",
        "table accounts: foreign key fk_accounts_org (org_id) is in the models but not in the "
        "database",
        "table accounts: check constraint is in the models but not in the database",
    ]


def test_a_modified_column_says_both_sides() -> None:
    # Alembic groups one column's modifications in a list: one line each.
    grouped: list[Any] = [
        [
            ("modify_type", None, "accounts", "email", {}, String(100), String(200)),
            ("modify_nullable", None, "accounts", "email", {}, True, False),
        ],
        ("modify_default", "billing", "orgs", "id", {}, None, text("nextval('s')")),
        ("modify_type", None, "accounts", "n", {}, Numeric(10, 2), Integer()),
        ("modify_comment", None, "accounts", "id", {}, None, "the key"),
    ]
    assert [diff_line(d) for d in _flatten(grouped)] == [
        "table accounts: column 'email' is VARCHAR(100) in the database but VARCHAR(200) in the "
        "models",
        "table accounts: column 'email' is nullable in the database but NOT NULL in the models",
        "table billing.orgs: column 'id' has default none in the database but nextval('s') in "
        "the models",
        "table accounts: column 'n' is NUMERIC(10, 2) in the database but INTEGER in the models",
        "table accounts: column 'id': the comment differs (None in the database, 'the key' in "
        "the models)",
    ]


def test_an_unknown_difference_is_shown_as_alembic_gives_it_redacted() -> None:
    normalize_url("postgresql://app:drift-pw@h/db")  # a known secret from now on
    assert diff_line(("add_table_comment", orgs, None)) == "table billing.orgs: the comment differs"
    assert diff_line(("something_new", "drift-pw")) == "something_new: ('***',)"
