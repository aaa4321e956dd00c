"""Drift: a live schema that no longer matches the models, and applied revisions edited since.

Schema drift is ``alembic check``: the project's own env.py runs on a read-only connection of
runbook's, and Alembic's autogenerate comparison (``compare_metadata``, with the options the
env.py passes to ``context.configure``) lists what differs from its ``target_metadata``.
Edited revisions come from the ledger: every upgrade step records the sha256 of the revision
file it applied, and a file that now hashes differently (or is gone) is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.dialects import postgresql

from jobs.config import Target, redact
from jobs.errors import RevisionError, RunbookError
from jobs.ledger import fingerprints, read
from jobs.ledger import schema as ledger_schema
from jobs.pg import db
from jobs.pg.sqlstate import describe
from jobs.project.runtime import Project


def check(target: Target, project: Project) -> dict[str, Any]:
    """Schema drift and edited applied revisions of ``target``; changes nothing.

    ``pending`` lists the revisions the database still lacks: while it is not empty the
    schema differences include what those revisions will change (``alembic check`` refuses
    such a database; runbook reports both).
    """
    with db.connect(target) as conn:
        _read_only(conn)
        schema = schema_drift(project, conn)
        edited = edited_revisions(conn, project)
        pending = _pending(conn, project)
    return {
        "schema": schema,
        "edited": edited,
        "pending": pending,
        "drift": bool(schema or edited),
    }


def _read_only(conn: Connection) -> None:
    """Make every later transaction of this session read-only: a check never writes."""
    conn.execute(text("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"))
    conn.commit()


# -- schema drift ------------------------------------------------------------------------------


def schema_drift(project: Project, conn: Connection) -> list[str]:
    """Readable lines for what differs between the models and the live schema."""
    found: dict[str, Any] = {}

    def compare(_heads: Any, context: MigrationContext) -> list[Any]:
        metadata = context.opts.get("target_metadata")
        if metadata is not None:
            _exclude_bookkeeping(context, project.target.version_table)
            found["diffs"] = compare_metadata(context, metadata)
        return []

    _run_env(project, conn, compare)
    if "diffs" not in found:
        raise RunbookError(
            f"{project.target.alembic_ini}: the project's env.py gives no target_metadata; "
            "drift cannot be checked (pass target_metadata=<your MetaData> to "
            "context.configure)"
        )
    return [diff_line(diff) for diff in _flatten(found["diffs"])]


def _run_env(
    project: Project, conn: Connection, fn: Callable[[Any, MigrationContext], list[Any]]
) -> None:
    """Run the project's env.py online on ``conn`` with ``fn`` as the work, mutating nothing."""
    project.config.attributes["connection"] = conn
    try:
        with (
            project.environment(read_only=True),  # env.py's own engine reads only, too
            EnvironmentContext(project.config, project.script, fn=fn, dont_mutate=True),
        ):
            project.script.run_env()
    except RunbookError:
        raise
    except Exception as exc:
        raise RunbookError(
            f"{project.target.alembic_ini}: env.py failed while comparing the schema "
            f"({describe(exc)})"
        ) from None
    finally:
        project.config.attributes.pop("connection", None)
        if not conn.closed and conn.in_transaction():
            conn.rollback()


def _exclude_bookkeeping(context: MigrationContext, version_table: str) -> None:
    """Keep runbook's ledger schema and Alembic's version table out of the comparison."""
    inner = context.opts.get("include_name")

    def include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
        if type_ == "schema" and name == read.SCHEMA:
            return False
        if type_ == "table" and name == version_table:
            return False
        return True if inner is None else bool(inner(name, type_, parent_names))

    context.opts["include_name"] = include_name


def _flatten(diffs: list[Any]) -> Iterator[tuple[Any, ...]]:
    """Alembic groups a column's modifications in a list; yield one tuple per difference."""
    for diff in diffs:
        if isinstance(diff, list):
            yield from diff
        else:
            yield diff


def _table_name(schema: str | None, name: str) -> str:
    return f"{schema}.{name}" if schema else name


def _type(type_: Any) -> str:
    """A column type as PostgreSQL spells it."""
    try:
        return str(type_.compile(dialect=postgresql.dialect()))
    except Exception:
        return repr(type_)


def _default(value: Any) -> str:
    """A server default (text, DefaultClause or TextClause) as SQL text."""
    if value is None:
        return "none"
    arg = getattr(value, "arg", value)
    return str(getattr(arg, "text", arg))


def _columns(obj: Any) -> str:
    return ", ".join(c.name for c in getattr(obj, "columns", []))


