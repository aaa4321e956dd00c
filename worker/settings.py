"""The worker's configuration: runbook.toml read again on every task (a test, or an
operator, edits it while the worker runs), but parsed again only when the file or the
environment changed. Parsing is most of the cost: 64 ms a task for a file of 1,000 targets,
a fleet's size, against a stat and a hash here."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from jobs.config import Settings, load_settings

_lock = threading.Lock()
_cached: tuple[object, Settings] | None = None


def _key() -> object:
    """What the settings depend on: the file's identity and every environment variable
    (url_env, the broker, the queue)."""
    path = Path(os.environ.get("RUNBOOK_CONFIG") or "runbook.toml").expanduser()
    try:
        st = path.stat()
        stamp: object = (str(path.absolute()), st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (str(path), None)
    return (stamp, hash(frozenset(os.environ.items())))


def current() -> Settings:
    """load_settings(), parsed again only when its inputs changed."""
    global _cached
    key = _key()
    with _lock:
        if _cached is not None and _cached[0] == key:
            return _cached[1]
    settings = load_settings()
    with _lock:
        _cached = (key, settings)
    return settings
