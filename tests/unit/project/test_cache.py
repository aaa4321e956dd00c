"""The parsed project kept once per process (jobs/project/cache.py): reused across targets,
each target's Config its own, read again when the files change (files only, no database)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.config import Target
from jobs.errors import ProjectError
from jobs.pg.url import parse as make_url
from jobs.project import cache
from jobs.project.runtime import Project
from tests.projects import Rev, trivial_history, write_project


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


def target(ini: Path, name: str = "t", db: str = "db") -> Target:
    return Target(
        name=name,
        url=make_url(f"postgresql+psycopg2://u:pw-{name}@h/{db}"),
        alembic_ini=ini,
        backup_dir=ini.parent / "b",
    )


def settle(root: Path) -> None:
    """Date every file of the project a minute back, as a deployed project is."""
    old = time.time() - 60
    for path in root.rglob("*"):
        os.utime(path, (old, old))


def project_of(tmp_path: Path, count: int = 3) -> Path:
    ini = write_project(tmp_path, trivial_history(count))
    settle(tmp_path)
    return ini


def test_two_targets_of_one_project_share_the_parsed_scripts(tmp_path: Path) -> None:
    ini = project_of(tmp_path)
    a, b = Project(target(ini, "a", "db_a")), Project(target(ini, "b", "db_b"))
    assert a.script is b.script
    assert a.revision("r0002").module is b.revision("r0002").module
    assert a.head == b.head == "r0003"


def test_each_target_keeps_its_own_config(tmp_path: Path) -> None:
    ini = project_of(tmp_path)
    a, b = Project(target(ini, "a", "db_a")), Project(target(ini, "b", "db_b"))
    assert a.config is not b.config
    assert "/db_a" in a.config.get_main_option("sqlalchemy.url", "")
    assert "/db_b" in b.config.get_main_option("sqlalchemy.url", "")
    a.config.attributes["connection"] = "a's connection"
    assert "connection" not in b.config.attributes
    # A third run of the same target parses its own Config again, not a's rewritten one.
    again = Project(target(ini, "c", "db_c"))
    assert "/db_c" in again.config.get_main_option("sqlalchemy.url", "")
    assert "/db_a" in a.config.get_main_option("sqlalchemy.url", "")


def test_an_added_edited_or_removed_revision_is_seen_by_the_next_project(
    tmp_path: Path,
) -> None:
    ini = project_of(tmp_path)
    versions = tmp_path / "migrations" / "versions"
    first = Project(target(ini))
    sha_before = first.revision("r0002").sha256

    write_project(tmp_path, trivial_history(4))  # adds r0004
    added = Project(target(ini))
    assert added.script is not first.script
    assert added.head == "r0004"

    settle(tmp_path)
    edited_file = versions / "r0002.py"
    edited_file.write_text(edited_file.read_text() + '\nirreversible = "drops t0002"\n')
    edited = Project(target(ini))
    assert edited.revision("r0002").irreversible == "drops t0002"
    assert edited.revision("r0002").sha256 != sha_before  # drift sees the edit at once

    settle(tmp_path)
    (versions / "r0004.py").unlink()
    assert Project(target(ini)).head == "r0003"


def test_an_edited_alembic_ini_is_seen_by_the_next_project(tmp_path: Path) -> None:
    ini = project_of(tmp_path)
    assert Project(target(ini)).head == "r0003"
    other = tmp_path / "other"
    write_project(other, [Rev("x1", "pass")])
    ini.write_text(ini.read_text().replace("%(here)s/migrations", "%(here)s/other/migrations"))
    settle(tmp_path)
    assert Project(target(ini)).head == "x1"


def test_a_project_written_just_now_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rewritten within the filesystem's timestamp tick at the same size, a file's stamp may
    # not change: a recent project is not trusted. (No .pyc: Python's own check of a cached
    # bytecode file has a one-second granularity, which this test is not about.)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    ini = write_project(tmp_path, [Rev("a", "pass", extra='irreversible = "one"')])
    first = Project(target(ini))
    assert first.revision("a").irreversible == "one"
    path = tmp_path / "migrations" / "versions" / "a.py"
    stat = path.stat()
    path.write_text(path.read_text().replace('"one"', '"two"'))  # the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    assert Project(target(ini)).revision("a").irreversible == "two"


def test_a_broken_history_is_refused_each_time_and_read_again_once_fixed(
    tmp_path: Path,
) -> None:
    ini = write_project(tmp_path, [Rev("a", "pass"), Rev("b", "pass"), Rev("c", "pass", down="a")])
    settle(tmp_path)
    for _ in range(2):
        with pytest.raises(ProjectError, match="has 2 heads"):
            Project(target(ini))
    (tmp_path / "migrations" / "versions" / "c.py").unlink()
    assert Project(target(ini)).head == "b"


def test_threads_loading_one_project_at_once_share_one_load(tmp_path: Path) -> None:
    ini = project_of(tmp_path, count=30)
    found: list[object] = []
    start = threading.Barrier(8)

    def load(i: int) -> None:
        start.wait()
        found.append(Project(target(ini, f"t{i}")).script)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 8
    assert len({id(script) for script in found}) == 1


def test_reloads_do_not_grow_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    ini = write_project(tmp_path, trivial_history(2))
    ini.write_text(ini.read_text() + "prepend_sys_path = .\npath_separator = os\n")
    Project(target(ini))
    before = list(sys.path)
    for _ in range(5):  # a project written just now: read again every time
        Project(target(ini))
    assert sys.path == before
    assert str(tmp_path.resolve()) in sys.path
