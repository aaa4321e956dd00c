"""Fleets for the rollout tests: a group of member databases running one small Alembic
project, made from a template database (quick: a dozen members in well under a second each).
The control database they need is the ``control_db`` fixture of conftest.py."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2

from tests.integration.conftest import Config, Databases, db_url, query
from tests.projects import Rev, write_project

# Three pending revisions over a table of items; the last one adds a unique index, which a
# member holding a duplicate sku cannot take (the failing member of the tests).
FLEET_HISTORY = [
    Rev(
        "f1",
        "op.execute('ALTER TABLE items ADD COLUMN note text')",
        "op.execute('ALTER TABLE items DROP COLUMN note')",
    ),
    Rev(
        "f2",
        """op.execute("UPDATE items SET note = 'n' || id")""",
        "op.execute('UPDATE items SET note = NULL')",
    ),
    Rev(
        "f3",
        "op.execute('CREATE UNIQUE INDEX items_sku ON items (sku)')",
        "op.execute('DROP INDEX items_sku')",
    ),
]


@dataclass
class Fleet:
    """A group of member databases, each a target of the shared runbook.toml."""

    group: str
    ini: Path
    members: dict[str, str] = field(default_factory=dict)  # target name -> database

    def db(self, target: str) -> str:
        return self.members[target]

    def revision(self, target: str) -> str | None:
        rows = query(self.members[target], "SELECT version_num FROM alembic_version")
        return rows[0][0] if rows else None


def make_fleet(
    config: Config,
    databases: Databases,
    tmp_path: Path,
    count: int,
    *,
    revisions: list[Rev] | None = None,
    rows: int = 200,
    group_options: dict[str, Any] | None = None,
    **target_options: Any,
) -> Fleet:
    """``count`` members (``<group>_NN``, NN from 01) with a table ``items`` of ``rows``
    rows, every revision of ``revisions`` pending, in a new group of their own."""
    ini = write_project(tmp_path / "fleet", revisions or FLEET_HISTORY)
    template = _template(databases, rows)
    group = f"g{uuid.uuid4().hex[:6]}"
    fleet = Fleet(group, ini)
    target_options.setdefault("backup_dir", str(tmp_path / "backups"))
    target_options.setdefault("backup", False)
    for i in range(1, count + 1):
        name = f"{group}_{i:02d}"
        dbname = databases.create(template=template)
        fleet.members[name] = dbname
        config.targets[name] = {"url": db_url(dbname), "alembic_ini": str(ini), **target_options}
    config.add_group(group, targets=[f"{group}_*"], **(group_options or {}))
    return fleet


def _template(databases: Databases, rows: int) -> str:
    """The database every member is copied from: a table ``items`` of ``rows`` rows."""
    template = databases.create()
    query(
        template,
        "CREATE TABLE items (id int PRIMARY KEY, sku text NOT NULL); "
        f"INSERT INTO items SELECT g, 'sku-' || g FROM generate_series(1, {rows}) g",
    )
    return template


@dataclass
class CatalogFleet(Fleet):
    """A catalog group's member databases, listed in a table ``tenants`` of ``catalog``;
    ``inactive``: rows of databases the catalog lists as not active (not members)."""

    catalog: str = ""
    inactive: dict[str, str] = field(default_factory=dict)


def make_catalog_fleet(
    config: Config,
    databases: Databases,
    tmp_path: Path,
    count: int,
    *,
    inactive: int = 1,
    rows: int = 200,
    revisions: list[Rev] | None = None,
    **group_options: Any,
) -> CatalogFleet:
    """``count`` active members (``<group>_NN``) and ``inactive`` inactive rows
    (``<group>_offNN``, real databases too), listed in a catalog database's table
    ``tenants (name, url, active)``, and a [groups.<group>] reading it; no [targets]."""
    ini = write_project(tmp_path / "fleet", revisions or FLEET_HISTORY)
    template = _template(databases, rows)
    group = f"c{uuid.uuid4().hex[:6]}"
    catalog = databases.create()
    query(catalog, "CREATE TABLE tenants (name text PRIMARY KEY, url text, active boolean)")
    fleet = CatalogFleet(group, ini, catalog=catalog)
    listed = [(f"{group}_{i:02d}", True) for i in range(1, count + 1)]
    listed += [(f"{group}_off{i:02d}", False) for i in range(1, inactive + 1)]
    for name, active in listed:
        dbname = databases.create(template=template)
        (fleet.members if active else fleet.inactive)[name] = dbname
        add_catalog_row(fleet, name, db_url(dbname), active=active)
    group_options.setdefault("backup_dir", str(tmp_path / "backups"))
    group_options.setdefault("backup", False)
    config.add_group(
        group,
        catalog_url=db_url(catalog),
        catalog_query="SELECT name, url FROM tenants WHERE active",
        alembic_ini=str(ini),
        **group_options,
    )
    return fleet


def add_catalog_row(fleet: CatalogFleet, name: str, url: str, *, active: bool = True) -> None:
    """One more row of the catalog (a URL of any kind: a test's broken member too)."""
    conn = psycopg2.connect(db_url(fleet.catalog))
    try:
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO tenants VALUES (%s, %s, %s)", (name, url, active))
    finally:
        conn.close()
