"""Rendered migration SQL split into statements and read with pglast: the tables each touches,
which run outside a transaction, and which are Alembic's own bookkeeping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pglast import ast, enums, parse_plpgsql, parse_sql
from pglast.parser import ParseError, split
from pglast.visitors import Visitor

_LEADING_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.S)
_TXN_START = re.compile(r"(?:BEGIN|START\s+TRANSACTION)\b", re.I)
_TXN_END = re.compile(r"(?:COMMIT|END|ROLLBACK|ABORT)\b", re.I)
_NO_TXN = re.compile(
    r"\b(?:CREATE|DROP)\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\b"
    r"|\AALTER\s+TYPE\b.*\bADD\s+VALUE\b"
    r"|\AVACUUM\b"
    r"|\AREINDEX\b.*\bCONCURRENTLY\b"
    r"|\bDETACH\s+PARTITION\b.*\bCONCURRENTLY\b",
    re.I | re.S,
)


# -- statements -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """One statement of a SQL script: its span (``;`` excluded) and its text sans comments."""

    start: int
    end: int
    text: str


def _slices(sql: str) -> tuple[slice, ...]:
    """Statement spans from pglast's parser, else its scanner (tolerates syntax errors)."""
    try:
        return tuple(split(sql, with_parser=True, only_slices=True))
    except ParseError:
        pass
    try:
        return tuple(split(sql, with_parser=False, only_slices=True))
    except Exception:
        return ()


def strip_comments(sql: str) -> str:
    """``sql`` without its leading comments and whitespace."""
    return _LEADING_COMMENTS.sub("", sql, count=1).strip()


def statements(sql: str) -> list[Statement]:
    """The statements of ``sql`` in order, comment-only pieces dropped."""
    found = []
    for s in _slices(sql):
        body = strip_comments(sql[s])
        if body:
            found.append(Statement(start=s.start or 0, end=s.stop or len(sql), text=body))
    return found


# -- tables -----------------------------------------------------------------------------------


class _Relations(Visitor):
    """Collects RangeVars, dropped tables and CTE names from a parse tree."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str | None, str]] = []
        self.ctes: set[str] = set()
        self.bodies: list[str] = []

    def visit_RangeVar(self, _ancestors: Any, node: ast.RangeVar) -> None:
        if node.relname:
            self.found.append((node.schemaname or None, node.relname))

    def visit_CommonTableExpr(self, _ancestors: Any, node: ast.CommonTableExpr) -> None:
        if node.ctename:
            self.ctes.add(node.ctename)

    def visit_DropStmt(self, _ancestors: Any, node: ast.DropStmt) -> None:
        if node.removeType == enums.ObjectType.OBJECT_TABLE:
            for names in node.objects or ():
                parts = [n.sval for n in names]
                self.found.append((parts[-2] if len(parts) > 1 else None, parts[-1]))

    def visit_DoStmt(self, _ancestors: Any, node: ast.DoStmt) -> None:
        for arg in node.args or ():
            if arg.defname == "as":
                self.bodies.append(arg.arg.sval)


def _plpgsql_queries(body: str) -> list[str]:
    """The SQL inside a PL/pgSQL ``DO`` body (dynamic EXECUTE strings cannot be known)."""
    wrapped = f"CREATE FUNCTION runbook_do() RETURNS void LANGUAGE plpgsql AS $rb$\n{body}\n$rb$"
    try:
        tree = parse_plpgsql(wrapped)
    except Exception:
        return []
    queries: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "query" and isinstance(value, str):
                    queries.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(tree)
    return queries


def _relations(sql: str, depth: int = 0) -> list[tuple[str | None, str]]:
    """(schema, name) of every relation ``sql`` names, CTEs excluded; [] when unparseable."""
    try:
        tree = parse_sql(sql)
    except ParseError:
        if depth == 0:
            return []
        try:
            tree = parse_sql(f"SELECT {sql}")  # a PL/pgSQL expression
        except ParseError:
            return []
    visitor = _Relations()
    for raw in tree:
        if raw.stmt is not None:
            visitor(raw.stmt)
    found = [r for r in visitor.found if r[0] is not None or r[1] not in visitor.ctes]
    if depth == 0:
        for body in visitor.bodies:
            for query in _plpgsql_queries(body):
                found.extend(_relations(query, depth + 1))
    return found


def tables_in(sql: str) -> list[str]:
    """Tables ``sql`` touches, in order of first mention, as ``name`` or ``schema.name``."""
    names: dict[str, None] = {}
    for stmt in statements(sql):
        for schema, name in _relations(stmt.text):
            names[f"{schema}.{name}" if schema else name] = None
    return list(names)


def is_bookkeeping(stmt: Statement, version_table: str) -> bool:
    """True for Alembic's own statements on its version table."""
    if version_table not in stmt.text:
        return False
    rels = _relations(stmt.text)
    return bool(rels) and all(name == version_table for _schema, name in rels)


# -- transactions -----------------------------------------------------------------------------


def outside_transaction(sql: str) -> bool:
    """True when some of ``sql`` runs outside a transaction: a statement between Alembic's
    ``COMMIT;`` and ``BEGIN;`` (an ``autocommit_block``), or one that cannot run inside one."""
    stmts = [s.text for s in statements(sql)]
    if any(_NO_TXN.search(s) for s in stmts):
        return True
    if not any(_TXN_START.match(s) for s in stmts):
        return False  # no framing rendered: nothing to tell
    in_txn = False
    for s in stmts:
        if _TXN_START.match(s):
            in_txn = True
        elif _TXN_END.match(s):
            in_txn = False
        elif not in_txn:
            return True
    return False
