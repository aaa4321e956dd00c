"""An Alembic project's script directory as runbook reads it, files only (Alembic's own split:
``alembic.script`` reads revisions, ``alembic.runtime`` runs them; here jobs/project/runtime.py
runs them and jobs/project/offline.py renders them): the revisions, their one head, the path
up, downgrade problems and the backfills a revision declares (module-level data plain Alembic
ignores), checked before anything runs.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sys
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from alembic.config import Config
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection

from jobs.config import Target
from jobs.errors import BadDeclaration, ProjectError, RevisionError, RunbookError, UnsafeSql
from jobs.lazy import lazy
from jobs.pg.sqlstate import describe
from jobs.project import cache

if TYPE_CHECKING:
    from jobs.backfill import sqlguard
    from jobs.backfill.spec import Spec
else:
    sqlguard = lazy("jobs.backfill.sqlguard")

# Set in config.attributes whenever runbook drives a migration. A revision that declares
# ``backfills`` and also runs the same loop inline (for plain ``alembic upgrade``) checks it
# and leaves the work to runbook, which runs the declared backfill right after upgrade().
RUNS_DECLARED_BACKFILLS = "runbook_runs_declared_backfills"
BACKFILL_FIELDS = ("table", "set", "where", "key", "batch_size", "slices", "on_error")


@dataclass(frozen=True)
class DeclaredBackfill:
    """One entry of a revision's module-level ``backfills``, checked like an operator's
    ``runbook backfill`` (jobs/backfill/sqlguard.py): SET and WHERE deparsed, names quoted."""

    revision: str
    table: str  # quoted: "large_table" or "schema"."table"
    set_sql: str
    where_sql: str | None
    key: str | None  # None: the table's primary key (or first usable key) when it runs
    batch_size: int
    slices: int
    on_error: str
    declared: dict[str, Any]  # the fields as the revision wrote them

    def describe(self) -> str:
        """``large_table SET … WHERE …``, as declared, for messages."""
        where = f" WHERE {self.declared['where']}" if self.declared.get("where") else ""
        return f"{self.declared['table']} SET {self.declared['set']}{where}"

    def spec(self, key: str, lock_timeout_ms: int) -> Spec:
        """The engine's spec for this backfill, walked by ``key``."""
        from jobs.backfill.spec import Spec, batch_bounds

        min_batch, max_batch = batch_bounds(self.batch_size)
        return Spec(
            table=self.table,
            key=key,
            set_sql=self.set_sql,
            where_sql=self.where_sql,
            batch_size=self.batch_size,
            min_batch=min_batch,
            max_batch=max_batch,
            lock_timeout_ms=lock_timeout_ms,
            slices=self.slices,
            on_error=self.on_error,
        )


