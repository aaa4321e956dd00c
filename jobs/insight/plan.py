"""Know before you run: what each pending revision will do, to which tables, and how risky.

``build_plan`` renders every pending revision's upgrade offline (Alembic's ``--sql`` mode,
one revision at a time), lints that SQL (jobs/insight/lint.py), finds the tables it touches
(jobs/insight/parse.py) and looks their size and estimated rows up in the live database,
with the statements that rewrite a table (jobs/insight/rewrites.py: a run waits for the
standbys after those) and the target's standbys and replication slots as preflight will see
them (jobs/run/replicas.py). Nothing is changed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypedDict

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs.config import Target
from jobs.errors import RevisionError
from jobs.insight.lint import Finding, lint
from jobs.insight.parse import outside_transaction, tables_in
from jobs.insight.rewrites import rewrites
from jobs.pg import db
from jobs.pg.replication import Bounds
from jobs.pg.sqlstate import LOCK_NOT_AVAILABLE, describe, sqlstate
from jobs.project.runtime import Project
from jobs.project.scripts import Revision
from jobs.run import replicas


class TableInfo(TypedDict):
    name: str
    exists: bool
    size_bytes: int | None
    estimated_rows: int | None


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


def replication_facts(target: Target, conn: Connection) -> dict[str, Any]:
    """The target's standbys and slots as preflight records them, or why they cannot be read."""
    try:
        return replicas.facts(replicas.read(conn, target), Bounds.of_target(target))
    except DBAPIError as exc:
        return {"error": f"cannot read the standbys: {describe(exc)}", "lines": []}
    finally:
        if conn.in_transaction():
            conn.rollback()


# -- findings that matter under runbook -------------------------------------------------------

STATEMENT_TIMEOUT_RULE = "require-statement-timeout"


def excluded_rules(target: Target) -> tuple[str, ...]:
    """squawk rules runbook makes moot on this target, beyond ``require-lock-timeout``
    (jobs/insight/lint.py: every session of ours sets ``lock_timeout``).

    ``require-statement-timeout`` is dropped only when the target sets ``statement_timeout``:
    then every session of ours, the migrations' included, runs with it (jobs/pg/connect.py
    connect_args, jobs/project/envpy.py). Without it nothing bounds a statement, and there is
    no default: one short enough to protect traffic would kill a long CREATE INDEX
    CONCURRENTLY and the backups' table checksums, which run on the same sessions.
    """
    return (STATEMENT_TIMEOUT_RULE,) if target.statement_timeout_ms else ()


def _under_runbook(target: Target, finding: Finding) -> Finding:
    """squawk's finding with the fix a runbook user applies: squawk's ``SET statement_timeout``
    in the migration is the target's ``statement_timeout`` in runbook.toml."""
    if finding["rule"] != STATEMENT_TIMEOUT_RULE:
        return finding
    fix = (
        f'set statement_timeout (e.g. "15min") on target {target.name} in runbook.toml; '
        "runbook then sets it on every session and drops this rule"
    )
    return {**finding, "help": fix}


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
        rewrites=rewrites(sql) if error is None else None,
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
        standbys = replication_facts(target, conn)
    finally:
        if conn.in_transaction():
            conn.rollback()
    found = lint(
        scripts,
        version_table=target.version_table,
        pg_version=version,
        exclude=excluded_rules(target),
    )
    for entry in revisions:
        if entry["id"] in found:
            entry["lint"] = [_under_runbook(target, f) for f in found[entry["id"]]]
    return {
        "target": target.name,
        "current": current,
        "to": destination,
        "revisions": revisions,
        "lint_errors": sum(f["level"] == "error" for fs in found.values() for f in fs),
        "replication": standbys,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
