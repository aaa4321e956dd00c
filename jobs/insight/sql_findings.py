"""What a pending revision's SQL would hit on the live database: objects that already exist,
and NOT NULL on columns that hold NULLs. Each finding is ``{code, message, fix}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs.config import Target, redact
from jobs.project.scripts import Revision

Finding = dict[str, str]


def finding(code: str, message: str, fix: str) -> Finding:
    """One finding, its lines scrubbed of any password."""
    return {"code": code, "message": redact(message), "fix": redact(fix)}


# -- reading rendered SQL --------------------------------------------------------------------------

_ID = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_QID = rf"{_ID}(?:\s*\.\s*{_ID})?"
_IFNE = r"(IF\s+NOT\s+EXISTS\s+)?"
_KINDS = r"(TABLE|SEQUENCE|TYPE|(?:MATERIALIZED\s+)?VIEW)"
_CREATE = re.compile(rf"\bCREATE\s+(?:UNLOGGED\s+)?{_KINDS}\s+{_IFNE}({_QID})", re.I)
_CREATE_INDEX = re.compile(
    rf"\bCREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?{_IFNE}({_ID})\s+ON\s+(?:ONLY\s+)?"
    rf"({_QID})",
    re.I,
)
_DROP = re.compile(
    r"\bDROP\s+(TABLE|SEQUENCE|TYPE|INDEX|(?:MATERIALIZED\s+)?VIEW)\s+(?:CONCURRENTLY\s+)?"
    rf"(?:IF\s+EXISTS\s+)?({_QID}(?:\s*,\s*{_QID})*)",
    re.I,
)
_ALTER = re.compile(
    rf"\bALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?({_QID})\s+(.*?)(?:;|\Z)", re.I | re.S
)
_UPDATE = re.compile(
    rf"\bUPDATE\s+(?:ONLY\s+)?({_QID})\s+(?:(?:AS\s+)?(?!SET\b){_ID}\s+)?SET\s+(.*?)"
    r"(?:\bWHERE\b|\bFROM\b|\bRETURNING\b|;|\Z)",
    re.I | re.S,
)
_ADD_COLUMN = re.compile(
    rf"^ADD\s+(?:COLUMN\s+)?(?!(?:CONSTRAINT|PRIMARY|UNIQUE|CHECK|FOREIGN|EXCLUDE)\b){_IFNE}"
    rf"({_ID})(.*)$",
    re.I | re.S,
)
_SET_NOT_NULL = re.compile(rf"^ALTER\s+(?:COLUMN\s+)?({_ID})\s+SET\s+NOT\s+NULL\b", re.I)
_DROP_COLUMN = re.compile(
    rf"^DROP\s+(?:COLUMN\s+)?(?!CONSTRAINT\b)(?:IF\s+EXISTS\s+)?({_ID})", re.I
)
_RENAME_TABLE = re.compile(rf"^RENAME\s+TO\s+({_ID})", re.I)
_RENAME_COLUMN = re.compile(
    rf"^RENAME\s+(?:COLUMN\s+)?(?!TO\b|CONSTRAINT\b)({_ID})\s+TO\s+({_ID})", re.I
)
_ASSIGNED = re.compile(rf"^({_ID})\s*=", re.S)
_NOT_NULL = re.compile(r"\bNOT\s+NULL\b", re.I)
_FILLS_ITSELF = re.compile(r"\b(?:DEFAULT|GENERATED|(?:SMALL|BIG)?SERIAL)\b", re.I)


@dataclass(frozen=True)
class _Event:
    """One thing a revision's SQL does that the doctor cares about."""

    pos: int
    kind: str  # create, drop, add_column, drop_column, set_not_null, update
    what: str  # table, index, sequence, type, view, relation, column
    name: str  # the relation or type as written (maybe schema-qualified, maybe quoted)
    column: str = ""
    definition: str | None = None  # an added column's definition; None for a rename
    if_not_exists: bool = False


def _ident(raw: str) -> str:
    """An identifier as PostgreSQL stores it: unquoted, folded to lower case."""
    raw = raw.strip()
    if raw.startswith('"'):
        return raw[1:-1].replace('""', '"')
    return raw.lower()


def _parts(qualified: str) -> list[str]:
    return [p.group(0) for p in re.finditer(_ID, qualified)]


def _key(qualified: str) -> str:
    """A comparable name: ``public.T`` and ``t`` are the same object."""
    parts = [_ident(p) for p in _parts(qualified)]
    if len(parts) > 1 and parts[0] == "public":
        parts = parts[1:]
    return ".".join(parts)


def _sibling(table: str, name: str) -> str:
    """``name`` in the schema of ``table`` (an index or a renamed table lives there)."""
    parts = _parts(table)
    return f"{parts[0]}.{name}" if len(parts) > 1 else name


