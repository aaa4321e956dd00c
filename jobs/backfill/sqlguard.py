"""Operator-written SQL for a backfill, checked before it reaches the target.

``runbook backfill --table T --key K --set "col = expr" --where "cond"`` takes two names and
two SQL fragments from a person (or a CI variable). The engine pastes them into one UPDATE per
batch, so this module makes sure each is exactly what it claims to be:

* **Names** (``--table``, ``--key``) are ordinary identifiers only: ASCII letters, digits,
  ``_`` and ``$``, not starting with a digit or ``$``, at most 63 bytes a part, ``schema.name``
  at most. They are folded to lower case, as PostgreSQL folds an unquoted name, then quoted:
  ``Large_Table`` means ``"large_table"``, as in psql. Quotes, spaces, ``;`` are refused.
* **Fragments** are scanned, then parsed, with PostgreSQL's own scanner and parser (pglast):

  - refused outright: an empty fragment, one over ``MAX_FRAGMENT_BYTES``, a control character
    (a NUL would hide the rest from the parser), any comment (``--``, ``/* */``), a ``;``
    token, a parenthesis closed before it was opened (``true) OR (1=1``);
  - ``--set`` is parsed as ``UPDATE _t SET <fragment>`` and ``--where`` as
    ``SELECT 1 FROM _t WHERE <fragment>``; the tree must be exactly that statement with only
    the fragment's part filled in, so a smuggled ``FROM``, ``WHERE``, ``RETURNING``,
    ``GROUP BY``, ``LIMIT``, ``UNION`` … is named and refused;
  - every node of each expression must be of a plain-expression kind (operators, constants,
    bare column names, function calls, casts, ``CASE``, ``COALESCE``, ``IN (list)``, array
    subscripts …). Refused: sub-queries of every form (``(SELECT …)``, ``EXISTS``,
    ``IN (SELECT …)``, ``ARRAY(SELECT …)``) and hence any CTE, aggregates and window
    functions, ``$1`` parameters, multi-column ``(a, b) = …``, qualified ``t.col`` and field
    selection ``(c).f``, and calls to ``DENIED_FUNCTIONS`` / ``DENIED_PREFIXES``.
* **What runs is what was checked.** The result is the fragment *deparsed* from its tree, not
  the operator's text; it is parsed again, re-checked, and must deparse to itself.

Decisions:

* Column names must be what an unquoted name folds to; ``"x"`` is accepted as ``x``, while a
  name that needs quotes (``"X"``, ``"a b"``) is refused, as ``identifier`` refuses it.
  Quoted names elsewhere (``COLLATE "C"``) are fine: the deparser quotes them again.
* ``EXISTS (SELECT …)`` and every other sub-query are refused: a backfill's value and filter
  come from the row itself. A cross-table update belongs in a migration.
* ``nextval`` is allowed (filling a new column from a sequence is an ordinary backfill; a
  retried batch only leaves gaps); ``setval`` is denied.
* Dollar-quoted and ``E''`` strings are allowed: the parser decodes them and the deparser
  writes a standard ``'…'`` literal, so ``$$'; DROP TABLE t; --$$`` stays one string. A string
  whose value holds a backslash is refused, since ``'a\\'`` would read differently under
  ``standard_conforming_strings = off``; write ``chr(92)`` instead.
* User-defined functions are allowed and cannot be looked into: they run with the target's
  privileges, like the migrations that created them. ``statement_timeout`` bounds the rest.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from pglast import ast, parse_sql
from pglast.parser import ParseError, scan
from pglast.stream import RawStream

from jobs.errors import UnsafeSql

MAX_FRAGMENT_BYTES = 4096
MAX_NAME_BYTES = 63  # NAMEDATALEN - 1

# Functions a backfill has no business calling: they sleep, read or write server files or
# large objects, reach other servers, signal backends, change settings or sequences, take
# advisory locks, expose transaction ids, or run SQL given as a string.
DENIED_FUNCTIONS = frozenset(
    {
        "pg_sleep",
        "pg_sleep_for",
        "pg_sleep_until",
        "pg_stat_file",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_promote",
        "pg_notify",
        "pg_export_snapshot",
        "pg_import_system_collations",
        "pg_log_backend_memory_contexts",
        "pg_switch_wal",
        "pg_backup_start",
        "pg_backup_stop",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_truncate_visibility_map",
        "pg_current_xact_id",
        "pg_current_xact_id_if_assigned",
        "set_config",
        "setval",
        "loread",
        "lowrite",
        "ts_stat",
        "ts_rewrite",
    }
)
DENIED_PREFIXES = (
    "dblink",
    "lo_",
    "pg_advisory_",
    "pg_try_advisory_",
    "txid_",
    "pg_read_",
    "pg_ls_",
    "pg_file_",
    "pg_stat_reset",
    "pg_stat_statements_reset",
    "pg_replication_",
    "pg_logical_",
    "pg_create_",
    "pg_drop_",
    "pg_copy_",
    "pg_wal_",
    "pg_xlog_",
    "query_to_xml",
    "cursor_to_xml",
    "table_to_xml",
    "schema_to_xml",
    "database_to_xml",
)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")
_FOLDED = re.compile(r"[a-z_][a-z0-9_$]*\Z")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_AT_INDEX = re.compile(r",? at index \d+")

# Expression nodes a fragment may be built of; anything else is refused by name.
_EXPRESSION_NODES = frozenset(
    {
        "A_Expr",
        "A_Const",
        "Integer",
        "Float",
        "Boolean",
        "String",
        "BitString",
        "ColumnRef",
        "FuncCall",
        "NamedArgExpr",
        "TypeCast",
        "TypeName",
        "CollateClause",
        "CaseExpr",
        "CaseWhen",
        "BoolExpr",
        "NullTest",
        "BooleanTest",
        "CoalesceExpr",
        "MinMaxExpr",
        "SQLValueFunction",
        "A_ArrayExpr",
        "A_Indirection",
        "A_Indices",
        "RowExpr",
    }
)
_NODE_WORDS = {
    "SubLink": "a sub-query (SELECT, EXISTS, IN (SELECT …))",
    "SelectStmt": "a sub-query",
    "WithClause": "a WITH query",
    "CommonTableExpr": "a WITH query",
    "ParamRef": "a parameter ($1)",
    "WindowDef": "a window function (OVER)",
    "GroupingFunc": "GROUPING()",
    "MultiAssignRef": "a multi-column assignment (a, b) = …",
    "A_Star": "*",
    "SetToDefault": "DEFAULT",
}
_CLAUSE_WORDS = {
    "op": "UNION/INTERSECT/EXCEPT",
    "withClause": "WITH",
    "fromClause": "FROM",
    "whereClause": "WHERE",
    "returningClause": "RETURNING",
    "returningList": "RETURNING",
    "groupClause": "GROUP BY",
    "havingClause": "HAVING",
    "windowClause": "WINDOW",
    "sortClause": "ORDER BY",
    "limitCount": "LIMIT",
    "limitOffset": "OFFSET",
    "lockingClause": "FOR UPDATE/SHARE",
    "distinctClause": "DISTINCT",
    "intoClause": "INTO",
    "valuesLists": "VALUES",
}
_SET_PREFIX = "UPDATE _t SET "
_WHERE_PREFIX = "SELECT 1 FROM _t WHERE "


# -- names ------------------------------------------------------------------------------------


def _show(text: str, limit: int = 60) -> str:
    """``text`` on one line, shortened for a message."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _name_part(part: str, name: str, what: str) -> str:
    """One part of a name, folded to lower case, or UnsafeSql."""
    if not _NAME.match(part):
        raise UnsafeSql(
            f"{what} {_show(name)!r} is not a plain name: use letters, digits, _ and $, "
            "not starting with a digit (no quotes, spaces or ;)"
        )
    if len(part.encode()) > MAX_NAME_BYTES:
        raise UnsafeSql(f"{what} {_show(name)!r} is longer than {MAX_NAME_BYTES} bytes")
    return part.lower()


