"""Running an Alembic project's revisions through its Python API, one revision at a time.

A project's revisions are read once per process and its alembic.ini once per run
(jobs/project/scripts.py, jobs/project/cache.py); each upgrade or downgrade runs the
project's own env.py on a connection runbook hands it through
``config.attributes["connection"]`` (the Alembic cookbook's way) and, for env.py files that
build their own engine (sync or async), through ``sqlalchemy.url`` with the project's own
driver and the same session settings (jobs/project/envpy.py). Rendering a revision's SQL
without a database is jobs/project/offline.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from alembic.runtime.environment import EnvironmentContext
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import ProgrammingError

from jobs.config import Target
from jobs.errors import ProjectError, RevisionError
from jobs.pg import db
from jobs.pg.sqlstate import INSUFFICIENT_PRIVILEGE, UNDEFINED_TABLE, sqlstate
from jobs.project import envpy, offline
from jobs.project.scripts import RUNS_DECLARED_BACKFILLS, DeclaredBackfill, Revision, Scripts


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


class Project:
    """An Alembic project on disk, as seen by one run: its scripts (``scripts``: revisions
    shared with the process's other runs, an alembic Config of its own), run online here and
    rendered offline by jobs/project/offline.py.

    One object rather than two for its callers, because every one of them both reads
    revisions and runs or renders them for the same target, and both halves share one
    alembic Config: its ``sqlalchemy.url`` is rewritten for env.py, and its attributes carry
    the connection and the RUNS_DECLARED_BACKFILLS flag to env.py.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.scripts = Scripts(target)
        self.config, self.script, self.head = (
            self.scripts.config,
            self.scripts.script,
            self.scripts.head,
        )
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
        with envpy.keep_logging(), envpy.rules(self.target, read_only=read_only) as refused:
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

    # -- reading the scripts (jobs/project/scripts.py) ---------------------------------------

    def revision(self, rev: str) -> Revision:
        return self.scripts.revision(rev)

    def resolve(self, spec: str) -> str | None:
        """A full revision id for ``spec`` (``head``, ``base``, an id or a unique prefix)."""
        return self.scripts.resolve(spec)

    def upgrade_path(self, current: str | None, to: str | None) -> list[Revision]:
        """Revisions to apply, oldest first, from ``current`` up to ``to``."""
        return self.scripts.upgrade_path(current, to)

    def required_backfills(self, rev: Revision) -> list[DeclaredBackfill]:
        """The declared backfills ``rev`` requires finished."""
        return self.scripts.required_backfills(rev)

    def check_declarations(self, path: list[Revision]) -> None:
        """BadDeclaration, before anything runs, for a path with unusable declarations."""
        self.scripts.check_declarations(path)

    # -- rendering offline (jobs/project/offline.py) -----------------------------------------

    def upgrade_sql(self, rev: Revision, *, as_runbook_runs_it: bool = False) -> str:
        """The SQL ``rev``'s upgrade would run, rendered offline (no database touched)."""
        return offline.upgrade_sql(self.scripts, rev, as_runbook_runs_it=as_runbook_runs_it)

    def upgrade_range_sql(self, path: list[Revision], *, as_runbook_runs_it: bool = False) -> str:
        """The SQL of every revision of ``path``, rendered offline in one run of env.py."""
        return offline.upgrade_range_sql(self.scripts, path, as_runbook_runs_it=as_runbook_runs_it)

    def downgrade_sql(self, rev: Revision) -> str:
        """The SQL ``rev``'s downgrade would run, rendered offline (no database touched)."""
        return offline.downgrade_sql(self.scripts, rev)

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
                self.scripts.script_of(rev)
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

    def upgrade_one(self, rev: Revision) -> None:
        self._run(rev.id, upgrade=True)

    def downgrade_one(self, rev: Revision) -> None:
        self._run(rev.down or "base", upgrade=False)
