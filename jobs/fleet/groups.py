"""Groups: [groups.NAME] of runbook.toml, the members they stand for, and the control database.

A group names its members one of two ways:
- ``targets = ["tenant_*", "eu-main"]``: names and glob patterns over [targets.NAME];
- a catalog: ``catalog_url`` (or ``catalog_url_env``) and ``catalog_query``, whose rows
  (name, url) become targets that take every other option of the group (alembic_ini,
  backup, lock_timeout …) as a [targets.NAME] table would give them.

Member order is stable and is the order canaries and waves follow: the group's ``canary``
names first, in the order written, then each pattern's matches sorted by name in the order
the patterns are written (a catalog's rows sorted by name). A target matched twice counts once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.config import (
    Settings,
    Target,
    normalize_url,
    redact,
    target_from_table,
    target_keys,
)
from jobs.errors import ConfigError, NoControlDatabase, TargetUnreachable, UnknownGroup

CONTROL_ENV = "RUNBOOK_CONTROL_URL"
_GROUP_KEYS = {"targets", "canary", "catalog_url", "catalog_url_env", "catalog_query"}
# A catalog is read again when its last reading is older than this (worker side: a member's
# run and its slices resolve their target through it).
CATALOG_TTL_S = 30.0
_NO_CONTROL = (
    'groups and rollouts need a control database: add [control] url = "postgresql://..." '
    f'(or url_env = "VAR") to runbook.toml, or set {CONTROL_ENV}'
)


@dataclass(frozen=True)
class Member:
    """One member of a group: its target, or the one line that says why it cannot be used."""

    name: str
    target: Target | None
    broken: str | None = None
    canary: bool = False


@dataclass(frozen=True)
class Group:
    """One [groups.NAME] table, validated."""

    name: str
    patterns: tuple[str, ...]
    canary: tuple[str, ...]
    catalog_url: Any = None  # a PgURL; None for a group of [targets]
    catalog_query: str | None = None
    options: tuple[tuple[str, Any], ...] = ()  # what each catalog row's target takes

    @property
    def is_catalog(self) -> bool:
        return self.catalog_url is not None


def group_names(settings: Settings) -> list[str]:
    return sorted(settings.groups_raw)


def group(settings: Settings, name: str) -> Group:
    """The named group, validated; UnknownGroup or ConfigError (one line) when it is wrong."""
    if name not in settings.groups_raw:
        known = ", ".join(group_names(settings)) or "none"
        raise UnknownGroup(
            f"unknown group {name!r} (configured: {known}); add [groups.{name}] to runbook.toml"
        )
    raw = settings.groups_raw[name]
    where = f"group {name!r}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [groups.{name}] must be a table")
    unknown = sorted(set(raw) - _GROUP_KEYS - target_keys() | ({"url", "url_env"} & set(raw)))
    if unknown:
        known = ", ".join(sorted(_GROUP_KEYS | target_keys() - {"url", "url_env"}))
        raise ConfigError(f"{where}: unknown option {unknown[0]!r} (known: {known})")
    patterns = _names(raw, "targets", where)
    canary = _names(raw, "canary", where)
    options = {k: v for k, v in raw.items() if k not in _GROUP_KEYS}
    catalog = "catalog_url" in raw or "catalog_url_env" in raw or "catalog_query" in raw
    if catalog == bool(patterns):
        raise ConfigError(
            f'{where}: give either targets = ["name", "pattern_*"] or a catalog '
            '(catalog_url or catalog_url_env, and catalog_query = "SELECT name, url FROM ...")'
        )
    if not catalog:
        if options:
            raise ConfigError(
                f"{where}: {sorted(options)[0]!r} applies to a catalog's rows only; set it on "
                "the [targets.NAME] of the members"
            )
        return Group(name, patterns, canary)
    url = _catalog_url(raw, where)
    query = raw.get("catalog_query")
    if not isinstance(query, str) or not query.strip():
        raise ConfigError(f'{where}: catalog_query = "SELECT name, url FROM ..." is missing')
    made = Group(name, (), canary, url, query.strip(), tuple(sorted(options.items())))
    row_template(settings, made)  # a typo in the options: one line now, not on every row
    return made


def row_template(settings: Settings, g: Group) -> Target:
    """What every row of catalog group ``g`` takes, on a stand-in URL: its options checked,
    and its Alembic project (``runbook rollout`` resolves --to against it)."""
    stand_in = {**dict(g.options), "url": "postgresql://check@localhost/check"}
    return target_from_table("member", stand_in, settings.base_dir)


def _names(raw: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f'{where}: {key} must be a list of names, e.g. {key} = ["tenant_*"]')
    return tuple(value)


def _catalog_url(raw: dict[str, Any], where: str) -> Any:
    if ("catalog_url" in raw) == ("catalog_url_env" in raw):
        raise ConfigError(f'{where}: give exactly one of catalog_url or catalog_url_env = "VAR"')
    if "catalog_url_env" in raw:
        value = os.environ.get(str(raw["catalog_url_env"]))
        if not value:
            raise ConfigError(
                f"{where}: environment variable {raw['catalog_url_env']} (catalog_url_env) is "
                "not set"
            )
        return normalize_url(value, f"{where}: the URL in ${raw['catalog_url_env']}")
    return normalize_url(str(raw["catalog_url"]), f"{where}: catalog_url")


def members(settings: Settings, g: Group) -> list[Member]:
    """The group's members in their stable order (this module's docstring)."""
    found = _catalog_members(settings, g) if g.is_catalog else _static_members(settings, g)
    by_name = {m.name: m for m in found}
    missing = [c for c in g.canary if c not in by_name]
    if missing:
        raise ConfigError(f"group {g.name!r}: canary {missing[0]!r} is not a member of the group")
    if not found:
        raise ConfigError(f"group {g.name!r} has no members; check its targets or catalog")
    first = [by_name[c] for c in g.canary]
    rest = [m for m in found if m.name not in set(g.canary)]
    return [Member(m.name, m.target, m.broken, True) for m in first] + rest


def _static_members(settings: Settings, g: Group) -> list[Member]:
    names = settings.names
    seen: dict[str, Member] = {}
    for pattern in g.patterns:
        matched = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
        if not matched and not any(ch in pattern for ch in "*?["):
            raise ConfigError(
                f"group {g.name!r}: target {pattern!r} is not configured; add "
                f"[targets.{pattern}] or remove it from the group"
            )
        for name in matched:
            if name not in seen:
                seen[name] = Member(name, settings.targets.get(name), settings.broken.get(name))
    return list(seen.values())


# (group, catalog URL and query) -> (when read, the members in order, the members by name)
_catalogs: dict[tuple[str, str], tuple[float, list[Member], dict[str, Member]]] = {}
_catalog_lock = threading.Lock()


def _catalog_members(settings: Settings, g: Group, *, fresh: bool = True) -> list[Member]:
    """The catalog's rows as members, sorted by name; read again unless ``fresh`` is False
    and the last reading is younger than CATALOG_TTL_S."""
    key = _catalog_key(g)
    with _catalog_lock:
        cached = _catalogs.get(key)
    if cached and not fresh and time.monotonic() - cached[0] < CATALOG_TTL_S:
        return cached[1]
    return _read_members(settings, g, key)


def _catalog_member(settings: Settings, g: Group, name: str) -> Member | None:
    """One row of the catalog by name, from a reading younger than CATALOG_TTL_S."""
    _catalog_members(settings, g, fresh=False)
    with _catalog_lock:
        return _catalogs[_catalog_key(g)][2].get(name)


def _catalog_key(g: Group) -> tuple[str, str]:
    url = g.catalog_url.render_as_string(hide_password=False)
    return (g.name, f"{url}\0{g.catalog_query}")


def _read_members(settings: Settings, g: Group, key: tuple[str, str]) -> list[Member]:
    rows = _read_catalog(g)
    found: dict[str, Member] = {}
    options = dict(g.options)
    for name, url in rows:
        if name in found:
            raise ConfigError(f"group {g.name!r}: the catalog lists {name!r} twice")
        try:
            t = target_from_table(name, {**options, "url": url}, settings.base_dir)
            found[name] = Member(name, t)
        except ConfigError as exc:
            found[name] = Member(name, None, str(exc))
    result = [found[n] for n in sorted(found)]
    with _catalog_lock:
        _catalogs[key] = (time.monotonic(), result, found)
    return result


def _read_catalog(g: Group) -> list[tuple[str, str]]:
    """The catalog query's rows, on a read-only connection (jobs/pg/connect.py)."""
    import psycopg2

    from jobs.pg import connect

    where = f"group {g.name!r}: catalog"
    catalog = Target(f"{g.name}.catalog", g.catalog_url, Path("."), Path("."))
    with connect.reading(catalog) as conn, conn.cursor() as cur:
        try:
            cur.execute(g.catalog_query)
            rows = cur.fetchall()
        except psycopg2.Error as exc:
            first = redact(str(exc).strip().splitlines()[0])
            raise ConfigError(f"{where} query failed: {first}; fix catalog_query") from None
    if rows and len(rows[0]) < 2:
        raise ConfigError(f"{where} query must return two columns, name and url")
    return [(str(r[0]), str(r[1])) for r in rows]