def identifier(name: str, what: str, *, qualified: bool = True) -> str:
    """``name`` or ``schema.name``, checked, folded like an unquoted name, and quoted."""
    if not name or not name.strip():
        raise UnsafeSql(f"{what} is empty: give a plain name like large_table")
    parts = name.split(".")
    if len(parts) > (2 if qualified else 1):
        allowed = "name or schema.name" if qualified else "a bare name, no schema"
        raise UnsafeSql(f"{what} {_show(name)!r} has too many dots: give {allowed}")
    return ".".join(f'"{_name_part(part, name, what)}"' for part in parts)


def table(name: str) -> str:
    """The backfill's table, ``name`` or ``schema.name``, quoted."""
    return identifier(name, "--table")


def key_column(name: str) -> str:
    """The backfill's key column (a bare name), quoted."""
    return identifier(name, "--key", qualified=False)


# -- scanning ---------------------------------------------------------------------------------


def _syntax(exc: ParseError) -> str:
    """pglast's error without its index (which counts from our wrapper, not the fragment)."""
    return _AT_INDEX.sub("", str(exc).splitlines()[0] if str(exc) else "syntax error")


def _check_size(text: str, what: str) -> None:
    """Refuse a fragment over ``MAX_FRAGMENT_BYTES`` (the operator's text, not our rendering)."""
    if len(text.encode()) > MAX_FRAGMENT_BYTES:
        raise UnsafeSql(f"{what} is longer than {MAX_FRAGMENT_BYTES} bytes: shorten it")


