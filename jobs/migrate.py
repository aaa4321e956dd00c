"""Driving an Alembic project through its Python API, one revision at a time.

A project is loaded once per run (alembic.ini and the script directory); each upgrade or
downgrade runs the project's own env.py on a connection runbook hands it through
``config.attributes["connection"]`` (the Alembic cookbook's way) and, for env.py files that
build their own engine (sync or async), through ``sqlalchemy.url`` with the project's own
driver and the same session settings (jobs/envpy.py).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import io
import logging.config
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import ProgrammingError

from jobs import db, envpy
from jobs.config import Target, redact
from jobs.errors import BadDeclaration, ProjectError, RevisionError, RunbookError
from jobs.lazy import lazy

if TYPE_CHECKING:
    from jobs import sqlguard
    from jobs.backfill import Spec
else:
    sqlguard = lazy("jobs.sqlguard")  # pglast, for declared backfills only

log = logging.getLogger("runbook.migrate")

LOCK_NOT_AVAILABLE = "55P03"
UNDEFINED_TABLE = "42P01"
INSUFFICIENT_PRIVILEGE = "42501"
MAX_BACKOFF_S = 10.0

# Set in config.attributes whenever runbook drives a migration. A revision that declares
# ``backfills`` and also runs the same loop inline (for plain ``alembic upgrade``) checks it
# and leaves the work to runbook, which runs the declared backfill right after upgrade().
RUNS_DECLARED_BACKFILLS = "runbook_runs_declared_backfills"
BACKFILL_FIELDS = ("table", "set", "where", "key", "batch_size", "slices", "on_error")


@contextmanager
def _keep_logging() -> Iterator[None]:
    """Stop a project's env.py ``fileConfig()`` from tearing down the worker's logging."""
    original = logging.config.fileConfig
    logging.config.fileConfig = lambda *a, **k: None
    try:
        yield
    finally:
        logging.config.fileConfig = original


def _missing_module(exc: BaseException) -> str | None:
    """The database driver a ModuleNotFoundError in ``exc``'s chain names, else None (a
    missing module of the project's own is its own error, left as it is)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ModuleNotFoundError) and cur.name:
            top = cur.name.split(".")[0]
            if top in envpy.DRIVERS:
                return top
        cur = cur.__cause__ or cur.__context__
    return None


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE behind an exception, looking through SQLAlchemy and Alembic wrappers."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code = getattr(getattr(cur, "orig", None), "pgcode", None) or getattr(cur, "pgcode", None)
        if code:
            return str(code)
        cur = cur.__cause__ or cur.__context__
    return None


def describe(exc: BaseException) -> str:
    """One redacted line for an exception raised by a migration."""
    if isinstance(exc, RunbookError):  # already one line for an operator
        return redact(str(exc))
    if isinstance(exc, NotImplementedError):
        msg = str(exc) or "downgrade raises NotImplementedError"
        return redact(f"NotImplementedError: {msg}")
    orig = getattr(exc, "orig", None)
    text_ = str(orig if orig is not None else exc).strip()
    line = text_.splitlines()[0] if text_ else ""
    return redact(f"{type(orig or exc).__name__}: {line}".rstrip(": "))


