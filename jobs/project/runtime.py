"""Driving an Alembic project through its Python API, one revision at a time.

A project is loaded once per run (alembic.ini and the script directory); each upgrade or
downgrade runs the project's own env.py on a connection runbook hands it through
``config.attributes["connection"]`` (the Alembic cookbook's way) and, for env.py files that
build their own engine (sync or async), through ``sqlalchemy.url`` with the project's own
driver and the same session settings (jobs/envpy.py).
"""

from __future__ import annotations

import dataclasses
import io
import logging.config
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import ProgrammingError

from jobs.config import Target
from jobs.errors import BadDeclaration, ProjectError, RevisionError
from jobs.pg import db
from jobs.pg.sqlstate import describe, sqlstate
from jobs.project import envpy

if TYPE_CHECKING:
    pass
from jobs.pg.sqlstate import INSUFFICIENT_PRIVILEGE, LOCK_NOT_AVAILABLE, UNDEFINED_TABLE
from jobs.project.scripts import RUNS_DECLARED_BACKFILLS, DeclaredBackfill, Revision

log = logging.getLogger("runbook.migrate")
MAX_BACKOFF_S = 10.0


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
