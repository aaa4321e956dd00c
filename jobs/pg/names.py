"""Table names as an operator types them: ``name`` or ``schema.name``."""

from __future__ import annotations

# The schema of a table named without one, as a fresh database's search_path resolves it
# and as pg_dump's table of contents names it.
DEFAULT_SCHEMA = "public"


def qualified(table: str) -> str:
    """``schema.name`` for ``name`` (in DEFAULT_SCHEMA) or ``schema.name`` as given."""
    return table if "." in table else f"{DEFAULT_SCHEMA}.{table}"