def _check_text(text: str, what: str) -> None:
    """Refuse an empty or control-character fragment."""
    if not text or not text.strip():
        raise UnsafeSql(f"{what} is empty: give a SQL expression")
    if _CONTROL.search(text):
        raise UnsafeSql(f"{what} contains a control character: type it as plain text")


def _check_tokens(text: str, what: str) -> None:
    """Refuse comments, ``;`` and unbalanced parentheses, as PostgreSQL's scanner sees them."""
    try:
        tokens = scan(text)
    except ParseError as exc:
        raise UnsafeSql(f"{what} is not valid SQL: {_syntax(exc)}") from None
    depth = 0
    for token in tokens:
        if token.name in ("SQL_COMMENT", "C_COMMENT"):
            raise UnsafeSql(f"{what} contains an SQL comment (-- or /* */): remove it")
        if token.name == "ASCII_59":
            raise UnsafeSql(f"{what} contains ';': give one expression, not statements")
        depth += {"ASCII_40": 1, "ASCII_41": -1}.get(token.name, 0)
        if depth < 0:
            raise UnsafeSql(f"{what} closes a parenthesis it never opened: balance them")
    if depth:
        raise UnsafeSql(f"{what} leaves a parenthesis open: balance them")


def _parse_one(sql: str, what: str) -> Any:
    """The single statement ``sql`` parses to, or UnsafeSql."""
    try:
        tree = parse_sql(sql)
    except ParseError as exc:
        raise UnsafeSql(f"{what} is not valid SQL: {_syntax(exc)}") from None
    if len(tree) != 1:
        raise UnsafeSql(f"{what} makes more than one statement: give one expression")
    return tree[0].stmt


# -- shape ------------------------------------------------------------------------------------


def _extra_clause(stmt: Any, skeleton: Any) -> str:
    """The SQL word for the first clause where ``stmt`` differs from ``skeleton``."""
    for slot in _CLAUSE_WORDS:
        if slot in type(stmt).__slots__ and getattr(stmt, slot) != getattr(skeleton, slot):
            return _CLAUSE_WORDS[slot]
    return "another clause"


def _only_part(stmt: Any, prefix: str, slot: str, what: str) -> Any:
    """``stmt``'s ``slot``, provided the rest of ``stmt`` is exactly ``prefix``'s skeleton."""
    skeleton = _parse_one(prefix + ("_c = NULL" if slot == "targetList" else "true"), what)
    if type(stmt) is not type(skeleton):
        raise UnsafeSql(f"{what} adds SQL around the expression: give the expression only")
    part = getattr(stmt, slot)
    setattr(stmt, slot, getattr(skeleton, slot))
    same = stmt == skeleton and part is not None
    setattr(stmt, slot, part)
    if not same:
        clause = _extra_clause(stmt, skeleton)
        raise UnsafeSql(f"{what} adds {clause} to the expression: give the expression only")
    return part