def resolve(settings: Settings, name: str) -> Target | None:
    """The target called ``name``: a [targets.NAME], else a row of a catalog group (read at
    most every CATALOG_TTL_S); None when neither has it. How a worker serves a catalog member's
    run and slices, whose names are not in runbook.toml."""
    if name in settings.targets or name in settings.broken:
        return settings.target(name)
    for gname in group_names(settings):
        try:
            g = group(settings, gname)
            if not g.is_catalog:
                continue
            m = _catalog_member(settings, g, name)
        except (ConfigError, TargetUnreachable):  # another group's catalog: not this one
            continue
        if m is not None:
            if m.target is None:  # its row's own line (a bad URL), not "unknown target"
                raise ConfigError(m.broken or f"member {name!r} is broken")
            return m.target
    return None


def serving(settings: Settings, name: str) -> Settings:
    """``settings`` with the catalog member ``name`` added to its targets when runbook.toml
    does not name it, so that a run or a slice of that member is served like any other."""
    if name in settings.targets or name in settings.broken or not settings.groups_raw:
        return settings
    t = resolve(settings, name)
    if t is None:
        return settings
    return dataclasses.replace(settings, targets={**settings.targets, name: t})


def control_target(settings: Settings) -> Target:
    """The control database as a target (it is reached like one); NoControlDatabase when none
    is configured."""
    raw = settings.control_raw
    if raw is None:
        env = os.environ.get(CONTROL_ENV)
        if not env:
            raise NoControlDatabase(_NO_CONTROL)
        raw = {"url": env}
    unknown = sorted(set(raw) - {"url", "url_env"})
    if unknown:
        raise ConfigError(f"[control]: unknown option {unknown[0]!r} (known: url, url_env)")
    try:
        return target_from_table("control", dict(raw), settings.base_dir)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("target 'control'", "[control]")) from None


def has_control(settings: Settings) -> bool:
    return settings.control_raw is not None or bool(os.environ.get(CONTROL_ENV))