def _constraint(obj: Any) -> str:
    """'unique constraint uq_x (a, b)' and the like."""
    kind = {
        "UniqueConstraint": "unique constraint",
        "ForeignKeyConstraint": "foreign key",
        "CheckConstraint": "check constraint",
        "PrimaryKeyConstraint": "primary key",
    }.get(type(obj).__name__, "constraint")
    name = f" {obj.name}" if getattr(obj, "name", None) else ""
    cols = _columns(obj)
    return f"{kind}{name}" + (f" ({cols})" if cols else "")


def _where(obj: Any) -> str:
    table = obj.table
    return _table_name(table.schema, table.name)


_IN_MODELS = "is in the models but not in the database"
_IN_DATABASE = "is in the database but not in the models"


def diff_line(diff: tuple[Any, ...]) -> str:
    """One readable line for one Alembic diff tuple."""
    kind = diff[0]
    if kind in ("add_table", "remove_table"):
        where = _IN_MODELS if kind == "add_table" else _IN_DATABASE
        return f"table {_table_name(diff[1].schema, diff[1].name)} {where}"
    if kind in ("add_column", "remove_column"):
        where = _IN_MODELS if kind == "add_column" else _IN_DATABASE
        return f"table {_table_name(diff[1], diff[2])}: column {diff[3].name!r} {where}"
    if kind in ("add_index", "remove_index"):
        where = _IN_MODELS if kind == "add_index" else _IN_DATABASE
        index = diff[1]
        return f"table {_where(index)}: index {index.name} ({_columns(index)}) {where}"
    if kind in ("add_constraint", "remove_constraint", "add_fk", "remove_fk"):
        where = _IN_MODELS if kind.startswith("add") else _IN_DATABASE
        return f"table {_where(diff[1])}: {_constraint(diff[1])} {where}"
    if kind.startswith("modify_"):
        return _modify_line(diff)
    if kind in ("add_table_comment", "remove_table_comment"):
        return f"table {_table_name(diff[1].schema, diff[1].name)}: the comment differs"
    return redact(f"{kind}: {diff[1:]!r}")


def _modify_line(diff: tuple[Any, ...]) -> str:
    """A column whose type, nullability, default or comment differs."""
    kind, schema, table, column, _existing, db_value, model_value = diff
    head = f"table {_table_name(schema, table)}: column {column!r}"
    if kind == "modify_type":
        return f"{head} is {_type(db_value)} in the database but {_type(model_value)} in the models"
    if kind == "modify_nullable":

        def null(v: bool) -> str:
            return "nullable" if v else "NOT NULL"

        return f"{head} is {null(db_value)} in the database but {null(model_value)} in the models"
    if kind == "modify_default":
        return (
            f"{head} has default {_default(db_value)} in the database but "
            f"{_default(model_value)} in the models"
        )
    return (
        f"{head}: the comment differs ({db_value!r} in the database, {model_value!r} in the models)"
    )


# -- edited revisions --------------------------------------------------------------------------


def edited_revisions(conn: Connection, project: Project) -> list[dict[str, Any]]:
    """Applied revisions whose file changed (or is gone) since runbook applied them."""
    if not ledger_schema.exists(conn):
        return []
    live = _applied_ancestry(conn, project)
    found = []
    for revision, recorded, run_id in fingerprints.applied_file_hashes(conn):
        path, current = _file_hash(project, revision)
        if path is not None and live is not None and revision not in live:
            continue  # undone since (an operator restore, say): not applied any more
        if current == recorded:
            continue
        found.append(
            {
                "revision": revision,
                "path": path,
                "recorded_sha256": recorded,
                "current_sha256": current,
                "run_id": run_id,
            }
        )
    if conn.in_transaction():
        conn.rollback()
    return found


def _file_hash(project: Project, revision: str) -> tuple[str | None, str | None]:
    """(path, sha256) of a revision's file; (None, None) when the scripts lack it."""
    try:
        rev = project.revision(revision)
    except RevisionError:
        return None, None
    try:
        return rev.path, rev.sha256
    except OSError:
        return rev.path, None


def _applied_ancestry(conn: Connection, project: Project) -> set[str] | None:
    """Revisions the database is at or past, or None when its revision is unknown."""
    try:
        current = project.current(conn)
    except RunbookError:
        return None
    if current is None:
        return set()
    try:
        return {s.revision for s in project.script.iterate_revisions(current, "base")}
    except Exception:  # a broken history: the doctor reports it
        return None


def _pending(conn: Connection, project: Project) -> list[str]:
    """Revisions between the database and head (empty when unknown or at head)."""
    try:
        current = project.current(conn)
        return [r.id for r in project.upgrade_path(current, project.head)]
    except RunbookError:
        return []
