"""The doctor: the runbook's §8 troubleshooting, automated, without changing the database.

Each finding is ``{code, message, fix}``, one line each: what is wrong and what to do. The
history is checked against ``alembic_version`` (§8 errors 1 and 4), and every pending
revision is rendered offline (Alembic's ``--sql`` mode) and its SQL read for what would fail
on the live database: objects that already exist (§8 error 2) and NOT NULL on columns that
hold NULLs (§8 error 3). Scratch databases and partial dumps that killed runs left behind
are listed too (jobs/leftovers.py).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs import ledger, leftovers, verify
from jobs.config import Target, redact
from jobs.errors import ProjectError, RevisionError
from jobs.migrate import Project, Revision, describe

Finding = dict[str, str]


def finding(code: str, message: str, fix: str) -> Finding:
    """One finding, its lines scrubbed of any password."""
    return {"code": code, "message": redact(message), "fix": redact(fix)}


def diagnose(target: Target, conn: Connection) -> list[Finding]:
    """What stands between ``target`` and a clean ``runbook apply``; [] when nothing does.

    ``conn`` must not be in a transaction; only reads are run on it, and none is left open.
    """
    project, script, problem = _load(target)
    findings = [problem] if problem else []
    try:
        rows = version_rows(conn, target.version_table)
        history = _history_findings(target, conn, script, rows)
        findings += history
        if project is not None and not history:
            current = _resolve(script, rows[0]) if rows else None
            findings += _pending_findings(target, conn, project, current)
    except DBAPIError as exc:
        findings.append(
            finding(
                "unreadable",
                f"cannot read {target.version_table} ({describe(exc)})",
                "connect as the role that owns the schema",
            )
        )
    finally:
        if not conn.closed and conn.in_transaction():
            conn.rollback()
    return findings + leftover_findings(target, conn)


# -- the project and its history ---------------------------------------------------------------


def _load(target: Target) -> tuple[Project | None, ScriptDirectory | None, Finding | None]:
    """The project, its script directory, and a finding when the project cannot be used."""
    try:
        project = Project(target)
        return project, project.script, None
    except ProjectError as exc:
        script = _script_directory(target)
        heads = sorted(script.get_heads()) if script is not None else []
        if len(heads) > 1:
            return None, script, _several_heads(target, heads)
        fix = "fix the Alembic project (alembic.ini, script_location, revision files)"
        return None, script, finding("project", str(exc), f"{fix}, then run the doctor again")


def _script_directory(target: Target) -> ScriptDirectory | None:
    """The project's scripts as far as they load, without Project's single-head rule."""
    try:
        script = ScriptDirectory.from_config(Config(str(target.alembic_ini)))
        script.get_heads()
        return script
    except Exception:
        return None


def _several_heads(target: Target, heads: list[str]) -> Finding:
    return finding(
        "several_heads",
        f"the scripts have {len(heads)} heads ({', '.join(heads)}): runbook applies one linear "
        "history, so pending revisions were not checked",
        f'`alembic merge heads -m "merge heads"`, then `runbook apply --target {target.name}`',
    )


def version_rows(conn: Connection, version_table: str) -> list[str]:
    """The revisions ``alembic_version`` holds ([] when it is empty or missing)."""
    table = conn.dialect.identifier_preparer.quote(version_table)
    if not conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table}).scalar_one():
        return []
    return [
        str(r) for r in conn.execute(text(f"SELECT version_num FROM {table} ORDER BY 1")).scalars()
    ]


def _resolve(script: ScriptDirectory | None, rev: str) -> str | None:
    """The full id of a revision the scripts know (Alembic accepts a unique prefix), else None."""
    if script is None:
        return None
    try:
        found = script.get_revision(rev)
    except Exception:
        return None
    return found.revision if found is not None else None


def _ancestors(script: ScriptDirectory, rev: str) -> set[str]:
    """``rev`` and every revision below it."""
    try:
        return {s.revision for s in script.iterate_revisions(rev, "base")}
    except Exception:
        return {rev}


def _history_findings(
    target: Target, conn: Connection, script: ScriptDirectory | None, rows: list[str]
) -> list[Finding]:
    """alembic_version against the scripts: unknown revisions (§8 error 1), several rows."""
    if script is None:
        return [_several_rows(target, None, rows)] if len(rows) > 1 else []
    found = [_unknown(target, conn, script, rev) for rev in rows if _resolve(script, rev) is None]
    if len(rows) > 1:
        found.append(_several_rows(target, script, rows))
    return found


def _several_rows(target: Target, script: ScriptDirectory | None, rows: list[str]) -> Finding:
    message = (
        f"{target.version_table} holds {len(rows)} rows ({', '.join(rows)}): the database is on "
        "several branches, and runbook applies one linear history"
    )
    return finding("several_versions", message, _several_rows_fix(target, script, rows))


def _several_rows_fix(target: Target, script: ScriptDirectory | None, rows: list[str]) -> str:
    stamp = f"`runbook stamp --target {target.name}"
    known = [_resolve(script, r) for r in rows]
    if script is None or None in known:
        return f"find the revision the schema is at (`alembic history`), then {stamp} <rev>`"
    full = [k for k in known if k is not None]
    for rev in full:
        if set(full) <= _ancestors(script, rev):
            return f"{stamp} {rev}` (the other rows are its ancestors)"
    if len(script.get_heads()) == 1:
        return "`alembic upgrade head` applies the merge revision; then runbook can take over"
    return "merge the branches (`alembic merge heads`), then `alembic upgrade head`"


# -- an unknown revision: §8 error 1 -------------------------------------------------------------


def _unknown(target: Target, conn: Connection, script: ScriptDirectory, rev: str) -> Finding:
    changes = ledger.ledger_changes(conn)
    applied_by = _applied_by(changes, rev)
    nearest = _nearest_known(target, conn, script, rev, changes)
    message = (
        f"{target.version_table} holds revision {rev!r}, which the scripts do not know "
        "(§8 error 1: Can't locate revision)"
    )
    if applied_by:
        message += f"; runbook applied it in run {applied_by}: the database is ahead of this code"
    if nearest:
        message += f"; nearest known revision: {nearest[0]} ({nearest[1]})"
    stamp = f"`runbook stamp --target {target.name} {nearest[0] if nearest else '<rev>'}`"
    if applied_by:
        fix = f"deploy the code that has revision {rev}, or undo it by hand and {stamp}"
    elif nearest:
        fix = f"check that the schema is at {nearest[0]}, then {stamp}"
    else:
        fix = f"find the revision the schema is at (`alembic history`), then {stamp}"
    return finding("unknown_revision", message, fix)


def _nearest_known(
    target: Target,
    conn: Connection,
    script: ScriptDirectory,
    rev: str,
    changes: list[Any],
) -> tuple[str, str] | None:
    """(revision, why) for the known revision the database most likely is at."""
    try:
        known = [s.revision for s in script.walk_revisions()]
    except Exception:
        return None
    return (
        _by_id(rev, known)
        or _by_fingerprint(target, conn, known)
        or _by_ledger(script, rev, known, changes)
    )


def _by_id(rev: str, known: list[str]) -> tuple[str, str] | None:
    """A known id the unknown one extends, or one a typo away from it."""
    extended = [k for k in known if rev.startswith(k)]
    if len(extended) == 1:
        return extended[0], "its id starts with it"
    close = difflib.get_close_matches(rev, known, n=1, cutoff=0.75)
    return (close[0], "the closest id: a typo?") if close else None


def _by_fingerprint(target: Target, conn: Connection, known: list[str]) -> tuple[str, str] | None:
    """The one known revision whose recorded schema fingerprint the live schema matches."""
    recorded = ledger.recorded_fingerprints(conn)
    if not recorded:
        return None
    now = verify.fingerprint(conn, target.version_table)
    matches = [r for r in known if recorded.get(r) == now]
    if len(matches) == 1:
        return matches[0], "the schema matches the fingerprint runbook recorded there"
    return None


def _by_ledger(
    script: ScriptDirectory, rev: str, known: list[str], changes: list[Any]
) -> tuple[str, str] | None:
    """The known revision the ledger last left the database at (before ``rev``, if there)."""
    seen = [c.revision for c in changes]
    start = seen.index(rev) + 1 if rev in seen else 0
    for change in changes[start:]:
        if change.revision not in known:
            continue
        at = change.revision if change.kind == "upgrade" else _down(script, change.revision)
        return (at, "where the ledger last recorded the database") if at else None
    return None


def _down(script: ScriptDirectory, rev: str) -> str | None:
    found = script.get_revision(rev)
    down = found.down_revision if found is not None else None
    return down if isinstance(down, str) else None


def _applied_by(changes: list[Any], rev: str) -> str | None:
    """The run that applied ``rev`` when the ledger's last change of it is an upgrade."""
    for change in changes:
        if change.revision == rev:
            return str(change.run_id) if change.kind == "upgrade" else None
    return None


