"""Which statements of rendered migration SQL rewrite a whole table (and so write the whole
table into the WAL, which every standby must then replay): the plan lists them, and a run
waits for its standbys after a revision that has one (jobs/run/replicas.py).

Read with pglast, from the SQL alone, so it errs on the side of "rewrites": every
``ALTER COLUMN … TYPE`` counts, though a binary-compatible change (``varchar(20)`` to
``text``) is done by PostgreSQL without one; an added column counts when its default is a
function PostgreSQL must call for every row (``gen_random_uuid()``, ``random()``,
``clock_timestamp()``, ``nextval()``: a serial or identity column too) or it is a stored
generated column; ``now()`` and constants are stored once in the catalog (PostgreSQL 11+).
"""

from __future__ import annotations

import re

from pglast import ast, enums, parse_sql
from pglast.parser import ParseError

from jobs.insight.parse import statements

# Defaults PostgreSQL evaluates for every row already in the table: volatile functions.
VOLATILE_DEFAULTS = frozenset(
    {
        "clock_timestamp",
        "gen_random_uuid",
        "nextval",
        "random",
        "timeofday",
        "txid_current",
        "uuid_generate_v1",
        "uuid_generate_v1mc",
        "uuid_generate_v4",
        "uuidv4",
        "uuidv7",
    }
)
_SERIALS = frozenset({"serial", "bigserial", "smallserial", "serial2", "serial4", "serial8"})
_REWRITING_ALTERS = {
    enums.AlterTableType.AT_AlterColumnType: "changes a column's type",
    enums.AlterTableType.AT_SetLogged: "sets the table LOGGED",
    enums.AlterTableType.AT_SetUnLogged: "sets the table UNLOGGED",
    enums.AlterTableType.AT_SetTableSpace: "moves the table to another tablespace",
}
if hasattr(enums.AlterTableType, "AT_SetAccessMethod"):  # PostgreSQL 15+ grammar
    _REWRITING_ALTERS[enums.AlterTableType.AT_SetAccessMethod] = "changes its access method"

# Alembic's offline rendering marks where each revision starts (runtime/migration.py).
_RUNNING = re.compile(r"^-- Running (?:upgrade|downgrade) .*? -> (\S+)\s*$", re.M)


def rewrites(sql: str) -> list[str]:
    """The statements of ``sql`` that rewrite a table, each on one line with why
    (``ALTER TABLE t ALTER COLUMN c TYPE bigint — changes a column's type``)."""
    found = []
    for stmt in statements(sql):
        try:
            tree = parse_sql(stmt.text)
        except ParseError:
            continue
        for raw in tree:
            why = _why(raw.stmt)
            if why:
                found.append(f"{' '.join(stmt.text.split())} — {why}")
    return found


def by_revision(sql: str) -> dict[str, str]:
    """A rendered range of revisions (jobs/project/offline.py ``upgrade_range_sql``) cut into
    each revision's own SQL, by the revision it goes to."""
    marks = list(_RUNNING.finditer(sql))
    return {
        m.group(1): sql[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(sql)]
        for i, m in enumerate(marks)
    }


def _why(node: object) -> str | None:
    if isinstance(node, ast.AlterTableStmt):
        for cmd in node.cmds or ():
            why = _alter_why(cmd)
            if why:
                return why
    elif isinstance(node, ast.VacuumStmt):
        options = {opt.defname for opt in node.options or ()}
        if node.is_vacuumcmd and "full" in options:
            return "VACUUM FULL rewrites the table"
    elif isinstance(node, ast.ClusterStmt):
        return "CLUSTER rewrites the table"
    return None


def _alter_why(cmd: ast.AlterTableCmd) -> str | None:
    if cmd.subtype in _REWRITING_ALTERS:
        return _REWRITING_ALTERS[cmd.subtype]
    if cmd.subtype != enums.AlterTableType.AT_AddColumn or not isinstance(cmd.def_, ast.ColumnDef):
        return None
    column = cmd.def_
    type_names = [n.sval for n in (column.typeName.names if column.typeName else ()) or ()]
    if type_names and type_names[-1].lower() in _SERIALS:
        return f"adds {type_names[-1]} column {column.colname}, filled for every row"
    for constraint in column.constraints or ():
        kind = constraint.contype
        if kind == enums.ConstrType.CONSTR_IDENTITY:
            return f"adds identity column {column.colname}, filled for every row"
        if kind == enums.ConstrType.CONSTR_GENERATED and constraint.generated_kind != "v":
            return f"adds stored generated column {column.colname}"
        if kind == enums.ConstrType.CONSTR_DEFAULT:
            called = _volatile_call(constraint.raw_expr)
            if called:
                return f"adds column {column.colname} with volatile default {called}()"
    return None


def _volatile_call(expr: object) -> str | None:
    """The first volatile function ``expr`` calls, anywhere in it."""
    if isinstance(expr, ast.FuncCall) and expr.funcname:
        name = str(expr.funcname[-1].sval).lower()
        if name in VOLATILE_DEFAULTS:
            return name
    if isinstance(expr, ast.Node):
        for attr in expr:
            found = _volatile_call(getattr(expr, attr))
            if found:
                return found
    elif isinstance(expr, tuple | list):
        for item in expr:
            found = _volatile_call(item)
            if found:
                return found
    return None