def _positive(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadDeclaration(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def _check_shape(raw: Any, where: str) -> None:
    """A dict of known fields, the text ones strings; BadDeclaration otherwise."""
    if not isinstance(raw, Mapping):
        raise BadDeclaration(f"{where}: give a dict with {', '.join(BACKFILL_FIELDS)}")
    unknown = sorted(set(raw) - set(BACKFILL_FIELDS))
    if unknown:
        raise BadDeclaration(
            f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(BACKFILL_FIELDS)}"
        )
    for name in ("table", "set"):
        if not isinstance(raw.get(name), str):
            raise BadDeclaration(f"{where}: {name!r} is required, as a string")
    for name in ("where", "key", "on_error"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise BadDeclaration(f"{where}: {name!r} must be a string")


def _declared_backfill(revision: str, index: int, raw: Any) -> DeclaredBackfill:
    """One declaration checked, or BadDeclaration naming the revision and the entry."""
    where = f"revision {revision} declares a bad backfill (backfills[{index}])"
    _check_shape(raw, where)
    try:  # the same checks as an operator's `runbook backfill --table/--set/--where/--key`
        table = sqlguard.identifier(raw["table"], "table")
        pairs = sqlguard.assignments(raw["set"], "set")
        condition = sqlguard.predicate(raw["where"], "where") if raw.get("where") else None
        key = raw.get("key")
        if key is not None:
            key = sqlguard.identifier(key, "key", qualified=False)[1:-1]  # folded, unquoted
    except UnsafeSql as exc:
        raise BadDeclaration(f"{where}: {exc}") from None
    if key is not None and any(column == f'"{key}"' for column, _ in pairs):
        raise BadDeclaration(f"{where}: its set assigns the key {key}; a backfill cannot move it")
    declared = DeclaredBackfill(
        revision=revision,
        table=table,
        set_sql=sqlguard.render(pairs),
        where_sql=condition,
        key=key,
        batch_size=_positive(raw.get("batch_size", 1000), "batch_size", where),
        slices=_positive(raw.get("slices", 1), "slices", where),
        on_error=raw.get("on_error") or "stop",
        declared=dict(raw),
    )
    try:  # the engine's own checks of sizes, slices, on_error (the key is checked at run time)
        declared.spec(key or "id", 2000).check()
    except RunbookError as exc:
        raise BadDeclaration(f"{where}: {exc}") from None
    return declared


@dataclass(frozen=True)
class Revision:
    id: str
    down: str | None
    message: str
    path: str
    module: ModuleType

    @property
    def verify_check(self) -> str | Callable[[Connection], Any] | None:
        """The revision's own post-upgrade check (``verify = "SELECT …"`` or a callable)."""
        return getattr(self.module, "verify", None)

    @property
    def sha256(self) -> str:
        """The revision file's sha256: an applied revision edited later is drift."""
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()

    @property
    def declared_irreversible(self) -> str | None:
        """The revision's own ``irreversible = "why"`` (or True)."""
        value = getattr(self.module, "irreversible", None)
        if value:
            return "declared irreversible by the revision" if value is True else str(value)
        return None

    @property
    def irreversible(self) -> str | None:
        """Why the downgrade may not undo this revision, as far as reading it can tell: the
        revision says so, has no downgrade, or its downgrade raises or does nothing (right
        for a data-only revision: the fingerprint check after a downgrade decides)."""
        if self.declared_irreversible:
            return self.declared_irreversible
        downgrade = getattr(self.module, "downgrade", None)
        if not callable(downgrade):
            return "the revision has no downgrade()"
        return _downgrade_problem(downgrade)

    @property
    def backfills(self) -> list[DeclaredBackfill]:
        """The revision's module-level ``backfills``, checked (BadDeclaration otherwise).
        runbook runs them right after the upgrade and before the revision's verify."""
        raw = getattr(self.module, "backfills", None)
        if raw is None:
            return []
        if not isinstance(raw, list | tuple):
            raise BadDeclaration(
                f"revision {self.id}: backfills must be a list of dicts "
                "(table, set, where, key, batch_size, slices)"
            )
        return [_declared_backfill(self.id, i, item) for i, item in enumerate(raw)]

    @property
    def requires_backfills(self) -> list[str]:
        """Revisions whose declared backfills must have finished, and whose WHERE must match
        no row, before this one goes up (GitLab's "ensure finished")."""
        raw = getattr(self.module, "requires_backfills", None)
        if raw is None:
            return []
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list | tuple) or not all(isinstance(r, str) for r in items):
            raise BadDeclaration(
                f"revision {self.id}: requires_backfills must be a list of revision ids"
            )
        return list(items)


def _downgrade_problem(fn: Callable[..., Any]) -> str | None:
    """'raises …' or 'does nothing' for a downgrade whose body says so, else None."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    func = tree.body[0]
    if not isinstance(func, ast.FunctionDef):
        return None
    body = [
        node
        for node in func.body
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
    ]
    if all(isinstance(node, ast.Pass) for node in body):
        return "its downgrade() does nothing"
    for node in body:
        if isinstance(node, ast.Raise):
            exc = node.exc
            name = ast.unparse(exc.func if isinstance(exc, ast.Call) else exc) if exc else "raise"
            return f"its downgrade() raises {name}"
    return None


def _prepend_sys_path(config: Config, here: Path) -> None:
    """Put the project's ``prepend_sys_path`` entries on sys.path, relative ones read from
    alembic.ini's folder: Alembic reads them from the working directory, which is the
    project's when a user types ``alembic``, and seldom a worker's (the templates' ``.`` is
    how env.py imports the app's models for ``target_metadata``)."""
    try:
        entries = config.get_prepend_sys_paths_list() or []
    except Exception:  # Alembic itself will say what is wrong with the option
        return
    for entry in reversed(entries):
        path = str((here / entry).resolve()) if entry else ""
        if path and path not in sys.path:
            sys.path.insert(0, path)


def _load_config(target: Target) -> Config:
    """The target's alembic.ini, its ``prepend_sys_path`` applied; ProjectError otherwise."""
    ini = target.alembic_ini
    if not ini.is_file():
        raise ProjectError(
            f"target {target.name!r}: alembic.ini not found at {ini}; set alembic_ini "
            "in runbook.toml to your project's alembic.ini"
        )
    config = Config(str(ini))
    _prepend_sys_path(config, ini.parent)
    return config


def _script_directory(config: Config, ini: Path) -> ScriptDirectory:
    """The script directory alembic.ini points at; ProjectError when it cannot be used."""
    location = config.get_main_option("script_location")
    if not location:
        raise ProjectError(f"{ini}: no script_location in [alembic]; point it at migrations/")
    before = list(sys.path)
    try:
        return ScriptDirectory.from_config(config)
    except CommandError as exc:
        raise ProjectError(
            f"{ini}: script directory {location!r} cannot be used ({exc}); fix script_location"
        ) from None
    finally:
        # from_config prepends prepend_sys_path (relative to the working directory) at every
        # call; _prepend_sys_path has put the entries there once, read from alembic.ini's folder.
        sys.path[:] = before


def _single_head(script: ScriptDirectory, ini: Path) -> str | None:
    """The history's one head (None for no revision); ProjectError for a broken history,
    a revision file that does not import, or several heads."""
    try:
        heads = script.get_heads()
    except CommandError as exc:
        raise ProjectError(f"{ini}: the revision history is broken ({exc})") from None
    except Exception as exc:  # a revision file that does not import
        raise ProjectError(f"{ini}: a revision file cannot be loaded ({describe(exc)})") from None
    if len(heads) > 1:
        raise ProjectError(
            f"the Alembic history has {len(heads)} heads ({', '.join(sorted(heads))}); "
            "merge them with `alembic merge heads` before applying"
        )
    return heads[0] if heads else None


class Scripts:
    """An Alembic project as one run sees it: its own alembic Config, read from alembic.ini
    for this run (the run rewrites its ``sqlalchemy.url`` and attributes for its target), and
    the script directory with its head, read once per process and kept while the files on
    disk are unchanged (jobs/project/cache.py)."""

    def __init__(self, target: Target) -> None:
        ini = target.alembic_ini
        self.config = _load_config(target)
        parsed = cache.parsed(
            ini,
            lambda: _script_directory(self.config, ini),
            lambda script: _single_head(script, ini),
        )
        self.script, self.head = parsed.script, parsed.head

    def script_of(self, rev: str) -> Script:
        """Alembic's Script of revision ``rev``; RevisionError for an unknown one."""
        try:
            script = self.script.get_revision(rev)
        except CommandError:
            script = None
        if script is None:
            raise RevisionError(
                f"unknown revision {rev!r}; `alembic history` lists the known revisions"
            )
        return script

    def revision(self, rev: str) -> Revision:
        s = self.script_of(rev)
        down = s.down_revision
        if isinstance(down, tuple | list):
            raise RevisionError(
                f"revision {rev} merges branches; runbook applies linear histories only"
            )
        return Revision(
            id=s.revision,
            down=down,
            message=(s.doc or "").strip().splitlines()[0] if s.doc else "",
            path=s.path,
            module=s.module,
        )

    def resolve(self, spec: str) -> str | None:
        """A full revision id for ``spec`` (``head``, ``base``, an id or a unique prefix)."""
        if spec == "base":
            return None
        if spec == "head":
            if self.head is None:
                raise RevisionError("the Alembic history has no revisions")
            return self.head
        try:
            resolved = self.script.as_revision_number(spec)
        except CommandError:
            resolved = None
        if not resolved or not isinstance(resolved, str):
            raise RevisionError(
                f"unknown revision {spec!r}; `alembic history` lists the known revisions"
            )
        return self.script_of(resolved).revision

    def upgrade_path(self, current: str | None, to: str | None) -> list[Revision]:
        """Revisions to apply, oldest first, to go from ``current`` up to ``to``.

        RevisionError when ``to`` is behind or beside ``current``: apply only goes up.
        """
        if current == to:
            return []
        chain: list[Revision] = []
        rev = to
        while rev is not None and rev != current:
            r = self.revision(rev)
            chain.append(r)
            rev = r.down
        if rev != current:
            raise RevisionError(
                f"--to {to or 'base'} is behind the current revision {current}; apply only "
                "goes up (use `alembic downgrade` or a rollback to go down)"
            )
        return list(reversed(chain))

    # -- declared backfills ------------------------------------------------------------------

    def required_backfills(self, rev: Revision) -> list[DeclaredBackfill]:
        """The backfills ``rev`` requires finished: those declared by each revision in its
        ``requires_backfills``, which must come before it. BadDeclaration otherwise."""
        required: list[DeclaredBackfill] = []
        for name in rev.requires_backfills:
            where = f"revision {rev.id} requires the backfills of {name!r}"
            try:
                found = self.revision(self.resolve(name) or "")
            except RevisionError:
                raise BadDeclaration(f"{where}, which is not a known revision") from None
            if found.id not in self._ancestors(rev):
                raise BadDeclaration(f"{where}, which does not come before it in the history")
            if not found.backfills:
                raise BadDeclaration(f"{where}, which declares no backfills")
            required += found.backfills
        return required

    def _ancestors(self, rev: Revision) -> set[str]:
        found: set[str] = set()
        down = rev.down
        while down is not None and down not in found:
            found.add(down)
            down = self.revision(down).down
        return found

    def check_declarations(self, path: list[Revision]) -> None:
        """Refuse, before anything runs, a path whose revisions declare unusable backfills
        or require backfills they cannot have (BadDeclaration, one line)."""
        for rev in path:
            rev.backfills  # noqa: B018 - reading it is the check
            self.required_backfills(rev)
