"""Operator-written backfill SQL: names and fragments accepted as deparsed SQL, or refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pglast import ast, parse_sql

from jobs.backfill import sqlguard
from jobs.errors import RunbookError, UnsafeSql


def refused(call: Callable[..., object], *args: str) -> str:
    """The one-line message ``call(*args)`` is refused with."""
    with pytest.raises(UnsafeSql) as info:
        call(*args)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def one_update(sql: str) -> ast.UpdateStmt:
    """The single UPDATE ``sql`` parses to."""
    tree = parse_sql(sql)
    assert len(tree) == 1
    stmt = tree[0].stmt
    assert isinstance(stmt, ast.UpdateStmt)
    return stmt


def test_unsafe_sql_is_a_bad_input_error() -> None:
    assert issubclass(UnsafeSql, RunbookError)
    assert UnsafeSql.exit_code == 2


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("large_table", '"large_table"'),
        ("Large_Table", '"large_table"'),  # folded, as PostgreSQL folds an unquoted name
        ("public.large_table", '"public"."large_table"'),
        ("_t$1", '"_t$1"'),
        ("select", '"select"'),  # a keyword is harmless once quoted
        ("a" * 63, '"' + "a" * 63 + '"'),
    ],
)
def test_identifier_quotes_plain_names(name: str, quoted: str) -> None:
    assert sqlguard.identifier(name, "--table") == quoted


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("large_table; DROP", "not a plain name"),
        ('"quoted"', "not a plain name"),
        ("a.b.c", "too many dots"),
        ("1abc", "not a plain name"),
        ("a b", "not a plain name"),
        ("", "empty"),
        ("   ", "empty"),
        ("a" * 64, "longer than 63 bytes"),
        ("a.", "not a plain name"),
        (".a", "not a plain name"),
        ("$a", "not a plain name"),
        ("a-b", "not a plain name"),
        ("tablé", "not a plain name"),
        ("a\nb", "not a plain name"),
        ("a'b", "not a plain name"),
    ],
)
def test_identifier_refuses(name: str, problem: str) -> None:
    message = refused(sqlguard.table, name)
    assert problem in message
    assert message.startswith("--table")


def test_key_column_is_a_bare_name() -> None:
    assert sqlguard.key_column("ID") == '"id"'
    assert "too many dots" in refused(sqlguard.key_column, "t.id")


# -- accepted fragments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("new_column = 'default_value'", [('"new_column"', "'default_value'")]),
        ("a = b * 2, c = lower(d)", [('"a"', "b * 2"), ('"c"', "lower(d)")]),
        (
            "x = CASE WHEN y IS NULL THEN 0 ELSE y END",
            [('"x"', "CASE WHEN y IS NULL THEN 0 ELSE y END")],
        ),
        ("ts = now()", [('"ts"', "now()")]),
        ("Flag = DEFAULT", [('"flag"', "DEFAULT")]),
        ('"x" = 1', [('"x"', "1")]),  # quoting an ordinary name changes nothing
        ("n = nextval('seq')", [('"n"', "nextval('seq')")]),
        ("v = y[1] || '{1}'::text", [('"v"', "(y)[1] || CAST('{1}' AS text)")]),
        ('c = lower(d) COLLATE "C"', [('"c"', 'lower(d) COLLATE "C"')]),
        ("x = 'a;b--c/*d*/'", [('"x"', "'a;b--c/*d*/'")]),  # data inside a literal is data
    ],
)
def test_assignments_are_deparsed(text: str, expected: list[tuple[str, str]]) -> None:
    pairs = sqlguard.assignments(text)
    assert pairs == expected
    stmt = one_update(f"UPDATE large_table SET {sqlguard.render(pairs)}")
    assert [t.name for t in stmt.targetList or ()] == [c.strip('"') for c, _ in pairs]
    assert stmt.whereClause is None and stmt.fromClause is None
    assert sqlguard.assignments(sqlguard.render(pairs)) == pairs  # stable


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("new_column IS NULL", "new_column IS NULL"),
        ("status IN ('a','b') AND id % 2 = 0", "status IN ('a', 'b') AND id % 2 = 0"),
        ("(a > 1 OR b < 2) AND c IS NOT NULL", "(a > 1 OR b < 2) AND c IS NOT NULL"),
        ("created_at < now() - interval '1 day'", "created_at < now() - CAST('1 day' AS interval)"),
    ],
)
def test_predicate_is_deparsed(text: str, expected: str) -> None:
    condition = sqlguard.predicate(text)
    assert condition == expected
    stmt = parse_sql(f"SELECT 1 FROM t WHERE ({condition})")
    assert len(stmt) == 1
    assert sqlguard.predicate(condition) == condition


def test_dollar_quoted_string_stays_one_literal() -> None:
    [(column, expr)] = sqlguard.assignments("x = $$it's; DROP TABLE t; --$$")
    assert expr == "'it''s; DROP TABLE t; --'"
    stmt = one_update(f"UPDATE t SET {column} = {expr}")
    value = (stmt.targetList or ())[0].val
    assert isinstance(value, ast.A_Const)
    assert value.val.sval == "it's; DROP TABLE t; --"  # type: ignore[union-attr]


def test_escape_string_quote_stays_inside_its_literal() -> None:
    [(column, expr)] = sqlguard.assignments("x = E'\\x27; DROP TABLE t; --'")
    assert expr == "'''; DROP TABLE t; --'"
    value = (one_update(f"UPDATE t SET {column} = {expr}").targetList or ())[0].val
    assert value.val.sval == "'; DROP TABLE t; --"


# -- refused fragments ------------------------------------------------------------------------

SET_ATTACKS = [
    ("x = 1; DROP TABLE t", "';'"),
    ("x = 1 -- comment", "comment"),
    ("x = 1 /* c */", "comment"),
    ("x = (SELECT password FROM users LIMIT 1)", "sub-query"),
    ("x = ARRAY(SELECT id FROM users)", "sub-query"),
    ("x = pg_sleep(10)", "pg_sleep()"),
    ("x = pg_catalog.pg_sleep(10)", "pg_sleep()"),
    ("x = set_config('x','y',false)", "set_config()"),
    ("x = pg_read_file('/etc/passwd')", "pg_read_file()"),
    ("x = dblink_exec('db', 'DROP TABLE t')", "dblink_exec()"),
    ("x = pg_advisory_lock(1)", "pg_advisory_lock()"),
    ("x = query_to_xml('DELETE FROM t', true, true, '')", "query_to_xml()"),
    ("x = txid_current()", "txid_current()"),
    ("x = 1 WHERE true", "WHERE"),
    ("x = 1 FROM other", "FROM"),
    ("x = 1 RETURNING *", "RETURNING"),
    ('"X" = 1', "needs quotes"),
    ("x[1] = 2", "part of column"),
    ("x.f = 2", "part of column"),
    ("(a, b) = (1, 2)", "multi-column"),
    ("x = 1, x = 2", "twice"),
    ("x = other.y", "qualified column"),
    ("x = (y).f", "field"),
    ("x = count(*)", "aggregate"),
    ("x = row_number() OVER ()", "window function"),
    ("x = $1", "parameter"),
    ("x = E'\\\\'", "backslash"),
    ("x = 1 UNION SELECT 1", "not valid SQL"),
    ("x = 'unterminated", "not valid SQL"),
    ("x = 1\x00; DROP TABLE t", "control character"),
    ("", "empty"),
    ("  \n ", "empty"),
    ("x = '" + "a" * 4096 + "'", "longer than 4096 bytes"),
]


@pytest.mark.parametrize(("text", "problem"), SET_ATTACKS)
def test_set_attacks_are_refused(text: str, problem: str) -> None:
    message = refused(sqlguard.assignments, text)
    assert message.startswith("--set ")
    assert problem in message


WHERE_ATTACKS = [
    ("true) OR (1=1", "parenthesis"),
    ("(true", "parenthesis"),
    ("1=1; DELETE FROM t", "';'"),
    ("true -- AND id < 10", "comment"),
    ("id IN (SELECT id FROM t)", "sub-query"),
    ("EXISTS (SELECT 1 FROM t)", "sub-query"),
    ("true UNION SELECT 1", "UNION"),
    ("true LIMIT 1", "LIMIT"),
    ("true OFFSET 1", "OFFSET"),
    ("true GROUP BY 1", "GROUP BY"),
    ("true ORDER BY 1", "ORDER BY"),
    ("true FOR UPDATE", "FOR UPDATE"),
    ("true WINDOW w AS ()", "WINDOW"),
    ("pg_sleep(1) IS NULL", "pg_sleep()"),
    ("x = DEFAULT", "DEFAULT"),
    ("id > 3 AND", "not valid SQL"),
    ("", "empty"),
]


@pytest.mark.parametrize(("text", "problem"), WHERE_ATTACKS)
def test_where_attacks_are_refused(text: str, problem: str) -> None:
    message = refused(sqlguard.predicate, text)
    assert message.startswith("--where ")
    assert problem in message


def test_size_limit_is_in_bytes() -> None:
    fits = "x = '" + "a" * (sqlguard.MAX_FRAGMENT_BYTES - 6) + "'"
    assert sqlguard.assignments(fits)
    wide = "x = '" + "é" * (sqlguard.MAX_FRAGMENT_BYTES // 2) + "'"
    assert "longer than" in refused(sqlguard.assignments, wide)


def test_deny_list() -> None:
    for name in ("pg_sleep", "PG_SLEEP", "lo_import", "lo_export", "pg_ls_dir", "setval"):
        assert sqlguard.denied(name)
    for name in ("pg_terminate_backend", "pg_cancel_backend", "pg_current_xact_id"):
        assert sqlguard.denied(name)
    for name in ("lower", "now", "nextval", "coalesce", "current_setting", "long_fn"):
        assert not sqlguard.denied(name)


# -- the batch statement ----------------------------------------------------------------------


def test_batch_update_walks_the_key_and_keeps_percent_literal() -> None:
    sql = sqlguard.batch_update("Large_Table", "id", "x = '50%(lo)s'", "id % 2 = 0")
    assert sql == (
        'UPDATE "large_table" SET "x" = \'50%%(lo)s\' '
        'WHERE "id" > %(lo)s AND "id" <= %(hi)s AND (id %% 2 = 0)'
    )
    stmt = one_update(sql % {"lo": 10, "hi": 20})  # psycopg2 substitutes like Python's %
    value = (stmt.targetList or ())[0].val
    assert value.val.sval == "50%(lo)s"


def test_batch_update_without_where() -> None:
    sql = sqlguard.batch_update("s.t", "id", "new_column = 'default_value'")
    assert sql.endswith('WHERE "id" > %(lo)s AND "id" <= %(hi)s')
    assert sql.startswith('UPDATE "s"."t" SET "new_column" = ')


def test_batch_update_refuses_to_change_the_key() -> None:
    assert "key column" in refused(sqlguard.batch_update, "t", "ID", "id = id + 1")