# -- expressions ------------------------------------------------------------------------------


def _nodes(value: Any) -> Iterator[ast.Node]:
    """Every node under ``value``, parents first."""
    if isinstance(value, tuple | list):
        for item in value:
            yield from _nodes(item)
    elif isinstance(value, ast.Node):
        yield value
        for slot in value:
            yield from _nodes(getattr(value, slot))


def denied(funcname: str) -> bool:
    """True for a function a fragment may not call (``DENIED_FUNCTIONS`` and prefixes)."""
    name = funcname.lower()
    return name in DENIED_FUNCTIONS or name.startswith(DENIED_PREFIXES)


def _check_call(node: ast.FuncCall, what: str) -> None:
    """Refuse denied functions, aggregates and window functions."""
    name = _show(str((node.funcname or ())[-1].sval))
    if denied(name):
        raise UnsafeSql(f"{what} calls {name}(), which a backfill may not call")
    if node.over is not None:
        raise UnsafeSql(f"{what} uses a window function ({name} … OVER): not allowed")
    if node.agg_star or node.agg_distinct or node.agg_order or node.agg_filter:
        raise UnsafeSql(f"{what} uses an aggregate ({name}): not allowed in a backfill")


def _check_column(node: ast.ColumnRef, what: str) -> None:
    """Refuse qualified or oddly quoted column references."""
    fields = node.fields or ()
    if len(fields) != 1 or not isinstance(fields[0], ast.String):
        raise UnsafeSql(f"{what} uses a qualified column name: refer to columns by bare name")
    _check_folded(str(fields[0].sval), what)


def _check_folded(name: str, what: str) -> None:
    """Refuse a column name that would need quotes (upper case, spaces, …) or is too long."""
    if not _FOLDED.match(name):
        raise UnsafeSql(f"{what} names column {_show(name)!r}, which needs quotes: not supported")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise UnsafeSql(f"{what} names a column longer than {MAX_NAME_BYTES} bytes")


def _check_literal(node: ast.A_Const, what: str) -> None:
    """Refuse a string constant whose meaning depends on ``standard_conforming_strings``."""
    if isinstance(node.val, ast.String) and "\\" in str(node.val.sval):
        raise UnsafeSql(f"{what} has a backslash in a string: write chr(92) instead")


def _check_indirection(node: ast.A_Indirection, what: str) -> None:
    """Refuse field selection; array subscripts are fine."""
    if not all(isinstance(i, ast.A_Indices) for i in node.indirection or ()):
        raise UnsafeSql(f"{what} selects a field with (…).name: not allowed")


def _check_node(node: ast.Node, what: str) -> None:
    """Refuse one node that is not part of a plain expression."""
    kind = type(node).__name__
    if kind not in _EXPRESSION_NODES:
        word = _NODE_WORDS.get(kind, kind)
        raise UnsafeSql(f"{what} uses {word}, which is not allowed in a backfill")
    if isinstance(node, ast.FuncCall):
        _check_call(node, what)
    elif isinstance(node, ast.ColumnRef):
        _check_column(node, what)
    elif isinstance(node, ast.A_Indirection):
        _check_indirection(node, what)
    elif isinstance(node, ast.A_Const):
        _check_literal(node, what)


def _check_expression(expr: Any, what: str, *, default: bool = False) -> str:
    """``expr`` checked node by node and deparsed; a bare DEFAULT only when ``default``."""
    if default and isinstance(expr, ast.SetToDefault):
        return "DEFAULT"
    for node in _nodes(expr):
        _check_node(node, what)
    return str(RawStream()(expr))


# -- fragments --------------------------------------------------------------------------------


