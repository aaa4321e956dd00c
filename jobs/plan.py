"""Know before you run: what each pending revision will do, to which tables, and how risky.

``build_plan`` renders every pending revision's upgrade offline (Alembic's ``--sql`` mode,
one revision at a time), lints that SQL with squawk, finds the tables it touches with pglast
and looks their size and estimated rows up in the live database. Nothing is changed.

How squawk is run (the choices, and why):

* Alembic's framing is linted as rendered, **without** ``--assume-in-transaction``. The
  offline output wraps each revision in ``BEGIN;`` … ``COMMIT;`` and shows an
  ``autocommit_block()`` as ``COMMIT;`` … ``BEGIN;``, exactly what runs online with
  ``transaction_per_migration``. So squawk sees which statements really run outside a
  transaction (``prefer-robust-stmts`` then warns that they cannot be rerun after a crash),
  and a ``CONCURRENTLY`` left inside one is caught (``ban-concurrent-index-creation-in-
  transaction``); ``--assume-in-transaction`` would add a second, imaginary transaction
  around Alembic's own and flag every ``BEGIN``/``COMMIT`` as ``transaction-nesting``.
* Alembic's bookkeeping (``CREATE TABLE alembic_version``, its ``INSERT``/``UPDATE``) is
  blanked out before linting; blanking keeps squawk's line numbers valid for the rendered SQL.
* ``require-lock-timeout`` is excluded: runbook sets ``lock_timeout`` on every migration
  session. ``require-statement-timeout`` is excluded when the target sets ``statement_timeout``.
* ``ban-add-enum-value`` (opt-in in squawk) is included: an added ENUM value cannot be
  removed, the reason a rollback becomes a restore.
* ``--pg-version`` is the live server's, so version-dependent rules judge the real server.
* squawk 2.x reports every rule as a warning. runbook raises to ``error`` the rules whose
  statement blocks production traffic for a whole table scan or rewrite, or cannot run at all
  (``ERROR_RULES``); ``lint_errors`` counts those.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from pglast import ast, enums, parse_plpgsql, parse_sql
from pglast.parser import ParseError, split
from pglast.visitors import Visitor
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs import db
from jobs.config import Target
from jobs.errors import RevisionError, RunbookError
from jobs.migrate import LOCK_NOT_AVAILABLE, Project, Revision, sqlstate

SQUAWK_TIMEOUT_S = 120
SQUAWK_INCLUDE = ("ban-add-enum-value",)
SQUAWK_EXCLUDE = ("require-lock-timeout",)

# Rules whose finding means a long lock on a live table, a rewrite, or a statement that fails.
ERROR_RULES = frozenset(
    {
        "syntax-error",
        "require-concurrent-index-creation",
        "require-concurrent-index-deletion",
        "adding-not-nullable-field",
        "adding-foreign-key-constraint",
        "constraint-missing-not-valid",
        "adding-required-field",
        "adding-field-with-default",
        "adding-serial-primary-key-field",
        "changing-column-type",
        "disallowed-unique-constraint",
        "ban-concurrent-index-creation-in-transaction",
        "ban-uncommitted-transaction",
    }
)

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


class LintUnavailable(RunbookError):
    """Raised when the squawk linter is not installed."""


class LintFailed(RunbookError):
    """Raised when squawk runs but gives no report."""


class Finding(TypedDict):
    rule: str
    message: str
    help: str | None
    level: str
    line: int | None
    statement: str


class TableInfo(TypedDict):
    name: str
    exists: bool
    size_bytes: int | None
    estimated_rows: int | None


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


# -- lint -------------------------------------------------------------------------------------


def squawk_binary() -> str:
    """The squawk executable next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "squawk"
    if beside.is_file():
        return str(beside)
    found = shutil.which("squawk")
    if not found:
        raise LintUnavailable("squawk not found; pip install squawk-cli")
    return found


