"""Which revision's code raised, read from the traceback of the error Alembic wrapped; the
revisions are real files of an Alembic project (no database)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from jobs.config import Target
from jobs.pg.url import parse as make_url
from jobs.project.runtime import Project
from jobs.run.coordinator import _failing_revision
from tests.projects import Rev, write_project


def project(tmp_path: Path) -> Project:
    ini = write_project(
        tmp_path,
        [Rev("a", "pass"), Rev("b", "raise ZeroDivisionError('in b')"), Rev("c", "pass")],
    )
    return Project(
        Target(
            name="t",
            url=make_url("postgresql+psycopg2://h/db"),
            alembic_ini=ini,
            backup_dir=tmp_path / "b",
        )
    )


def raised_by(call: Callable[[], object]) -> BaseException:
    """What ``call()`` raises, wrapped as a caller wraps it (``raise … from``)."""
    try:
        try:
            call()
        except Exception as exc:
            raise RuntimeError("upgrade failed") from exc
    except RuntimeError as wrapped:
        return wrapped
    raise AssertionError("nothing was raised")


def test_the_revision_whose_code_raised_is_found(tmp_path: Path) -> None:
    p = project(tmp_path)
    path = p.upgrade_path(None, "c")
    assert _failing_revision(raised_by(p.revision("b").module.upgrade), path) == 1
    assert _failing_revision(raised_by(p.revision("b").module.upgrade), path[2:]) is None


def test_an_error_raised_outside_the_revisions_names_none(tmp_path: Path) -> None:
    path = project(tmp_path).upgrade_path(None, "c")
    assert _failing_revision(raised_by(lambda: 1 / 0), path) is None
    assert _failing_revision(RuntimeError("no cause"), path) is None