# -- pending revisions: §8 errors 2, 3 and 4 -----------------------------------------------------


def _pending_findings(
    target: Target, conn: Connection, project: Project, current: str | None
) -> list[Finding]:
    try:
        pending = project.upgrade_path(current, project.head)
    except RevisionError as exc:
        return [finding("history", str(exc), "fix the history, then run the doctor again")]
    if not pending:
        return []
    return [_behind(target, current, project.head, pending)] + _sql_findings(
        target, conn, project, pending
    )


def _behind(
    target: Target, current: str | None, head: str | None, pending: list[Revision]
) -> Finding:
    n = len(pending)
    shown = ", ".join(r.id for r in pending[:5]) + (f", … ({n - 5} more)" if n > 5 else "")
    at = f"at {current}" if current else "at no revision (never migrated)"
    return finding(
        "behind",
        f"the database is {at}, {n} revision{'s' if n > 1 else ''} behind head {head}: {shown} "
        "(§8 error 4: Target database is not up to date)",
        f"`runbook apply --target {target.name}`",
    )


def _sql_findings(
    target: Target, conn: Connection, project: Project, pending: list[Revision]
) -> list[Finding]:
    """Read each pending revision's offline SQL for what would fail on the live database."""
    plan = _Plan()
    found: list[Finding] = []
    for i, rev in enumerate(pending):
        try:
            sql = project.upgrade_sql(rev)
        except RevisionError as exc:
            found.append(
                finding(
                    "unrenderable",
                    f"{exc}; its SQL was not checked",
                    f"review {rev.id} by hand, or apply it to a copy of the database first",
                )
            )
            continue
        previous = pending[i - 1].id if i else None
        found += _revision_findings(target, conn, rev, sql, plan, previous)
    return found


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
class _Plan:
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


