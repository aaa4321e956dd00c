"""Restoring some tables of a backup (``runbook restore --table``): the archive's entries for
those tables, their data replaced in one transaction, the rest of the database untouched.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, text

from jobs.backups.restore import (
    HEADER,
    MARK,
    TOC_LINE,
    check_lock_timeout,
    read_toc,
    run_restore,
    sql_literal,
    tool,
)
from jobs.config import Target
from jobs.errors import RestoreError
from jobs.pg.db import connect
from jobs.pg.names import DEFAULT_SCHEMA

# --- single tables ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One TOC entry as pg_restore --schema-only prints it."""

    kind: str
    name: str
    schema: str
    owner: str
    body: str

    @property
    def key(self) -> str:
        """The entry as ``pg_restore --list`` shows it after its ids."""
        return f"{self.kind} {self.schema} {self.name} {self.owner}".rstrip()


def _schema_entries(pg_restore: str, backup: Path) -> list[_Entry]:
    out = subprocess.run(
        [pg_restore, "--schema-only", "-f", "-", str(backup)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RestoreError(
            f"backup {backup} is corrupt or not a pg_dump archive; refusing to restore it"
        )
    heads = list(HEADER.finditer(out.stdout))
    entries = []
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(out.stdout)
        body = "\n".join(
            line for line in out.stdout[m.end() : end].splitlines() if not line.startswith("--")
        ).strip()
        owner = "" if m.group(4) == "-" else m.group(4)
        entries.append(_Entry(m.group(2), m.group(1), m.group(3), owner, body))
    return entries


# Entry kinds that can belong to a table, and how their SQL names the table they belong to.
_TABLE_PARTS = {
    "DEFAULT",
    "CONSTRAINT",
    "FK CONSTRAINT",
    "CHECK CONSTRAINT",
    "ROW SECURITY",
    "TRIGGER",
    "RULE",
    "POLICY",
    "INDEX",
    "COMMENT",
    "ACL",
    "SEQUENCE",
    "SEQUENCE OWNED BY",
    "STATISTICS",
    "SECURITY LABEL",
}


def _belongs_to(qualified: str) -> re.Pattern[str]:
    q = re.escape(qualified)
    return re.compile(
        rf"^(?:ALTER TABLE (?:ONLY )?{q}\s"
        rf"|CREATE (?:UNIQUE )?INDEX \S+ ON (?:ONLY )?{q} "
        rf"|CREATE (?:CONSTRAINT )?TRIGGER .*? ON {q} "
        rf"|CREATE RULE .*? TO {q}\s"
        rf"|CREATE POLICY \S+ ON {q}\s"
        rf"|COMMENT ON (?:TABLE|COLUMN) {q}[ .]"
        rf"|COMMENT ON (?:CONSTRAINT|TRIGGER|POLICY|RULE) \S+ ON {q} "
        rf"|(?:GRANT|REVOKE) .*? ON TABLE {q} "
        rf"|ALTER SEQUENCE \S+ OWNED BY {q}\."
        rf"|CREATE STATISTICS .*? FROM {q};"
        rf"|SECURITY LABEL .*? ON (?:TABLE|COLUMN) {q}[ .])",
        re.M,
    )


def _parse_names(tables: Iterable[str]) -> list[tuple[str, str, str]]:
    """(as given, schema, name) for each ``name`` or ``schema.name``."""
    parsed = []
    for given in tables:
        schema, _, name = given.rpartition(".")
        if not name:
            raise RestoreError(f"table name {given!r} is empty; pass NAME or SCHEMA.NAME")
        parsed.append((given, schema or DEFAULT_SCHEMA, name))
    if not parsed:
        raise RestoreError("no table to restore was named; pass --table NAME")
    return parsed


def _select_entries(
    entries: list[_Entry],
    recreate: dict[str, tuple[str, str]],
    exists: dict[str, bool],
    constraints: set[tuple[str, str]],
) -> list[_Entry]:
    """The TOC entries that recreate the tables in ``recreate`` (qualified -> (schema, name)),
    plus the foreign keys existing tables had to them."""
    chosen: list[_Entry] = []
    sequences: set[tuple[str, str]] = set()
    indexes: set[tuple[str, str]] = set()
    for qualified, (schema, name) in recreate.items():
        mine = _belongs_to(qualified)
        for e in entries:
            if e.kind == "TABLE" and e.schema == schema and e.name == name:
                chosen.append(e)
            elif e.kind in _TABLE_PARTS and mine.search(e.body):
                chosen.append(e)
                if e.kind in ("SEQUENCE", "SEQUENCE OWNED BY"):
                    sequences.add((e.schema, e.name))
                elif e.kind == "INDEX":
                    indexes.add((e.schema, e.name))
            elif e.kind == "FK CONSTRAINT" and f"REFERENCES {qualified}(" in e.body:
                owner_m = re.match(r"ALTER TABLE (?:ONLY )?(\S+)", e.body)
                owner_table = owner_m.group(1) if owner_m else ""
                conname = e.name.rsplit(" ", 1)[-1]
                if exists.get(owner_table) and (owner_table, conname) not in constraints:
                    chosen.append(e)
    for e in entries:
        if e.kind in ("SEQUENCE",) and (e.schema, e.name) in sequences and e not in chosen:
            chosen.append(e)  # a serial's CREATE SEQUENCE names no table; its OWNED BY does
        elif e.kind in ("COMMENT", "ACL", "SECURITY LABEL") and e not in chosen:
            kind, _, obj = e.name.partition(" ")
            if (kind == "SEQUENCE" and (e.schema, obj) in sequences) or (
                kind == "INDEX" and (e.schema, obj) in indexes
            ):
                chosen.append(e)
    return chosen


def restore_tables(
    target: Target,
    backup: Path,
    tables: list[str],
    *,
    lock_timeout_ms: int = 30000,
    expected_sha256: str | None = None,
) -> dict[str, int]:
    """Put the named tables back as ``backup`` holds them, in one transaction; returns
    {table: rows restored}."""
    check_lock_timeout(lock_timeout_ms)
    backup = Path(backup)
    names = _parse_names(tables)
    pg_restore = tool(target.pg_restore, "pg_restore")
    toc = read_toc(pg_restore, backup, expected_sha256)
    entries = _schema_entries(pg_restore, backup)
    by_table = {(e.schema, e.name): e for e in entries if e.kind == "TABLE"}
    _check_archived(backup, names, by_table)
    with connect(target) as conn:
        live = _live_tables(conn, names, entries)
        conn.rollback()
    existing, quoted = live.existing, live.quoted
    recreate = {quoted[(s, n)]: (s, n) for _, s, n in names if quoted[(s, n)] not in existing}
    chosen = _select_entries(entries, recreate, live.exists, live.constraints)
    selected = _restore_list(toc, chosen, names, by_table)
    # Tables that the archive's FK statements lock are locked up front, within lock_timeout
    # (the archive's own SQL sets lock_timeout = 0).
    touched = _fk_tables(e for e in chosen if e.kind == "FK CONSTRAINT")
    share = sorted(t for t in touched if live.exists.get(t) and t not in existing)
    named = [quoted[(s, n)] for _, s, n in names]
    with tempfile.NamedTemporaryFile("w", suffix=".list") as listing:
        listing.write("\n".join(selected) + "\n")
        listing.flush()
        rows, _ = run_restore(
            target,
            pg_restore,
            _tables_prologue(list(existing), share),
            ["-L", listing.name],
            _tables_epilogue(named),
            lock_timeout_ms,
            backup,
        )
    counts = {int(r[1]): int(r[2]) for r in rows if r[0] == "rows"}
    return {given: counts[i] for i, (given, _s, _n) in enumerate(names)}


def _check_archived(
    backup: Path, names: list[tuple[str, str, str]], by_table: dict[tuple[str, str], _Entry]
) -> None:
    """RestoreError for a named table the archive does not hold, or holds partitioned."""
    for given, schema, name in names:
        if (schema, name) not in by_table:
            raise RestoreError(
                f"backup {backup} holds no table {given}; check the name (SCHEMA.NAME) or "
                "pick the backup that has it"
            )
        if re.search(r"^PARTITION BY ", by_table[(schema, name)].body, re.M):
            raise RestoreError(_partitioned(given))


def _fk_tables(fks: Iterable[_Entry]) -> set[str]:
    """The tables the archive's foreign-key statements name, on either side."""
    return {
        m.group(1)
        for e in fks
        for m in re.finditer(r"(?:ALTER TABLE (?:ONLY )?|REFERENCES )([^\s(]+)", e.body)
    }


@dataclass(frozen=True)
class _LiveTables:
    """The target as the restore finds it."""

    quoted: dict[tuple[str, str], str]  # (schema, name) -> its quoted, qualified name
    existing: dict[str, int]  # the named tables that exist: quoted name -> oid
    exists: dict[str, bool]  # every table the archive's foreign keys name -> exists now
    constraints: set[tuple[str, str]]  # the foreign keys now: (quoted table, name)


def _live_tables(
    conn: Connection, names: list[tuple[str, str, str]], entries: list[_Entry]
) -> _LiveTables:
    """What the target holds now of the named tables and of their foreign keys; RestoreError
    for a partitioned table, or one that a table not named references."""
    quoted: dict[tuple[str, str], str] = {}
    existing: dict[str, int] = {}
    for given, schema, name in names:
        row = conn.execute(
            text(
                "SELECT quote_ident(:s) || '.' || quote_ident(:t), c.oid, c.relkind "
                "FROM (SELECT) one LEFT JOIN (pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace) ON n.nspname = :s AND c.relname = :t "
                "AND c.relkind IN ('r', 'p')"
            ),
            {"s": schema, "t": name},
        ).one()
        quoted[(schema, name)] = row[0]
        if row[2] == "p":
            raise RestoreError(_partitioned(given))
        if row[1] is not None:
            existing[row[0]] = int(row[1])
    if existing:
        _refuse_outside_references(conn, list(existing.values()))
    fk_tables = _fk_tables(e for e in entries if e.kind == "FK CONSTRAINT")
    exists = {
        str(r[0]): bool(r[1])
        for r in conn.execute(
            text("SELECT t, to_regclass(t) IS NOT NULL FROM unnest(CAST(:ts AS text[])) t"),
            {"ts": sorted(fk_tables)},
        )
    }
    constraints = {
        (str(r[0]), str(r[1]))
        for r in conn.execute(
            text(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), k.conname "
                "FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE k.contype = 'f'"
            )
        )
    }
    return _LiveTables(quoted, existing, exists, constraints)


def _refuse_outside_references(conn: Connection, oids: list[int]) -> None:
    """RestoreError when a table not among ``oids`` references one of them: emptying it
    would break that foreign key."""
    ref = conn.execute(
        text(
            "SELECT c.confrelid::regclass::text, c.conrelid::regclass::text "
            "FROM pg_constraint c WHERE c.contype = 'f' "
            "AND c.confrelid = ANY(:oids) AND NOT c.conrelid = ANY(:oids) "
            "ORDER BY 1, 2 LIMIT 1"
        ),
        {"oids": oids},
    ).first()
    if ref:
        raise RestoreError(
            f"table {ref[0]} is referenced by {ref[1]}; restore them together "
            f"(--table {ref[0]} --table {ref[1]})"
        )


def _restore_list(
    toc: list[str],
    chosen: list[_Entry],
    names: list[tuple[str, str, str]],
    by_table: dict[tuple[str, str], _Entry],
) -> list[str]:
    """The lines of the archive's table of contents pg_restore -L restores: the chosen
    entries, their sequences' values and the named tables' rows."""
    wanted = {e.key for e in chosen}
    for e in chosen:
        if e.kind == "SEQUENCE":
            wanted.add(f"SEQUENCE SET {e.schema} {e.name} {e.owner}".rstrip())
    for _, s, n in names:
        owner = by_table[(s, n)].owner
        wanted.add(f"TABLE DATA {s} {n} {owner}".rstrip())
    return [line for line in toc if (m := TOC_LINE.match(line)) and m.group(2) in wanted]


def _partitioned(table: str) -> str:
    return (
        f"table {table} is partitioned and cannot be restored by table; restore the whole "
        "backup instead"
    )


def _regclass_array(tables: Sequence[str]) -> str:
    return (
        "ARRAY[" + ", ".join(f"{sql_literal(t)}::pg_catalog.regclass" for t in tables) + "]::oid[]"
    )


def _tables_prologue(existing: list[str], share: list[str]) -> str:
    sql = ""
    if share:
        sql += f"LOCK TABLE {', '.join(share)} IN SHARE ROW EXCLUSIVE MODE;\n"
    if not existing:
        return sql
    oids = _regclass_array(existing)
    return (
        sql
        + f"""
LOCK TABLE {", ".join(existing)} IN ACCESS EXCLUSIVE MODE;
CREATE TEMP TABLE runbook_fks ON COMMIT DROP AS
    SELECT conrelid::pg_catalog.regclass::text AS tbl, conname,
           pg_catalog.pg_get_constraintdef(oid) AS def
    FROM pg_catalog.pg_constraint
    WHERE contype = 'f' AND conparentid = 0
      AND conrelid = ANY({oids}) AND confrelid = ANY({oids});
CREATE TEMP TABLE runbook_triggers ON COMMIT DROP AS
    SELECT tgrelid::pg_catalog.regclass::text AS tbl, tgname, tgenabled
    FROM pg_catalog.pg_trigger
    WHERE NOT tgisinternal AND tgenabled <> 'D' AND tgrelid = ANY({oids});
DO $runbook$
DECLARE r record;
BEGIN  -- rows load in any order; restoring rows must not fire the app's triggers
    FOR r IN SELECT * FROM pg_temp.runbook_fks LOOP
        EXECUTE pg_catalog.format('ALTER TABLE %s DROP CONSTRAINT %I', r.tbl, r.conname);
    END LOOP;
    FOR r IN SELECT * FROM pg_temp.runbook_triggers LOOP
        EXECUTE pg_catalog.format('ALTER TABLE %s DISABLE TRIGGER %I', r.tbl, r.tgname);
    END LOOP;
END
$runbook$;
TRUNCATE TABLE ONLY {", ONLY ".join(existing)};
"""
    )


def _tables_epilogue(named: list[str]) -> str:
    array = "ARRAY[" + ", ".join(sql_literal(t) for t in named) + "]::text[]"
    counts = "\n".join(
        f"SELECT '{MARK}', 'rows', {i}, pg_catalog.count(*) FROM {t};" for i, t in enumerate(named)
    )
    return f"""
DO $runbook$
DECLARE r record; top bigint; last bigint; called boolean;
BEGIN
    IF pg_catalog.to_regclass('pg_temp.runbook_fks') IS NOT NULL THEN
        FOR r IN SELECT * FROM pg_temp.runbook_fks LOOP
            EXECUTE pg_catalog.format('ALTER TABLE %s ADD CONSTRAINT %I %s',
                                      r.tbl, r.conname, r.def);
        END LOOP;
        FOR r IN SELECT * FROM pg_temp.runbook_triggers LOOP
            EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE %s TRIGGER %I', r.tbl,
                CASE r.tgenabled WHEN 'R' THEN 'REPLICA' WHEN 'A' THEN 'ALWAYS' ELSE '' END,
                r.tgname);
        END LOOP;
    END IF;
    -- Owned sequences (serial, identity) reach at least max(column), never move back.
    FOR r IN
        SELECT d.objid::pg_catalog.regclass AS seq, a.attname, c.oid::pg_catalog.regclass AS tbl
        FROM pg_catalog.pg_depend d
        JOIN pg_catalog.pg_sequence s ON s.seqrelid = d.objid AND s.seqincrement > 0
        JOIN pg_catalog.pg_class c ON c.oid = d.refobjid
        JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid
        WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
          AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
          AND d.deptype IN ('a', 'i')
          AND c.oid IN (SELECT pg_catalog.to_regclass(t) FROM pg_catalog.unnest({array}) t)
    LOOP
        EXECUTE pg_catalog.format('SELECT max(%I)::bigint FROM %s', r.attname, r.tbl) INTO top;
        EXECUTE pg_catalog.format('SELECT last_value, is_called FROM %s', r.seq)
            INTO last, called;
        IF top IS NOT NULL AND (top > last OR (top = last AND NOT called)) THEN
            PERFORM pg_catalog.setval(r.seq, top, true);
        END IF;
    END LOOP;
END
$runbook$;
{counts}
"""
