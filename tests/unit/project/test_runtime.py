"""Reading an Alembic project: heads, revisions, the upgrade path (files only, no database)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config import Target
from jobs.errors import BadDeclaration, ProjectError, RevisionError
from jobs.pg.url import parse as make_url
from jobs.project.runtime import Project
from tests.projects import Rev, trivial_history, write_project


def target_for(ini: Path) -> Target:
    return Target(
        name="t",
        url=make_url("postgresql+psycopg2://h/db"),
        alembic_ini=ini,
        backup_dir=ini.parent / "b",
    )


def test_upgrade_path_goes_up_one_revision_at_a_time(tmp_path: Path) -> None:
    project = Project(target_for(write_project(tmp_path, trivial_history(5))))
    assert project.head == "r0005"
    assert [r.id for r in project.upgrade_path(None, "r0005")] == [
        "r0001",
        "r0002",
        "r0003",
        "r0004",
        "r0005",
    ]
    assert [r.id for r in project.upgrade_path("r0002", project.resolve("head"))] == [
        "r0003",
        "r0004",
        "r0005",
    ]
    assert project.upgrade_path("r0003", "r0003") == []
    assert project.resolve("r0004") == "r0004"
    with pytest.raises(RevisionError, match="behind the current revision r0004"):
        project.upgrade_path("r0004", "r0002")
    with pytest.raises(RevisionError, match="unknown revision 'nope'"):
        project.resolve("nope")


def test_revision_attributes_verify_and_irreversible(tmp_path: Path) -> None:
    ini = write_project(
        tmp_path,
        [
            Rev("a", "pass", "op.execute('SELECT 1')", extra='verify = "SELECT true"'),
            Rev("b", "pass", extra='irreversible = "drops data"'),
            Rev("c", "pass", "pass"),
            Rev("d", "pass", "raise NotImplementedError('no way back')"),
        ],
    )
    project = Project(target_for(ini))
    assert project.revision("a").verify_check == "SELECT true"
    assert project.revision("a").irreversible is None
    assert project.revision("b").irreversible == "drops data"
    assert project.revision("b").declared_irreversible == "drops data"
    assert project.revision("c").irreversible == "its downgrade() does nothing"
    assert project.revision("c").declared_irreversible is None
    assert project.revision("d").irreversible == "its downgrade() raises NotImplementedError"


def test_several_heads_are_refused(tmp_path: Path) -> None:
    ini = write_project(tmp_path, [Rev("a", "pass"), Rev("b", "pass"), Rev("c", "pass", down="a")])
    with pytest.raises(ProjectError, match="has 2 heads"):
        Project(target_for(ini))


DECLARES = 'backfills = [{"table": "t", "set": "v = 1", "where": "v IS NULL"}]'


@pytest.mark.parametrize(
    ("requires", "message"),
    [
        ('["b1"]', None),
        ('["b1", "nope"]', "requires the backfills of 'nope', which is not a known revision"),
        ('["b4"]', "requires the backfills of 'b4', which does not come before it"),
        ('["b2"]', "requires the backfills of 'b2', which declares no backfills"),
        ('"b1"', None),
        ("[1]", "requires_backfills must be a list of revision ids"),
    ],
)
def test_requires_backfills_names_an_earlier_revision_that_declares_some(
    tmp_path: Path, requires: str, message: str | None
) -> None:
    ini = write_project(
        tmp_path,
        [
            Rev("b1", "pass", extra=DECLARES),
            Rev("b2", "pass"),
            Rev("b3", "pass", extra=f"requires_backfills = {requires}"),
            Rev("b4", "pass", extra=DECLARES),
        ],
    )
    project = Project(target_for(ini))
    path = project.upgrade_path(None, "b4")
    if message is None:
        project.check_declarations(path)
        assert [d.revision for d in project.required_backfills(path[2])] == ["b1"]
        assert path[0].backfills[0].describe() == "t SET v = 1 WHERE v IS NULL"
        return
    with pytest.raises(BadDeclaration) as refused:
        project.check_declarations(path)
    assert str(refused.value).startswith("revision b3") and message in str(refused.value)


def test_the_project_reads_through_scripts_and_renders_offline(tmp_path: Path) -> None:
    from jobs.project import offline
    from jobs.project.scripts import Scripts

    target = target_for(write_project(tmp_path, trivial_history(2)))
    scripts = Scripts(target)
    project = Project(target)
    assert scripts.head == project.head == "r0002"
    assert [r.id for r in scripts.upgrade_path(None, "r0002")] == ["r0001", "r0002"]
    rev = project.revision("r0002")
    # The project's SQL is the offline module's, on the project's own (URL-rewritten) config.
    assert project.upgrade_sql(rev) == offline.upgrade_sql(project.scripts, rev)
