"""Checks after each upgrade, and the schema fingerprint that proves a rollback complete."""

from __future__ import annotations

import hashlib
import re
import time
import urllib.error
import urllib.request
from typing import Any

from sqlalchemy import Connection, text

from jobs.config import Target, redact
from jobs.errors import VerifyFailed
from jobs.pg.sqlstate import describe
from jobs.project.runtime import Project
from jobs.project.scripts import Revision

# Everything pg_dump --schema-only would show for user schemas, one line per object, in a
# stable order. Column positions count live columns only, so a dropped-and-re-added column
# shows up as moved. The ledger schema and the system schemas are left out.
_FINGERPRINT_SQL = """
WITH ns AS (
    SELECT oid, nspname FROM pg_namespace
    WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'runbook')
      AND nspname NOT LIKE 'pg\\_toast%' AND nspname NOT LIKE 'pg\\_temp\\_%'
), ext AS (
    SELECT objid FROM pg_depend WHERE deptype = 'e'
), skip AS (  -- Alembic's version table: bookkeeping, created on the first upgrade
    SELECT objid FROM ext
    UNION ALL SELECT c.oid FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
    WHERE c.relname = :version_table
)
SELECT 'schema ' || nspname FROM ns
UNION ALL
SELECT format('relation %s.%s kind=%s', ns.nspname, c.relname, c.relkind)
FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND c.oid NOT IN (SELECT objid FROM skip)
UNION ALL
SELECT format('column %s.%s #%s %s %s notnull=%s identity=%s default=%s', ns.nspname,
              c.relname, row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum), a.attname,
              format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity,
              pg_get_expr(d.adbin, d.adrelid))
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid JOIN ns ON ns.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND c.oid NOT IN (SELECT objid FROM skip)
UNION ALL
SELECT format('constraint %s.%s %s %s', ns.nspname, c.relname, con.conname,
              pg_get_constraintdef(con.oid))
FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
JOIN ns ON ns.oid = c.relnamespace WHERE c.oid NOT IN (SELECT objid FROM skip)
UNION ALL
SELECT format('index %s valid=%s', pg_get_indexdef(i.indexrelid), i.indisvalid)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN ns ON ns.oid = c.relnamespace
WHERE i.indrelid NOT IN (SELECT objid FROM skip)
UNION ALL
SELECT format('type %s.%s enum(%s)', ns.nspname, t.typname,
              (SELECT string_agg(quote_literal(e.enumlabel), ',' ORDER BY e.enumsortorder)
               FROM pg_enum e WHERE e.enumtypid = t.oid))
FROM pg_type t JOIN ns ON ns.oid = t.typnamespace WHERE t.typtype = 'e'
UNION ALL
SELECT format('view %s.%s %s', ns.nspname, c.relname, pg_get_viewdef(c.oid))
FROM pg_class c JOIN ns ON ns.oid = c.relnamespace WHERE c.relkind IN ('v', 'm')
UNION ALL
SELECT format('function %s', pg_get_functiondef(p.oid))
FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace
WHERE p.prokind IN ('f', 'p') AND p.oid NOT IN (SELECT objid FROM ext)
UNION ALL
SELECT format('trigger %s', pg_get_triggerdef(tg.oid))
FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid JOIN ns ON ns.oid = c.relnamespace
WHERE NOT tg.tgisinternal
UNION ALL
SELECT format('extension %s', extname) FROM pg_extension
"""


def schema_lines(conn: Connection, version_table: str = "alembic_version") -> list[str]:
    """The schema of every user schema, as sorted text lines."""
    # Prepared once per session: planning this query costs about as much as running it.
    if not conn.info.get("runbook_schema_prepared"):
        sql = _FINGERPRINT_SQL.replace(":version_table", "$1")
        conn.execute(text(f"PREPARE runbook_schema(text) AS {sql}"))
        conn.info["runbook_schema_prepared"] = True
    rows = conn.execute(text("EXECUTE runbook_schema(:vt)"), {"vt": version_table})
    lines = sorted(str(r[0]) for r in rows)
    if conn.in_transaction():
        conn.commit()
    return lines


def digest(lines: list[str]) -> str:
    """sha256 of schema lines: equal fingerprints mean equal schemas."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def fingerprint(conn: Connection, version_table: str = "alembic_version") -> str:
    """The schema fingerprint of the database ``conn`` is connected to."""
    return digest(schema_lines(conn, version_table))


_INDEX_LINE = re.compile(r"^index CREATE (?:UNIQUE )?INDEX (\S+) ON (?:ONLY )?(\S+) ")


def invalid_indexes(lines: list[str]) -> list[str]:
    """Indexes a failed CREATE INDEX CONCURRENTLY left behind, from :func:`schema_lines`."""
    found = []
    for line in lines:
        match = _INDEX_LINE.match(line)
        if match and line.endswith(" valid=false"):
            schema = match.group(2).rsplit(".", 1)[0]
            found.append(f"{schema}.{match.group(1)}")
    return found


def _revision_check(conn: Connection, rev: Revision) -> None:
    check = rev.verify_check
    if check is None:
        return
    try:
        ok = check(conn) if callable(check) else conn.execute(text(str(check))).scalar()
    except Exception as exc:
        if conn.in_transaction():
            conn.rollback()
        raise VerifyFailed(f"revision {rev.id}: its verify check raised {describe(exc)}") from None
    if conn.in_transaction():
        conn.rollback()  # a verify check only reads
    if not ok:
        raise VerifyFailed(f"revision {rev.id}: its verify check returned {ok!r}, not true")


def check_health(url: str, *, tries: int = 3, timeout_s: float = 5.0, pause_s: float = 1.0) -> int:
    """GET ``url`` until it answers 2xx; VerifyFailed with the last answer otherwise."""
    last = ""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310
                if 200 <= resp.status < 300:
                    return int(resp.status)
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if attempt + 1 < tries:
            time.sleep(pause_s)
    raise VerifyFailed(redact(f"health check {url} did not answer 2xx ({last})"))


def verify_revision(
    conn: Connection, project: Project, target: Target, rev: Revision, lines: list[str]
) -> dict[str, Any]:
    """Every post-upgrade check for ``rev`` against the schema ``lines`` read after it;
    VerifyFailed names the first that fails. Returns what was checked, for the ledger."""
    current = project.current(conn)
    if current != rev.id:
        raise VerifyFailed(f"after upgrading to {rev.id} the database is at {current}")
    bad = invalid_indexes(lines)
    if bad:
        raise VerifyFailed(
            f"invalid index {', '.join(bad)} after {rev.id}; drop it and create it again "
            "(CREATE INDEX CONCURRENTLY)"
        )
    _revision_check(conn, rev)
    checked: dict[str, Any] = {
        "revision_check": "passed" if rev.verify_check is not None else "none declared"
    }
    if target.health_url:
        checked["health"] = check_health(target.health_url)
    return checked
