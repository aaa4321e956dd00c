"""Revisions without an Alembic project: the offline SQL Alembic renders for one, and a
Revision built around a bare module (for the declarations runbook reads from it)."""

from __future__ import annotations

import types

from jobs.project.scripts import Revision


def framed(*statements: str, before: str = "a", after: str = "b") -> str:
    """One revision as Alembic's offline mode renders it (transaction_per_migration)."""
    body = "\n\n".join(f"{s};" for s in statements)
    return (
        f"BEGIN;\n\n-- Running upgrade {before} -> {after}\n\n{body}\n\n"
        f"UPDATE alembic_version SET version_num='{after}' "
        f"WHERE alembic_version.version_num = '{before}';\n\nCOMMIT;\n\n"
    )


def revision_with(**attrs: object) -> Revision:
    """Revision r1 whose module has ``attrs`` as its module-level names."""
    module = types.ModuleType("rev")
    for key, value in attrs.items():
        setattr(module, key, value)
    return Revision(id="r1", down=None, message="m", path="/nowhere.py", module=module)