def lint_text(sql: str, version_table: str = "alembic_version") -> str:
    """``sql`` with Alembic's version-table statements blanked, every position kept."""
    chars = list(sql)
    for stmt in statements(sql):
        if is_bookkeeping(stmt, version_table):
            end = stmt.end + 1 if sql[stmt.end : stmt.end + 1] == ";" else stmt.end
            for i in range(stmt.start, end):
                if chars[i] != "\n":
                    chars[i] = " "
    return "".join(chars)


def _squawk_args(pg_version: str | None, exclude: Iterable[str]) -> list[str]:
    args = ["--reporter", "json", "--no-error-on-unmatched-pattern"]
    args += [f"--include={rule}" for rule in SQUAWK_INCLUDE]
    args += [f"--exclude={rule}" for rule in (*SQUAWK_EXCLUDE, *exclude)]
    if pg_version:
        args.append(f"--pg-version={pg_version}")
    return args


def _run_squawk(files: list[str], cwd: str, args: list[str]) -> list[dict[str, Any]]:
    """squawk's JSON report on ``files``; it exits 1 when it finds something, which is fine."""
    try:
        proc = subprocess.run(
            [squawk_binary(), *args, *files],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=SQUAWK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise LintFailed(f"squawk did not finish in {SQUAWK_TIMEOUT_S} s") from None
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        why = lines[0] if lines else f"exit code {proc.returncode}"
        raise LintFailed(f"squawk gave no report ({why})") from None
    if not isinstance(report, list):
        raise LintFailed("squawk gave no report (unexpected JSON)")
    return report


def _one_line(sql: str) -> str:
    return " ".join(sql.split())


def _statement_at(sql: str, stmts: list[Statement], line: int, column: int) -> str:
    """The statement holding squawk's 0-based (line, column), else that line of ``sql``."""
    lines = sql.split("\n")
    if not 0 <= line < len(lines):
        return ""
    offset = sum(len(x) + 1 for x in lines[:line]) + column
    for stmt in reversed(stmts):
        if stmt.start <= offset <= stmt.end:
            return _one_line(stmt.text)
    return _one_line(lines[line])


def _finding(raw: Mapping[str, Any], sql: str, stmts: list[Statement]) -> Finding:
    rule = str(raw.get("rule_name") or "unknown")
    level = str(raw.get("level") or "warning").lower()
    line, column = raw.get("line"), raw.get("column")
    return Finding(
        rule=rule,
        message=str(raw.get("message") or ""),
        help=raw.get("help"),
        level="error" if rule in ERROR_RULES else level,
        line=line + 1 if isinstance(line, int) else None,
        statement=(
            _statement_at(sql, stmts, line, column)
            if isinstance(line, int) and isinstance(column, int)
            else ""
        ),
    )


def lint(
    scripts: Mapping[str, str],
    *,
    version_table: str = "alembic_version",
    pg_version: str | None = None,
    exclude: Iterable[str] = (),
) -> dict[str, list[Finding]]:
    """squawk's findings for each named SQL script (one squawk run for all of them)."""
    args = _squawk_args(pg_version, exclude)
    keys = list(scripts)
    texts = {key: lint_text(scripts[key], version_table) for key in keys}
    findings: dict[str, list[Finding]] = {key: [] for key in keys}
    if not keys:
        return findings
    with tempfile.TemporaryDirectory(prefix="runbook-lint-") as tmp:
        files = []
        for i, key in enumerate(keys):
            (Path(tmp) / f"{i:04d}.sql").write_text(texts[key], encoding="utf-8")
            files.append(f"{i:04d}.sql")
        report = _run_squawk(files, tmp, args)
    stmts = {key: statements(texts[key]) for key in keys}
    for raw in report:
        try:
            key = keys[int(Path(str(raw.get("file", ""))).stem)]
        except (ValueError, IndexError):
            continue
        findings[key].append(_finding(raw, texts[key], stmts[key]))
    for found in findings.values():
        found.sort(key=lambda f: f["line"] or 0)
    return findings


# -- the live database ------------------------------------------------------------------------


def pg_version(conn: Connection) -> str:
    """The server's version as squawk's ``--pg-version`` takes it (``15.20``)."""
    num = db.server_version_num(conn)
    return f"{num // 10000}.{num % 10000}"


def table_info(conn: Connection, name: str) -> TableInfo:
    """Size and estimated rows of ``name``; ``exists: False`` when it is not there (yet).

    The size needs an ACCESS SHARE lock: behind a lock held longer than the session's
    ``lock_timeout`` (a migration running now) it is left unknown rather than waited for.
    """
    quote = conn.dialect.identifier_preparer.quote
    qualified = ".".join(quote(part) for part in name.split("."))
    row = conn.execute(
        text("SELECT c.oid, c.reltuples FROM pg_class c WHERE c.oid = to_regclass(:name)"),
        {"name": qualified},
    ).first()
    if row is None:
        return TableInfo(name=name, exists=False, size_bytes=None, estimated_rows=None)
    rows = None if row[1] is None or row[1] < 0 else round(row[1])  # -1: never analyzed
    try:
        size = conn.execute(text("SELECT pg_total_relation_size(:oid)"), {"oid": row[0]})
        size_bytes: int | None = int(size.scalar_one())
    except DBAPIError as exc:
        if sqlstate(exc) != LOCK_NOT_AVAILABLE:
            raise
        size_bytes = None
    return TableInfo(name=name, exists=True, size_bytes=size_bytes, estimated_rows=rows)


class _Tables:
    """Table lookups on the target, each table looked up once per plan."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.seen: dict[str, TableInfo] = {}

    def __call__(self, name: str) -> TableInfo:
        if name not in self.seen:
            try:
                self.seen[name] = table_info(self.conn, name)
            finally:  # release the AccessShareLock pg_total_relation_size took
                if self.conn.in_transaction():
                    self.conn.rollback()
        return self.seen[name]


def backfills(rev: Revision, tables: Callable[[str], TableInfo]) -> list[dict[str, Any]]:
    """The revision's declared backfills (checked: BadDeclaration), as declared, each with
    its table's estimated rows (None for a table a pending revision creates)."""
    out = []
    for item in rev.backfills:
        table = str(item.declared["table"])
        out.append(
            {
                "table": table,
                "set": item.declared["set"],
                "where": item.declared.get("where"),
                "key": item.key,
                "batch_size": item.batch_size,
                "slices": item.slices,
                "estimated_rows": tables(table)["estimated_rows"],
            }
        )
    return out


# -- the plan ---------------------------------------------------------------------------------


def _entry(rev: Revision, status: str) -> dict[str, Any]:
    return {
        "id": rev.id,
        "message": rev.message,
        "path": rev.path,
        "sha256": rev.sha256,
        "status": status,
    }


def _pending(project: Project, rev: Revision, tables: _Tables) -> tuple[dict[str, Any], str]:
    """A pending revision's entry (lint still empty) and its rendered SQL ('' if none)."""
    entry = _entry(rev, "pending")
    try:  # the SQL runbook runs: a declared backfill's inline loop is left to the backfill
        sql = project.upgrade_sql(rev, as_runbook_runs_it=True)
        error = None
    except RevisionError as exc:
        sql, error = "", str(exc).splitlines()[0]
    version_table = project.target.version_table
    touched = [t for t in tables_in(sql) if t.rsplit(".", 1)[-1] != version_table]
    touched += [
        str(b.declared["table"]) for b in rev.backfills if b.declared["table"] not in touched
    ]
    entry.update(
        sql=sql if error is None else None,
        render_error=error,
        lint=[],
        irreversible=rev.irreversible,
        outside_transaction=outside_transaction(sql) if error is None else None,
        tables=[tables(name) for name in touched],
        backfills=backfills(rev, tables),
        requires_backfills=rev.requires_backfills,
    )
    return entry, sql


def build_plan(
    target: Target, project: Project, conn: Connection, to: str | None
) -> dict[str, Any]:
    """What applying up to ``to`` (default head) would do, revision by revision."""
    try:
        current = project.current(conn)
        destination = project.resolve(to or "head")
        path = project.upgrade_path(current, destination)
        project.check_declarations(path)  # a bad declaration refuses the plan, like apply
        tables = _Tables(conn)
        revisions = [_entry(project.revision(current), "current")] if current else []
        scripts: dict[str, str] = {}
        for rev in path:
            entry, sql = _pending(project, rev, tables)
            revisions.append(entry)
            if entry["render_error"] is None:
                scripts[rev.id] = sql
        version = pg_version(conn)
    finally:
        if conn.in_transaction():
            conn.rollback()
    exclude = ("require-statement-timeout",) if target.statement_timeout_ms else ()
    found = lint(scripts, version_table=target.version_table, pg_version=version, exclude=exclude)
    for entry in revisions:
        if entry["id"] in found:
            entry["lint"] = found[entry["id"]]
    return {
        "target": target.name,
        "current": current,
        "to": destination,
        "revisions": revisions,
        "lint_errors": sum(f["level"] == "error" for fs in found.values() for f in fs),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# -- human output -----------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _table_cell(info: Mapping[str, Any]) -> str:
    if not info["exists"]:
        return f"{info['name']} (new)"
    rows = info["estimated_rows"]
    counted = "never analyzed" if rows is None else f"~{rows:,} rows"
    return f"{info['name']} {_size(info['size_bytes'])}, {counted}"


def _yes(value: object) -> str:
    if value is None:
        return "?"
    return "yes" if value else ""


def _row(entry: Mapping[str, Any]) -> list[str]:
    if entry["status"] == "current":
        return [f"{entry['id']} (current)", entry["message"], "", "", "", ""]
    lint_cell = "render failed" if entry.get("render_error") else str(len(entry["lint"]))
    errors = sum(f["level"] == "error" for f in entry["lint"])
    if errors:
        lint_cell += f" ({errors} error{'s' if errors > 1 else ''})"
    return [
        entry["id"],
        entry["message"],
        "yes" if entry["irreversible"] else "",
        _yes(entry["outside_transaction"]),
        "\n".join(_table_cell(t) for t in entry["tables"]),
        lint_cell,
    ]


def _backfill_line(rev: str, item: Mapping[str, Any]) -> Text:
    where = f" WHERE {item['where']}" if item.get("where") else ""
    rows = item.get("estimated_rows")
    size = "" if rows is None else f" (~{rows:,} rows in the table)"
    return Text(f"{rev}  backfill  {item['table']} SET {item['set']}{where}{size}")


def _finding_lines(plan: Mapping[str, Any]) -> list[Text]:
    lines = []
    for entry in plan["revisions"]:
        for item in entry.get("backfills") or []:
            lines.append(_backfill_line(entry["id"], item))
        if entry.get("render_error"):
            lines.append(Text(f"{entry['id']}  render-error  {entry['render_error']}"))
        for f in entry.get("lint", []):
            stmt = f["statement"][:80]
            line = f"{entry['id']}  {f['rule']}  {f['message']}  — {stmt}"
            lines.append(Text(line, style="bold" if f["level"] == "error" else ""))
    return lines


def format_plan(plan: Mapping[str, Any]) -> RenderableType:
    """The plan for a person: one row per revision, then every finding on its own line."""
    pending = sum(e["status"] == "pending" for e in plan["revisions"])
    head = (
        f"target {plan['target']}: {plan['current'] or 'base'} -> {plan['to'] or 'base'}, "
        f"{pending} pending revision(s), {plan['lint_errors']} lint error(s)"
    )
    table = Table("revision", "message", "irreversible", "outside txn", "tables", "lint")
    for entry in plan["revisions"]:
        table.add_row(*_row(entry))
    return Group(Text(head), table, *_finding_lines(plan))
