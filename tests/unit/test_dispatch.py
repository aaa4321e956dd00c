"""jobs/ talks to the queue through jobs/dispatch.py only: importing any module of it loads
neither Celery nor kombu, and worker/dispatcher.py is the implementation it names."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import jobs
from jobs import dispatch

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import jobs
names = [m.name for m in pkgutil.walk_packages(jobs.__path__, "jobs.")]
for name in names:
    importlib.import_module(name)
queue = sorted({m.split(".")[0] for m in sys.modules} & {"celery", "kombu"})
print(json.dumps({"modules": names, "queue": queue}))
"""


def test_no_module_of_jobs_imports_celery_or_kombu() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    # The walk saw the packages at all (the API, the CLI, the demo, the run's coordinator).
    assert {"jobs.api.common", "jobs.cli.demo", "jobs.run.coordinator"} <= set(found["modules"])
    assert found["queue"] == []


def _imported_names(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_of_jobs_imports_celery_or_kombu_even_on_first_use() -> None:
    """Nor later, inside a function (how the old jobs/api/common.py reached kombu); the
    worker package only for `runbook worker`'s supervisor, which runs Celery as a child."""
    root = Path(jobs.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        names = _imported_names(path)
        queue = {n for n in names if n.split(".")[0] in ("celery", "kombu")}
        workers = {n for n in names if n.split(".")[0] == "worker"} - {"worker", "worker.supervise"}
        if queue or workers:
            found[str(path.relative_to(root))] = sorted(queue | workers)
    assert found == {}, found


def test_the_worker_dispatcher_is_the_one_jobs_names_and_has_every_method() -> None:
    from worker.dispatcher import CeleryDispatcher

    assert dispatch.IMPLEMENTATION == "worker.dispatcher:CeleryDispatcher"
    made = dispatch.connect("redis://127.0.0.1:1/0", "q")  # nothing is sent: no broker asked
    assert isinstance(made, CeleryDispatcher)
    assert isinstance(made, dispatch.Dispatcher)
    wanted = {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(dispatch.Dispatcher, inspect.isfunction)
        if not name.startswith("_")
    }
    assert {"check_broker", "send_run", "send_slice"} <= set(wanted)
    for name, signature in wanted.items():
        have = inspect.signature(getattr(CeleryDispatcher, name))
        assert list(have.parameters) == list(signature.parameters), name


def test_the_broker_url_is_shown_without_its_password() -> None:
    made = dispatch.connect("redis://:hunter2@127.0.0.1:1/0", "q")
    assert "hunter2" not in made.safe_url()
    assert "127.0.0.1:1" in made.safe_url()