def _clauses(body: str) -> list[str]:
    """Split on commas outside parentheses and quotes."""
    out, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(body):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "," and depth == 0:
            out.append(body[start:i].strip())
            start = i + 1
    out.append(body[start:].strip())
    return [c for c in out if c]


def events(sql: str) -> list[_Event]:
    """What a rendered revision creates, drops, fills and constrains, in order."""
    found: list[_Event] = []
    for m in _CREATE.finditer(sql):
        what = m.group(1).split()[-1].lower()
        found.append(_Event(m.start(), "create", what, m.group(3), if_not_exists=bool(m.group(2))))
    for m in _CREATE_INDEX.finditer(sql):
        name = _sibling(m.group(3), m.group(2))
        found.append(_Event(m.start(), "create", "index", name, if_not_exists=bool(m.group(1))))
    for m in _DROP.finditer(sql):
        what = m.group(1).split()[-1].lower()
        for name in re.split(r"\s*,\s*", m.group(2)):
            found.append(_Event(m.start(), "drop", what, name))
    for m in _ALTER.finditer(sql):
        found += _alter_events(m.start(), m.group(1), m.group(2))
    for m in _UPDATE.finditer(sql):
        for clause in _clauses(m.group(2)):
            assigned = _ASSIGNED.match(clause)
            if assigned:
                found.append(_Event(m.start(), "update", "column", m.group(1), assigned.group(1)))
    return sorted(found, key=lambda e: e.pos)


def _alter_events(pos: int, table: str, body: str) -> list[_Event]:
    """The clauses of one ALTER TABLE that matter here."""
    found = []
    for offset, clause in enumerate(_clauses(body)):
        at = pos + offset  # keeps the clauses in order among the statement's events
        if m := _ADD_COLUMN.match(clause):
            ifne = bool(m.group(1))
            found.append(_Event(at, "add_column", "column", table, m.group(2), m.group(3), ifne))
        elif m := _SET_NOT_NULL.match(clause):
            found.append(_Event(at, "set_not_null", "column", table, m.group(1)))
        elif m := _DROP_COLUMN.match(clause):
            found.append(_Event(at, "drop_column", "column", table, m.group(1)))
        elif m := _RENAME_COLUMN.match(clause):
            found.append(_Event(at, "drop_column", "column", table, m.group(1)))
            found.append(_Event(at, "add_column", "column", table, m.group(2)))
        elif m := _RENAME_TABLE.match(clause):
            found.append(_Event(at, "drop", "table", table))
            found.append(_Event(at, "create", "relation", _sibling(table, m.group(1))))
    return found


# -- what the pending revisions do, against the live database ------------------------------------


@dataclass
class Plan:
    """What earlier pending SQL does: the live database does not show it yet."""

    touched: set[str] = field(default_factory=set)  # relations/types created or dropped
    added: dict[tuple[str, str], bool] = field(default_factory=dict)  # column -> fills itself
    dropped_columns: set[tuple[str, str]] = field(default_factory=set)
    filled: set[tuple[str, str]] = field(default_factory=set)  # columns an UPDATE sets

    def record(self, ev: _Event) -> None:
        col = (_key(ev.name), _ident(ev.column)) if ev.column else None
        if ev.kind in ("create", "drop"):
            self.touched.add(_key(ev.name))
        elif ev.kind == "add_column" and col and ev.definition is not None:
            self.added[col] = bool(_FILLS_ITSELF.search(ev.definition))
        elif ev.kind == "drop_column" and col:
            self.dropped_columns.add(col)
        elif ev.kind == "update" and col:
            self.filled.add(col)


def _scalar(conn: Connection, sql: str, **params: Any) -> Any:
    """One read; a statement that fails (a name Postgres rejects) reads as None."""
    try:
        return conn.execute(text(sql), params).scalar()
    except DBAPIError:
        conn.rollback()
        return None


def _live_relation(conn: Connection, name: str, plan: Plan) -> str | None:
    """The live relation ``name`` (as regclass text, safe to interpolate), unless earlier
    pending SQL creates or drops it."""
    if _key(name) in plan.touched:
        return None
    found = _scalar(conn, "SELECT to_regclass(:n)::text", n=name)
    return str(found) if found else None


def _live_column(conn: Connection, table: str, column: str, plan: Plan) -> bool:
    col = (_key(table), _ident(column))
    if col in plan.added or col in plan.dropped_columns:
        return False
    return bool(
        _live_relation(conn, table, plan)
        and _scalar(
            conn,
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(:t) "
            "AND attname = :c AND attnum > 0 AND NOT attisdropped)",
            t=table,
            c=_ident(column),
        )
    )


def _exists(conn: Connection, ev: _Event, plan: Plan) -> bool:
    """Whether what ``ev`` creates is already in the live database."""
    if ev.kind == "add_column":
        return _live_column(conn, ev.name, ev.column, plan)
    if _key(ev.name) in plan.touched:
        return False
    if ev.what == "type":
        return bool(_scalar(conn, "SELECT to_regtype(:n) IS NOT NULL", n=ev.name))
    return _live_relation(conn, ev.name, plan) is not None


