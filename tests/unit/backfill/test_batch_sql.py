"""The SQL of a backfill batch, built from the ledger's texts: its key bounds always hold."""

from __future__ import annotations

import re

import pytest

from jobs.backfill import batch_sql


def without_comments(sql: str) -> str:
    """``sql`` with each ``--`` comment cut off at the end of its line, as PostgreSQL reads it."""
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


@pytest.mark.parametrize("has_lo", [True, False])
def test_a_trailing_comment_in_set_or_where_cannot_swallow_the_bounds(has_lo: bool) -> None:
    sql = batch_sql.update_sql(
        "public.items", '"id"', "integer", "v = 1 -- all of it", "v IS NULL -- or not", has_lo
    )
    read = without_comments(sql)
    assert '"id" <= CAST(:hi AS integer)' in read
    assert ('"id" > CAST(:lo AS integer)' in read) == has_lo
    assert "v IS NULL" in read and read.rstrip().endswith(")")


def test_a_colon_in_a_fragment_is_not_a_bind_parameter() -> None:
    sql = batch_sql.update_sql("t", '"k"', "text", "note = 'at :noon'", "x::text <> ''", False)
    assert set(re.findall(r"(?<![:\w\\]):(\w+)", sql)) == {"hi"}


@pytest.mark.parametrize("has_lo", [True, False])
def test_the_bound_and_the_keys_of_a_batch_read_only_their_parameters(has_lo: bool) -> None:
    binds = {"upper", "n", "lo"} if has_lo else {"upper", "n"}
    bound = batch_sql.bound_sql("t", '"k"', "bigint", has_lo)
    assert set(re.findall(r"(?<![:\w]):(\w+)", bound)) == binds
    keys = batch_sql.keys_sql("t", '"k"', "bigint", has_lo)
    assert set(re.findall(r"(?<![:\w]):(\w+)", keys)) == ({"hi", "lo"} if has_lo else {"hi"})
    assert keys.endswith('ORDER BY t."k"')


def test_a_batch_names_itself_and_does_not_wait_for_the_wal_flush() -> None:
    assert batch_sql.session_settings(1500, 30000) == {
        "lock_timeout": "1500",
        "statement_timeout": "30000",
        "application_name": batch_sql.APPLICATION_NAME,
        "synchronous_commit": "off",
    }
