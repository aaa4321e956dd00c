"""Rendering a project's revisions as SQL, in Alembic's offline (``--sql``) mode: no database
is touched. The project is read by jobs/project/scripts.py; jobs/project/runtime.py runs it.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

from alembic.runtime.environment import EnvironmentContext

from jobs.errors import UnrenderableRevision
from jobs.pg.sqlstate import describe
from jobs.project import envpy
from jobs.project.scripts import RUNS_DECLARED_BACKFILLS, Revision, Scripts


def upgrade_sql(scripts: Scripts, rev: Revision, *, as_runbook_runs_it: bool = False) -> str:
    """The SQL ``rev``'s upgrade would run: as plain ``alembic upgrade --sql`` shows it, or
    (``as_runbook_runs_it``) without the inline loop of a revision whose declared backfills
    runbook runs itself."""
    return _render(scripts, rev, upgrade=True, as_runbook_runs_it=as_runbook_runs_it)


def upgrade_range_sql(
    scripts: Scripts, path: list[Revision], *, as_runbook_runs_it: bool = False
) -> str:
    """The SQL of every revision of ``path`` (oldest first, consecutive), rendered in one
    run of env.py, as ``upgrade_sql`` renders each."""
    span = dataclasses.replace(path[-1], down=path[0].down)
    return _render(scripts, span, upgrade=True, as_runbook_runs_it=as_runbook_runs_it)


def downgrade_sql(scripts: Scripts, rev: Revision) -> str:
    """The SQL ``rev``'s downgrade would run."""
    return _render(scripts, rev, upgrade=False)


def _render(
    scripts: Scripts, rev: Revision, *, upgrade: bool, as_runbook_runs_it: bool = False
) -> str:
    """One revision's SQL in Alembic's offline (``--sql``) mode; UnrenderableRevision when the
    revision cannot be rendered without a database (it reads data, say)."""
    config, script = scripts.config, scripts.script
    start, destination = (rev.down, rev.id) if upgrade else (rev.id, rev.down or "base")
    buffer = io.StringIO()

    def plan(heads: Any, _context: Any) -> Any:
        if upgrade:
            return script._upgrade_revs(destination, heads)
        return script._downgrade_revs(destination, heads)

    config.attributes.pop("connection", None)
    config.attributes[RUNS_DECLARED_BACKFILLS] = as_runbook_runs_it
    try:
        with (
            envpy.keep_logging(),
            EnvironmentContext(
                config,
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
        raise UnrenderableRevision(
            f"cannot render the {which} of {rev.id} offline ({describe(exc)})"
        ) from None
    finally:
        config.attributes.pop(RUNS_DECLARED_BACKFILLS, None)
    return buffer.getvalue()
