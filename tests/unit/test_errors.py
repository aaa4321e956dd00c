"""Every exception runbook defines lives in jobs/errors.py, under RunbookError (or is
documented there as control flow), with a one-line "Raised when" docstring."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import jobs
from jobs import errors

ROOT = Path(jobs.__file__).parent.parent
# Raised to steer a delivery, not to report a failure: kept out of RunbookError on purpose.
CONTROL_FLOW = {errors.AwaitingBackfill}


def _defined_here() -> list[type[BaseException]]:
    return [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if obj.__module__ == errors.__name__ and issubclass(obj, BaseException)
    ]


def test_every_exception_of_jobs_is_defined_in_jobs_errors() -> None:
    strays = []
    for info in pkgutil.walk_packages(jobs.__path__, "jobs."):
        if info.name == errors.__name__:
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
            ):
                strays.append(f"{info.name}.{name}")
    assert strays == []


def test_worker_defines_no_exception() -> None:
    # worker/ imports Celery; read it instead of importing it.
    exception_names = {cls.__name__ for cls in _defined_here()} | {"Exception", "BaseException"}
    strays = []
    for path in sorted((ROOT / "worker").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
                if bases & exception_names or any(
                    b.endswith(("Error", "Exception")) for b in bases
                ):
                    strays.append(f"{path.name}:{node.name}")
    assert strays == []


def test_every_error_derives_from_runbook_error_or_is_control_flow() -> None:
    classes = _defined_here()
    assert len(classes) > 30
    for cls in classes:
        if cls in CONTROL_FLOW:
            assert not issubclass(cls, errors.RunbookError)
            assert "Control flow" in (cls.__doc__ or ""), cls
        else:
            assert issubclass(cls, errors.RunbookError), cls


def test_every_error_says_when_it_is_raised_in_one_line() -> None:
    for cls in _defined_here():
        doc = inspect.getdoc(cls) or ""
        first = doc.splitlines()[0] if doc else ""
        assert first.startswith("Raised when "), cls
        assert len(first) <= 100, cls
        if cls not in CONTROL_FLOW:  # control flow also says why it is not an error
            assert doc == first, f"{cls.__name__}: one line"


def test_exit_codes_are_kept() -> None:
    assert errors.RunbookError.exit_code == 2
    assert errors.StepFailed.exit_code == errors.PreflightFailed.exit_code == 1
    assert errors.HookFailed.exit_code == errors.BackfillInterrupted.exit_code == 1
    assert errors.DemoError.exit_code == 1 and errors.DemoSetupError.exit_code == 2
    assert errors.UnsafeSql.exit_code == errors.RestoreError.exit_code == 2