def revision_findings(
    target: Target,
    conn: Connection,
    rev: Revision,
    sql: str,
    plan: Plan,
    previous: str | None,
) -> list[Finding]:
    """What one pending revision's SQL would hit: objects that already exist, NOT NULL on NULLs."""
    creates: list[_Event] = []
    existing: list[_Event] = []
    found: list[Finding] = []
    for ev in events(sql):
        if ev.kind in ("create", "add_column") and _key(ev.name) != target.version_table:
            creates.append(ev)
            if not ev.if_not_exists and _exists(conn, ev, plan):
                existing.append(ev)
        problem = _not_null_problem(conn, rev, ev, plan)
        if problem:
            found.append(problem)
        plan.record(ev)
    if existing:
        found.insert(0, _already_exists(target, rev, creates, existing, previous))
    return found


def _describe(ev: _Event) -> str:
    if ev.kind == "add_column":
        return f"column {ev.name}.{_ident(ev.column)}"
    return f"{ev.what} {ev.name}"


def _already_exists(
    target: Target,
    rev: Revision,
    creates: list[_Event],
    existing: list[_Event],
    previous: str | None,
) -> Finding:
    names = ", ".join(_describe(ev) for ev in existing)
    verb = "exists" if len(existing) == 1 else "exist"
    message = (
        f"pending revision {rev.id} creates {names}, which already {verb} "
        "(§8 error 2: relation already exists)"
    )
    stamp = f"`runbook stamp --target {target.name} {rev.id}`"
    if len(existing) < len(creates):
        fix = (
            f"{rev.id} would fail half-way: drop {names} if left over (after `runbook backup "
            f"--target {target.name}`), or create the rest by hand and {stamp}"
        )
    elif previous is None:
        fix = f"the schema already has all {rev.id} creates: check it matches, then {stamp}"
    else:
        fix = (
            f"the schema already has all {rev.id} creates: `runbook apply --target "
            f"{target.name} --to {previous}`, check it matches, then {stamp}"
        )
    return finding("already_exists", message, fix)


def _not_null_problem(conn: Connection, rev: Revision, ev: _Event, plan: Plan) -> Finding | None:
    """NOT NULL on a column that holds NULLs (or a new one on a table with rows)."""
    if ev.kind == "set_not_null":
        nulls = _nulls(conn, ev, plan)
        if nulls:
            table, column = ev.name, _ident(ev.column)
            return finding(
                "not_null_violation",
                f"pending revision {rev.id} sets {table}.{column} NOT NULL, but {nulls} rows "
                "hold NULL there (§8 error 3: NotNullViolation)",
                f"backfill first: `UPDATE {table} SET {column} = <value> WHERE {column} IS "
                f"NULL` before the alter_column in {rev.id} (or in a revision before it)",
            )
    if ev.kind == "add_column" and _adds_required_column(conn, ev, plan):
        table, column = ev.name, _ident(ev.column)
        return finding(
            "not_null_violation",
            f"pending revision {rev.id} adds {table}.{column} NOT NULL without a default, but "
            f"{table} has rows (§8 error 3: NotNullViolation)",
            f"add {column} nullable, backfill it, then set NOT NULL (or give it a server_default)",
        )
    return None


def _nulls(conn: Connection, ev: _Event, plan: Plan) -> int:
    """Rows that would hold NULL in ``ev``'s column when its SET NOT NULL runs."""
    col = (_key(ev.name), _ident(ev.column))
    if col in plan.filled:
        return 0  # an UPDATE earlier in the pending SQL backfills it
    table = _live_relation(conn, ev.name, plan)
    if table is None:
        return 0
    if col in plan.added:  # added by a pending revision: NULL in every row unless it fills
        return 0 if plan.added[col] else int(_scalar(conn, f"SELECT count(*) FROM {table}") or 0)
    if not _live_column(conn, ev.name, ev.column, plan):
        return 0
    quoted = conn.dialect.identifier_preparer.quote(_ident(ev.column))
    return int(_scalar(conn, f"SELECT count(*) FROM {table} WHERE {quoted} IS NULL") or 0)


def _adds_required_column(conn: Connection, ev: _Event, plan: Plan) -> bool:
    """An ADD COLUMN … NOT NULL with nothing to fill it, on a live table that has rows."""
    definition = ev.definition or ""
    if not _NOT_NULL.search(definition) or _FILLS_ITSELF.search(definition):
        return False
    table = _live_relation(conn, ev.name, plan)
    if table is None or _live_column(conn, ev.name, ev.column, plan):
        return False
    return bool(_scalar(conn, f"SELECT EXISTS (SELECT 1 FROM {table})"))