def _live_relation(conn: Connection, name: str, plan: _Plan) -> str | None:
    """The live relation ``name`` (as regclass text, safe to interpolate), unless earlier
    pending SQL creates or drops it."""
    if _key(name) in plan.touched:
        return None
    found = _scalar(conn, "SELECT to_regclass(:n)::text", n=name)
    return str(found) if found else None


def _live_column(conn: Connection, table: str, column: str, plan: _Plan) -> bool:
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


def _exists(conn: Connection, ev: _Event, plan: _Plan) -> bool:
    """Whether what ``ev`` creates is already in the live database."""
    if ev.kind == "add_column":
        return _live_column(conn, ev.name, ev.column, plan)
    if _key(ev.name) in plan.touched:
        return False
    if ev.what == "type":
        return bool(_scalar(conn, "SELECT to_regtype(:n) IS NOT NULL", n=ev.name))
    return _live_relation(conn, ev.name, plan) is not None


def _revision_findings(
    target: Target,
    conn: Connection,
    rev: Revision,
    sql: str,
    plan: _Plan,
    previous: str | None,
) -> list[Finding]:
    """§8 errors 2 and 3 in one pending revision's SQL."""
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


def _not_null_problem(conn: Connection, rev: Revision, ev: _Event, plan: _Plan) -> Finding | None:
    """§8 error 3: NOT NULL on a column that holds NULLs (or a new one on a table with rows)."""
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


def _nulls(conn: Connection, ev: _Event, plan: _Plan) -> int:
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


def _adds_required_column(conn: Connection, ev: _Event, plan: _Plan) -> bool:
    """An ADD COLUMN … NOT NULL with nothing to fill it, on a live table that has rows."""
    definition = ev.definition or ""
    if not _NOT_NULL.search(definition) or _FILLS_ITSELF.search(definition):
        return False
    table = _live_relation(conn, ev.name, plan)
    if table is None or _live_column(conn, ev.name, ev.column, plan):
        return False
    return bool(_scalar(conn, f"SELECT EXISTS (SELECT 1 FROM {table})"))


# -- what killed runs left behind (jobs/leftovers.py) ---------------------------------------------


def leftover_findings(target: Target, conn: Connection) -> list[Finding]:
    """Scratch databases and partial dump files of dead runs, and scratch databases named for
    this database whose run its ledger does not know."""
    try:
        dead = leftovers.dead(conn, target)
        unknown = leftovers.unknown(conn, target)
    except DBAPIError as exc:
        return [
            finding(
                "unreadable",
                f"cannot look for leftovers of killed runs ({describe(exc)})",
                "connect as the role that owns the database",
            )
        ]
    reconciler = "a running `runbook worker` removes it within RUNBOOK_RECONCILE_S (15 s)"
    found = []
    for item in dead:
        left = f"{item.describe()} was left by run {item.run_id} (delivery {item.delivery})"
        if item.kind == "scratch":
            by_hand = f'`DROP DATABASE "{item.name}" WITH (FORCE)`'
            found.append(
                finding(
                    "leftover_scratch",
                    f"{left} on {_server(target)}, and nothing uses it: {item.why}",
                    f"{reconciler}; or drop it by hand: {by_hand}",
                )
            )
        else:
            found.append(
                finding(
                    "leftover_dump",
                    f"{left}, and nothing writes it: {item.why}",
                    f"{reconciler}; or delete it by hand: `rm {item.name}`",
                )
            )
    for item in unknown:
        found.append(
            finding(
                "unknown_scratch",
                f"{item.describe()} on {_server(target)} is named for this database, but its run "
                f"{item.run_id} is not in the ledger (was the database recreated?); runbook "
                "cannot prove it unused and leaves it alone",
                f'if nothing uses it, `DROP DATABASE "{item.name}" WITH (FORCE)`',
            )
        )
    return found


def _server(target: Target) -> str:
    return target.where.rsplit("/", 1)[0]