@dataclass(frozen=True)
class DeclaredBackfill:
    """One entry of a revision's module-level ``backfills``, checked like an operator's
    ``runbook backfill`` (jobs/sqlguard.py): SET and WHERE deparsed, names quoted."""

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
        from jobs.backfill import Spec  # jobs.backfill imports this module

        return Spec(
            table=self.table,
            key=key,
            set_sql=self.set_sql,
            where_sql=self.where_sql,
            batch_size=self.batch_size,
            min_batch=min(100, self.batch_size),
            max_batch=max(50000, self.batch_size),
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
    except sqlguard.UnsafeSql as exc:
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


class Project:
    """An Alembic project on disk, as seen by one run."""

    def __init__(self, target: Target) -> None:
        self.target = target
        ini = target.alembic_ini
        if not ini.is_file():
            raise ProjectError(
                f"target {target.name!r}: alembic.ini not found at {ini}; set alembic_ini "
                "in runbook.toml to your project's alembic.ini"
            )
        self.config = Config(str(ini))
        _prepend_sys_path(self.config, ini.parent)
        location = self.config.get_main_option("script_location")
        if not location:
            raise ProjectError(f"{ini}: no script_location in [alembic]; point it at migrations/")
        try:
            self.script = ScriptDirectory.from_config(self.config)
        except CommandError as exc:
            raise ProjectError(
                f"{ini}: script directory {location!r} cannot be used ({exc}); fix script_location"
            ) from None
        try:
            heads = self.script.get_heads()
        except CommandError as exc:
            raise ProjectError(f"{ini}: the revision history is broken ({exc})") from None
        except Exception as exc:  # a revision file that does not import
            raise ProjectError(
                f"{ini}: a revision file cannot be loaded ({describe(exc)})"
            ) from None
        if len(heads) > 1:
            raise ProjectError(
                f"the Alembic history has {len(heads)} heads ({', '.join(sorted(heads))}); "
                "merge them with `alembic merge heads` before applying"
            )
        self.head = heads[0] if heads else None
        self._conn: Connection | None = None
        self._engine: Engine | None = None
        # For env.py files that build their own engine: the target's URL with the driver the
        # project names (asyncpg for an async env.py); session settings come at connect time.
        try:
            ini_url = self.config.get_main_option("sqlalchemy.url")
        except Exception:  # an interpolation alembic.ini cannot fill
            ini_url = None
        self.driver = envpy.project_driver(ini_url)
        raw = envpy.project_url(target, self.driver).render_as_string(hide_password=False)
        self.config.set_main_option("sqlalchemy.url", raw.replace("%", "%%"))

    @contextmanager
    def environment(self, *, read_only: bool = False) -> Iterator[None]:
        """Around one ``run_env()``: worker logging kept, runbook's session settings on every
        connection env.py opens itself, and a refusal or a missing driver said in one line."""
        with _keep_logging(), envpy.rules(self.target, read_only=read_only) as refused:
            try:
                yield
            except Exception as exc:
                if refused:
                    raise ProjectError(refused[0]) from None
                missing = _missing_module(exc)
                if missing is not None:
                    raise ProjectError(
                        f"target {self.target.name!r}: the project's env.py needs the driver "
                        f"{missing!r}, which this Python cannot import; install it where "
                        f"runbook runs (pip install {missing})"
                    ) from None
                raise

    # -- revisions ---------------------------------------------------------------------------

    def _script(self, rev: str) -> Script:
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
        s = self._script(rev)
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
        return self._script(resolved).revision

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

    # -- the database ------------------------------------------------------------------------

    def current(self, conn: Connection) -> str | None:
        """The revision the database is at (None for an empty history)."""
        table = conn.dialect.identifier_preparer.quote(self.target.version_table)
        try:
            heads = list(conn.execute(text(f"SELECT version_num FROM {table}")).scalars())
        except ProgrammingError as exc:
            if sqlstate(exc) == INSUFFICIENT_PRIVILEGE:
                raise ProjectError(
                    f"target {self.target.name!r}: role {self.target.url.username} may not read "
                    f"{self.target.version_table} (permission denied); use the role that owns "
                    "the schema"
                ) from None
            if sqlstate(exc) != UNDEFINED_TABLE:
                raise
            heads = []  # no upgrade ever ran
        finally:
            if conn.in_transaction():
                conn.rollback()
        if len(heads) > 1:
            raise RevisionError(
                f"the database records {len(heads)} revisions ({', '.join(heads)}); "
                "runbook applies linear histories only"
            )
        rev = heads[0] if heads else None
        if rev is not None:
            try:
                self._script(rev)
            except RevisionError:
                raise RevisionError(
                    f"the database is at revision {rev!r}, which the scripts do not know "
                    "(broken history); check out the matching code or `alembic stamp` it"
                ) from None
        return rev

    def _connection(self) -> Connection:
        """The run's migration connection (with lock_timeout), opened once and reused."""
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            if self._engine is None:
                self._engine = db.pooled_engine(self.target)
            self._conn = self._engine.connect()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()  # no idle connection outlives the run
            self._engine = None

    def stamp(self, revision: str | None) -> None:
        """``alembic stamp --purge``: record ``revision`` without running migrations. Purge,
        because the usual reason to stamp is a version table holding an unknown revision."""
        script = self.script
        destination = revision or "base"

        def plan(heads: Any, _context: Any) -> Any:
            return script._stamp_revs((destination,), heads)

        conn = self._connection()
        self.config.attributes["connection"] = conn
        try:
            with (
                self.environment(),
                EnvironmentContext(
                    self.config, script, fn=plan, destination_rev=(destination,), purge=True
                ),
            ):
                script.run_env()
            if conn.in_transaction():
                conn.commit()
        finally:
            self.config.attributes.pop("connection", None)

    def recorded(self, conn: Connection) -> list[str]:
        """The version table's rows as they are, known to the scripts or not."""
        table = conn.dialect.identifier_preparer.quote(self.target.version_table)
        try:
            return [
                str(v) for v in conn.execute(text(f"SELECT version_num FROM {table}")).scalars()
            ]
        except ProgrammingError:
            return []
        finally:
            if conn.in_transaction():
                conn.rollback()

    def _run(self, destination: str, upgrade: bool) -> None:
        """What ``alembic.command.upgrade`` / ``downgrade`` do, on the already loaded script
        directory: the command functions would re-read every revision file per revision."""
        script = self.script

        def plan(heads: Any, _context: Any) -> Any:
            if upgrade:
                return script._upgrade_revs(destination, heads)
            return script._downgrade_revs(destination, heads)

        conn = self._connection()
        self.config.attributes["connection"] = conn
        self.config.attributes[RUNS_DECLARED_BACKFILLS] = True
        try:
            with (
                self.environment(),
                EnvironmentContext(self.config, script, fn=plan, destination_rev=destination),
            ):
                script.run_env()
            if conn.in_transaction():
                conn.commit()
        except BaseException:
            if not conn.closed and not conn.invalidated and conn.in_transaction():
                conn.rollback()
            raise
        finally:
            self.config.attributes.pop("connection", None)
            self.config.attributes.pop(RUNS_DECLARED_BACKFILLS, None)

    def upgrade_sql(self, rev: Revision, *, as_runbook_runs_it: bool = False) -> str:
        """The SQL ``rev``'s upgrade would run, rendered offline (no database touched): as
        plain ``alembic upgrade --sql`` shows it, or (``as_runbook_runs_it``) without the
        inline loop of a revision whose declared backfills runbook runs itself."""
        return self._render(rev, upgrade=True, as_runbook_runs_it=as_runbook_runs_it)

    def upgrade_range_sql(self, path: list[Revision], *, as_runbook_runs_it: bool = False) -> str:
        """The SQL of every revision of ``path`` (oldest first, consecutive), rendered
        offline in one run of env.py, as ``upgrade_sql`` renders each."""
        span = dataclasses.replace(path[-1], down=path[0].down)
        return self._render(span, upgrade=True, as_runbook_runs_it=as_runbook_runs_it)

    def downgrade_sql(self, rev: Revision) -> str:
        """The SQL ``rev``'s downgrade would run, rendered offline (no database touched)."""
        return self._render(rev, upgrade=False)

    def _render(self, rev: Revision, *, upgrade: bool, as_runbook_runs_it: bool = False) -> str:
        """One revision's SQL in Alembic's offline (``--sql``) mode; RevisionError when the
        revision cannot be rendered without a database (it reads data, say)."""
        script = self.script
        start, destination = (rev.down, rev.id) if upgrade else (rev.id, rev.down or "base")
        buffer = io.StringIO()

        def plan(heads: Any, _context: Any) -> Any:
            if upgrade:
                return script._upgrade_revs(destination, heads)
            return script._downgrade_revs(destination, heads)

        self.config.attributes.pop("connection", None)
        self.config.attributes[RUNS_DECLARED_BACKFILLS] = as_runbook_runs_it
        try:
            with (
                _keep_logging(),
                EnvironmentContext(
                    self.config,
                    script,
                    fn=plan,
                    as_sql=True,
                    starting_rev=start,
                    destination_rev=destination,
                    output_buffer=buffer,
                ),
            ):
                script.run_env()
        except Exception as exc:
            which = "upgrade" if upgrade else "downgrade"
            raise RevisionError(
                f"cannot render the {which} of {rev.id} offline ({describe(exc)})"
            ) from None
        finally:
            self.config.attributes.pop(RUNS_DECLARED_BACKFILLS, None)
        return buffer.getvalue()

    def upgrade_one(self, rev: Revision) -> None:
        self._run(rev.id, upgrade=True)

    def downgrade_one(self, rev: Revision) -> None:
        self._run(rev.down or "base", upgrade=False)


def with_lock_retries(
    target: Target,
    action: Callable[[], None],
    on_retry: Callable[[int, str, float], None],
) -> None:
    """Run ``action``; on a lock timeout (SQLSTATE 55P03) retry with exponential backoff.

    Like GitLab's and pgroll's lock retries: each attempt waits at most ``lock_timeout`` for
    its locks, so production queries are never queued behind our DDL for longer than that.
    """
    attempt = 0
    while True:
        try:
            action()
            return
        except Exception as exc:
            if sqlstate(exc) != LOCK_NOT_AVAILABLE or attempt >= target.lock_retries:
                raise
            attempt += 1
            delay = min(target.lock_retry_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
            on_retry(attempt, describe(exc), delay)
            log.warning(
                "target %s: lock timeout (attempt %d of %d); retrying in %.1fs",
                target.name,
                attempt,
                target.lock_retries,
                delay,
            )
            time.sleep(delay)
