"""Parsed Alembic projects kept once per process, keyed by alembic.ini's absolute path.

A fleet rollout runs one ordinary run per member database, thousands of them in one worker
process, all against the same project: reading every revision file once per run is most of
what building a Project costs (jobs/project/scripts.py), and Alembic's ``from_config`` also
prepends the project's ``prepend_sys_path`` to sys.path every time it is called. Only what
does not depend on the target is kept here (the ScriptDirectory with its revision map and
the head); each run still gets its own alembic Config, which it rewrites for its target.

An entry is used again only while a stamp of the project's files (alembic.ini and every
file under the version locations: mtime_ns, size, inode, and which files there are) is
unchanged, so an added, edited or removed revision, or an edited alembic.ini, is read by the
next run. A file modified within ``RACY_WINDOW_NS`` of the stamp could be edited again
within the filesystem's timestamp granularity without its stamp changing, so an entry
holding such a file is not trusted: the next run reads the project again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from alembic.script import ScriptDirectory

# Coarse filesystems (FAT, some network mounts) keep 2 s timestamps; the kernel's own clock
# ticks every few milliseconds. Older files are settled: an edit changes their stamp.
RACY_WINDOW_NS = 2_000_000_000
MAX_PROJECTS = 32  # distinct alembic.ini files kept; a worker usually serves one or a few

FileStamp = tuple[int, int, int] | None  # (mtime_ns, size, inode); None: the path is missing
Stamp = tuple[FileStamp, tuple[tuple[str, tuple[tuple[str, FileStamp], ...] | None], ...]]


@dataclass(frozen=True)
class Parsed:
    """A project's target-independent half: its script directory, read, and its head."""

    script: ScriptDirectory
    head: str | None
    locations: tuple[Path, ...]
    stamp: Stamp
    settled: bool  # no stamped file is recent enough to be edited unseen


_CACHE: dict[Path, Parsed] = {}
# The reconciler thread and task threads share one process: one load per project at a time.
_LOCK = threading.Lock()


def _file_stamp(path: Path | str) -> FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _tree(location: Path) -> tuple[tuple[str, FileStamp], ...] | None:
    """Every file under ``location`` (relative name, stamp), sorted; None when it is missing.
    Walks subfolders whatever ``recursive_version_locations`` says: a needless reload is
    harmless. ``__pycache__`` is left out: Python writes it while the revisions load."""
    if not location.is_dir():
        return None
    found: list[tuple[str, FileStamp]] = []
    for folder, subfolders, files in os.walk(location):
        subfolders[:] = [name for name in subfolders if name != "__pycache__"]
        for name in files:
            path = os.path.join(folder, name)
            found.append((os.path.relpath(path, location), _file_stamp(path)))
    return tuple(sorted(found))


def stamp(ini: Path, locations: Iterable[Path]) -> Stamp:
    """What the project's files look like on disk now, cheaply (stat calls only)."""
    return (_file_stamp(ini), tuple((str(loc), _tree(loc)) for loc in locations))


def _settled(value: Stamp, now_ns: int) -> bool:
    ini, trees = value
    stamps = [ini] + [s for _, tree in trees for _, s in tree or ()]
    return all(s is None or s[0] < now_ns - RACY_WINDOW_NS for s in stamps)


def parsed(
    ini: Path,
    script_directory: Callable[[], ScriptDirectory],
    head_of: Callable[[ScriptDirectory], str | None],
) -> Parsed:
    """The project of ``ini`` (an absolute path: ``%(here)s`` is its folder, so two paths to
    one file may be two projects), read again only when its files changed on disk.

    ``script_directory`` builds the (lazy) ScriptDirectory; ``head_of`` reads every revision
    and returns the one head, raising ProjectError for a broken history, which is not kept.
    """
    key = Path(os.path.abspath(ini))
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry.settled and stamp(key, entry.locations) == entry.stamp:
            return entry
        _CACHE.pop(key, None)
        script = script_directory()
        locations = tuple(script._version_locations)
        # Stamped before the files are read: an edit made while they load changes the stamp.
        now_ns = time.time_ns()
        before = stamp(key, locations)
        entry = Parsed(script, head_of(script), locations, before, _settled(before, now_ns))
        if len(_CACHE) >= MAX_PROJECTS:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = entry
        return entry


def clear() -> None:
    """Forget every parsed project (tests, benchmarks)."""
    with _LOCK:
        _CACHE.clear()
