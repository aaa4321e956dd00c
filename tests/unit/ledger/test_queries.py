"""The ledger's named queries (jobs/ledger/queries/*.sql) and migrations
(jobs/ledger/migrations/*.sql), without a database: every name the code asks for exists, none
is left unused, and no migration that shipped has changed."""

from __future__ import annotations

import ast
import hashlib
import re
import string
from pathlib import Path

import pytest

from jobs.ledger import schema, sql

LEDGER = Path(sql.__file__).parent

# The migrations as they shipped: a ledger created by an older runbook is upgraded by the
# same statements, so a shipped file never changes (add a new one instead).
SHIPPED_MIGRATIONS = {
    "0001_runs_and_steps.sql": "4b555007cc581474bacd36848d681474f9029567b03ec54688e8716e6cea3dc9",
    "0002_backups.sql": "68ea4354b9b37932f2a580a7f018722a8949664fed08228742be826c54143c84",
    "0003_backfills.sql": "cc6836032db8ed88220c315140aa74b6bb5aeb8f5895701e61177742199084ea",
    "0004_backfill_slices.sql": "f5afbd959e1a5588ab1e2cfd0f36c6d092f4f5c95b795356e1a02a798a6b776e",
    "0005_leases.sql": "eecc609849aa1315bddf5c74750ddcdc02278df23e5136f839770e87bea39ce7",
}

# The queries whose caller fills {fragments} (jobs/ledger/slices.py); no other has one.
FRAGMENTS = {
    "open_batch": {"columns"},
    "record_batch": {"blocked"},
}


def names_called() -> dict[str, list[str]]:
    """{query name: [module, ...]} of every query("...") / query_text("...") in jobs/ledger/."""
    called: dict[str, list[str]] = {}
    for path in sorted(LEDGER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"query", "query_text"}
                and node.args
            ):
                for value in ast.walk(node.args[0]):
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        called.setdefault(value.value, []).append(path.name)
    return called


def test_every_query_the_code_calls_exists() -> None:
    missing = {
        name: where for name, where in names_called().items() if name not in sql.all_queries()
    }
    assert missing == {}


def test_no_query_is_left_unused() -> None:
    assert sorted(set(sql.all_queries()) - set(names_called())) == []


# A table a query reads or writes, and the schema it is qualified with.
TABLE_USE = re.compile(
    r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+(?:IF NOT EXISTS\s+)?(\w+)(?:\.(\w+))?\b(?!\()"
)
CTE = re.compile(r"(\w+) AS (?:MATERIALIZED )?\(")


def test_every_table_a_query_names_is_the_ledger_schema_s_or_its_own_cte() -> None:
    for name, body in sql.all_queries().items():
        local = set(CTE.findall(body)) | {"SET", "OF"}  # DO UPDATE SET, FOR UPDATE OF
        for first, second in TABLE_USE.findall(body):
            assert first == schema.SCHEMA if second else first in local, (name, first, second)


def test_only_the_known_queries_have_fragments() -> None:
    found = {
        name: {field for _, field, _, _ in string.Formatter().parse(body) if field}
        for name, body in sql.all_queries().items()
    }
    assert {name: fields for name, fields in found.items() if fields} == FRAGMENTS


def test_a_query_without_its_comment_or_named_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="'a' needs a '-- what it does' line"):
        sql.parse_queries("-- a --\nSELECT 1\n")
    with pytest.raises(ValueError, match="'a' needs"):
        sql.parse_queries("-- a --\n-- says nothing after\n")
    with pytest.raises(ValueError, match="'a' is named twice"):
        sql.parse_queries("-- a --\n-- one\nSELECT 1\n\n-- a --\n-- two\nSELECT 2\n")


def test_a_query_comment_is_not_sent() -> None:
    parsed = sql.parse_queries("-- header of the file\n\n-- a --\n-- one\n-- two\nSELECT 1\n")
    assert parsed == {"a": "SELECT 1"}


def test_the_shipped_migrations_are_unchanged_and_numbered_in_order() -> None:
    files = sorted(schema.MIGRATIONS_DIR.glob("*.sql"))
    shipped = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert {name: shipped.get(name) for name in SHIPPED_MIGRATIONS} == SHIPPED_MIGRATIONS
    assert [int(p.name[:4]) for p in files] == list(range(1, len(files) + 1))
    assert schema.migrations() == [p.read_text() for p in files]


def test_the_listen_query_names_the_channel_notify_uses() -> None:
    from jobs.ledger.notify import CHANNEL

    assert sql.all_queries()["listen"] == f"LISTEN {CHANNEL}"
    # and the psycopg2-only one `status --watch` listens with (jobs/ledger/read.py)
    from jobs.ledger import read

    assert f"LISTEN {CHANNEL}" == read.LISTEN