def _target(res: ast.ResTarget, what: str) -> str:
    """The quoted column a SET item assigns."""
    if res.indirection:
        raise UnsafeSql(
            f"{what} assigns to part of column {_show(str(res.name))} ([…] or .field): not allowed"
        )
    if isinstance(res.val, ast.MultiAssignRef):
        raise UnsafeSql(f"{what} uses a multi-column assignment (a, b) = …: assign one by one")
    _check_folded(str(res.name), what)
    return f'"{res.name}"'


def _assignments_once(text: str, what: str) -> list[tuple[str, str]]:
    """One pass of ``assignments``: check and deparse."""
    _check_text(text, what)
    _check_tokens(text, what)
    stmt = _parse_one(_SET_PREFIX + text, what)
    pairs: list[tuple[str, str]] = []
    for res in _only_part(stmt, _SET_PREFIX, "targetList", what):
        column = _target(res, what)
        if any(column == seen for seen, _ in pairs):
            raise UnsafeSql(f"{what} assigns {column} twice: assign each column once")
        pairs.append((column, _check_expression(res.val, what, default=True)))
    return pairs


def render(pairs: list[tuple[str, str]]) -> str:
    """Checked assignments as the SET list of an UPDATE."""
    return ", ".join(f"{column} = {expr}" for column, expr in pairs)


def assignments(text: str, what: str = "--set") -> list[tuple[str, str]]:
    """``col = expr[, …]`` checked: (quoted column, deparsed expression) pairs, in order."""
    _check_size(text, what)
    pairs = _assignments_once(text, what)
    if _assignments_once(render(pairs), what) != pairs:
        raise UnsafeSql(f"{what} does not render back to the same SQL: simplify it")
    return pairs


def assignments_of(fragments: str | Sequence[str], what: str = "--set") -> list[tuple[str, str]]:
    """Several ``--set`` fragments (each ``col = expr[, …]``), each checked alone and then
    together, so that a column assigned in two of them is refused like one assigned twice."""
    parts = [fragments] if isinstance(fragments, str) else list(fragments)
    if not parts:
        raise UnsafeSql(f"{what} is missing: give at least one assignment, e.g. \"col = 'v'\"")
    pairs = [pair for part in parts for pair in assignments(part, what)]
    return assignments(render(pairs), what)


def _predicate_once(text: str, what: str) -> str:
    """One pass of ``predicate``: check and deparse."""
    _check_text(text, what)
    _check_tokens(text, what)
    stmt = _parse_one(_WHERE_PREFIX + text, what)
    return _check_expression(_only_part(stmt, _WHERE_PREFIX, "whereClause", what), what)


def predicate(text: str, what: str = "--where") -> str:
    """A WHERE condition checked and deparsed (without the WHERE)."""
    _check_size(text, what)
    condition = _predicate_once(text, what)
    if _predicate_once(condition, what) != condition:
        raise UnsafeSql(f"{what} does not render back to the same SQL: simplify it")
    return condition


# -- the batch statement ----------------------------------------------------------------------


def batch_update(table_name: str, key: str, set_text: str, where_text: str | None = None) -> str:
    """One batch's UPDATE, for psycopg2 (``%(lo)s``/``%(hi)s``; ``%`` doubled elsewhere).

    Run it with ``conn.exec_driver_sql(sql, {"lo": lo, "hi": hi})``; not with ``text()``,
    which would read ``:word`` inside the fragments' string literals as bind parameters.
    """
    relation, column = table(table_name), key_column(key)
    pairs = assignments(set_text)
    if any(target == column for target, _ in pairs):
        raise UnsafeSql(f"--set assigns the key column {column}: a backfill cannot change it")
    where = f" AND ({_percents(predicate(where_text))})" if where_text is not None else ""
    window = f"{column} > %(lo)s AND {column} <= %(hi)s"
    return f"UPDATE {relation} SET {_percents(render(pairs))} WHERE {window}{where}"


def _percents(sql: str) -> str:
    """``sql`` with ``%`` doubled, so psycopg2 reads it as itself and not as a placeholder."""
    return sql.replace("%", "%%")
