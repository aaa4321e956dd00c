"""Modules imported on first use, so that a command loads only what it runs.

``runbook --help`` must not pay for SQLAlchemy, Alembic, pglast, boto3, Celery or rich, and
``runbook status`` only for what reading the ledger needs (tests/unit/test_cli_imports.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for module ``name``; the first attribute read imports it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


def lazy(name: str) -> Any:
    """A stand-in for module ``name`` (typed Any: declare the real module under
    TYPE_CHECKING for mypy)."""
    return LazyModule(name)


def lazy_callable(module: str, name: str) -> Any:
    """``module.name`` (a function or class), imported on the first call."""
    found: list[Any] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not found:
            found.append(getattr(importlib.import_module(module), name))
        return found[0](*args, **kwargs)

    call.__name__ = name
    return call
