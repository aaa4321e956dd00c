"""Restore a run's backup into its target, all or nothing, never touching the ledger.

Both restores feed one ``psql`` session: our prologue, then ``pg_restore -f -`` streamed
from the archive, then our epilogue. We send BEGIN ourselves and send COMMIT only after
pg_restore has exited 0 and every statement succeeded (``ON_ERROR_STOP``); otherwise psql is
killed and the server rolls the open transaction back. ``psql --single-transaction`` is not
used on purpose: it commits at end of input, so a pg_restore dying half-way through a
corrupt archive would commit a half-restored database.

``restore_database`` drops every user schema except the ledger's (``DROP SCHEMA … CASCADE``
removes the tables, enum types, schemas and extensions the failed run added), recreates
``public`` in PostgreSQL's default state (pg_dump 15 never emits ``CREATE SCHEMA public``,
only its differences from that default), drops extensions the backup does not hold,
unlinks large objects, and replays the whole archive, whose ``CREATE EXTENSION`` brings back
the extensions it holds. Owners and privileges are kept (no ``--no-owner``), so a
``pg_dump --schema-only`` of the result equals one of the original; the target's role must
therefore own the objects (or be a superuser): when it cannot set an owner or grant to a
role, the restore fails and nothing changes. A guard compares the shape of schema
``runbook`` before and after, inside the transaction: if the ledger depended on a dropped
object, the restore fails and nothing changes.

Application connections are not terminated. The drops take ACCESS EXCLUSIVE locks, so the
application's queries on those tables wait until COMMIT and then see the restored tables
(or fail: new OIDs for tables and enum types invalidate client-side caches). Each lock is
waited for at most ``lock_timeout``; a session holding one longer (an idle transaction)
makes the restore fail and change nothing. All waiting happens in our prologue: the
archive's SQL sets ``lock_timeout = 0`` but only touches objects this transaction created
or already locked, which is why ``restore_tables`` locks every table it alters up front.
Put the application in maintenance mode before a restore and restart it afterwards.
Event triggers, publications and foreign servers are database-level objects a schema drop
does not remove: a backup holding ones that still exist fails with "already exists" and
changes nothing.

``restore_tables`` is the runbook's ``pg_restore -t`` done safely: existing tables get
their rows replaced (TRUNCATE, then the archive's COPY, user triggers off, foreign keys
among them dropped and re-added so load order does not matter, owned sequences never moved
backwards); dropped tables are recreated from the archive's TOC entries with their
indexes, constraints, defaults, triggers, owned sequences, grants and comments, plus the
foreign keys other existing tables had to them. Partitioned tables are refused.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from jobs.backups.dump import libpq_env
from jobs.config import Target, redact
from jobs.errors import RestoreError
from jobs.ledger.read import SCHEMA as LEDGER_SCHEMA

MARK = "runbook-restore"
TOC_LINE = re.compile(r"^(\d+); \d+ \d+ (.*)$")
HEADER = re.compile(r"^-- Name: (.*); Type: (.*); Schema: (.*); Owner: (.*)$", re.M)
_PSQL_ERROR = re.compile(r"(?:ERROR|FATAL):\s+(?:([0-9A-Z]{5}):\s+)?(.*)")
# The shape of the ledger schema: any object a CASCADE could take from it shows up here.
_LEDGER_SHAPE = f"""
SELECT pg_catalog.format('rel %s %s', c.relname, c.relkind) AS line
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = '{LEDGER_SCHEMA}'
UNION ALL
SELECT pg_catalog.format('col %s.%s %s %s %s', c.relname, a.attname,
       pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_catalog.pg_get_expr(d.adbin, d.adrelid))
FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE n.nspname = '{LEDGER_SCHEMA}' AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT pg_catalog.format('con %s %s', con.conname, pg_catalog.pg_get_constraintdef(con.oid))
FROM pg_catalog.pg_constraint con JOIN pg_catalog.pg_namespace n ON n.oid = con.connamespace
WHERE n.nspname = '{LEDGER_SCHEMA}'
UNION ALL
SELECT pg_catalog.format('fn %s(%s)', p.proname,
       pg_catalog.pg_get_function_identity_arguments(p.oid))
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = '{LEDGER_SCHEMA}'
UNION ALL
SELECT pg_catalog.format('type %s', t.typname)
FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = '{LEDGER_SCHEMA}'
UNION ALL
SELECT pg_catalog.format('trigger %s %s', c.relname, tg.tgname)
FROM pg_catalog.pg_trigger tg JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = '{LEDGER_SCHEMA}'
"""
_USER_SCHEMAS = (
    "nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' "
    f"AND nspname <> '{LEDGER_SCHEMA}'"
)


def sql_literal(value: str) -> str:
    """``value`` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def tool(configured: str, name: str) -> str:
    found = shutil.which(configured)
    if not found:
        raise RestoreError(
            f"{name} not found (looked for {configured!r}); install the PostgreSQL client tools"
        )
    return found


def _psql(pg_restore: str) -> str:
    """The psql next to pg_restore (same version, knows its meta-commands), else PATH's."""
    sibling = Path(pg_restore).with_name("psql")
    return str(sibling) if sibling.exists() else tool("psql", "psql")


def read_toc(pg_restore: str, backup: Path, expected_sha256: str | None) -> list[str]:
    """The archive's TOC lines; RestoreError unless the file is there and readable."""
    if not backup.is_file():
        raise RestoreError(f"backup file {backup} is missing; pass the path of an existing backup")
    if expected_sha256 is not None:
        digest = hashlib.sha256()
        with backup.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected_sha256:
            raise RestoreError(
                f"backup {backup} does not match its recorded sha256; refusing to restore it"
            )
    out = subprocess.run(
        [pg_restore, "--list", str(backup)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RestoreError(
            f"backup {backup} is corrupt or not a pg_dump archive; refusing to restore it"
        )
    return [line for line in out.stdout.splitlines() if TOC_LINE.match(line)]


def _first_error(stderr: str) -> tuple[str | None, str]:
    """(SQLSTATE, message) of the first error psql or pg_restore printed."""
    for line in stderr.splitlines():
        match = _PSQL_ERROR.search(line)
        if match:
            return match.group(1), match.group(2).strip()
    for line in stderr.splitlines():
        if "error" in line.lower():
            return None, line.split("error:", 1)[-1].strip()
    lines = stderr.strip().splitlines()
    return None, (lines[0] if lines else "no output")


def _read(fh: IO[bytes]) -> str:
    fh.seek(0)
    return fh.read().decode(errors="replace")


def run_restore(
    target: Target,
    pg_restore: str,
    prologue: str,
    restore_args: Sequence[str],
    epilogue: str,
    lock_timeout_ms: int,
    backup: Path,
) -> tuple[list[list[str]], int]:
    """Run prologue + pg_restore output + epilogue in one transaction; commit only if all
    succeeded. Returns our marked output rows and the bytes pg_restore produced."""
    head = (
        "BEGIN;\nSET client_min_messages = warning;\n"
        f"SET lock_timeout = {int(lock_timeout_ms)};\n"
        "SELECT pg_catalog.set_config('search_path', '', false);\n"
    )
    env = dict(libpq_env(target), PGCONNECT_TIMEOUT="10")
    psql_cmd = [_psql(pg_restore), "-X", "-q", "-A", "-t", "--no-password"]
    psql_cmd += ["-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"]
    restore_cmd = [pg_restore, *restore_args, "-f", "-", str(backup)]
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryFile() as restore_err,
    ):
        psql = subprocess.Popen(psql_cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env)
        streamed, source_error, rc = _pipe(
            psql, restore_cmd, env, restore_err, head + prologue, epilogue
        )
        if source_error is not None:
            raise RestoreError(
                redact(
                    f"backup {backup} could not be read to the end ({source_error}); "
                    f"nothing was changed on target {target.name!r}; the backup is corrupt"
                )
            )
        if rc != 0:
            raise RestoreError(_describe_failure(target, _read(err), lock_timeout_ms))
        rows = [
            line.split("|")[1:] for line in _read(out).splitlines() if line.startswith(MARK + "|")
        ]
    return rows, streamed


def _pipe(
    psql: subprocess.Popen[bytes],
    restore_cmd: list[str],
    env: dict[str, str],
    restore_err: IO[bytes],
    opening: str,
    epilogue: str,
) -> tuple[int, str | None, int]:
    """Feed ``psql`` the opening SQL, pg_restore's output and the epilogue with COMMIT (only
    if pg_restore read the archive to its end). Returns the bytes pg_restore produced, its
    error (None when it succeeded) and psql's exit code."""
    streamed = 0
    source_error: str | None = None
    source = None
    assert psql.stdin is not None
    try:
        psql.stdin.write(opening.encode())
        source = subprocess.Popen(restore_cmd, stdout=subprocess.PIPE, stderr=restore_err, env=env)
        assert source.stdout is not None
        while chunk := source.stdout.read(1 << 16):
            psql.stdin.write(chunk)
            streamed += len(chunk)
        if source.wait() != 0:
            source_error = _first_error(_read(restore_err))[1]
            psql.kill()  # no COMMIT was sent: the server rolls the transaction back
        else:
            psql.stdin.write((epilogue + "\nCOMMIT;\n").encode())
            psql.stdin.close()
    except BrokenPipeError:
        pass  # psql stopped at an error (ON_ERROR_STOP); its stderr says which
    finally:
        if source is not None:
            if source.poll() is None:
                source.kill()  # psql stopped reading: it failed, nothing to commit
            source.wait()
        try:
            if psql.stdin and not psql.stdin.closed:
                psql.stdin.close()
        except BrokenPipeError:
            pass
        rc = psql.wait()
    return streamed, source_error, rc


def _describe_failure(target: Target, stderr: str, lock_timeout_ms: int) -> str:
    state, message = _first_error(stderr)
    if state == "55P03" or "lock timeout" in message:
        return (
            f"restore of target {target.name!r} waited over {lock_timeout_ms} ms for a lock "
            "another session holds; nothing was changed; put the application in maintenance "
            "mode (end its open transactions) and retry"
        )
    if state == "40P01":
        return (
            f"restore of target {target.name!r} deadlocked with another session; nothing was "
            "changed; put the application in maintenance mode and retry"
        )
    if "connection" in message.lower() and ("lost" in message or "closed" in message):
        return (
            f"lost the connection to target {target.name!r} during the restore; check whether "
            "it committed (schema and rows) before retrying"
        )
    if "ledger schema" in message:
        return (
            f"restore of target {target.name!r} would change the ledger schema "
            f"{LEDGER_SCHEMA} (it depends on objects the backup replaces); nothing was changed"
        )
    return redact(f"restore of target {target.name!r} failed, nothing was changed: {message}")


def check_lock_timeout(lock_timeout_ms: int) -> None:
    if lock_timeout_ms <= 0:
        raise RestoreError(f"lock_timeout_ms must be greater than zero, got {lock_timeout_ms}")


# --- the whole database -----------------------------------------------------------------

_PUBLIC_IN_TOC = re.compile(r"^\d+; \d+ \d+ (?:[A-Z]+ )+(?:- (?:[A-Z]+ )?)?public ")


def _database_prologue(toc: list[str]) -> str:
    extensions = sorted(
        m.group(1) for line in toc if (m := re.match(r"^\d+; \d+ \d+ EXTENSION - (\S+)", line))
    )
    keep = "ARRAY[" + ", ".join(sql_literal(e) for e in extensions) + "]::text[]"
    needs_public = "true" if any(_PUBLIC_IN_TOC.match(line) for line in toc) else "false"
    user_schemas = f"SELECT nspname FROM pg_catalog.pg_namespace WHERE {_USER_SCHEMAS}"
    # Extensions created at initdb (plpgsql) have OIDs below 16384; pg_dump skips them too.
    extra_ext = (
        "SELECT e.extname FROM pg_catalog.pg_extension e "
        "JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace "
        f"WHERE e.oid >= 16384 AND n.nspname <> '{LEDGER_SCHEMA}' AND e.extname <> ALL({keep})"
    )
    return f"""
CREATE TEMP VIEW runbook_ledger_shape AS {_LEDGER_SHAPE};
CREATE TEMP TABLE runbook_ledger_before ON COMMIT DROP AS
    SELECT line FROM pg_temp.runbook_ledger_shape;
SELECT '{MARK}', 'schema', nspname FROM ({user_schemas}) s ORDER BY 3;
{_reset_schemas(user_schemas, needs_public)}
SELECT '{MARK}', 'extension', extname FROM ({extra_ext}) e ORDER BY 3;
DO $runbook$
DECLARE ext text;
BEGIN
    FOR ext IN {extra_ext} LOOP
        EXECUTE pg_catalog.format('DROP EXTENSION %I', ext);
    END LOOP;
    PERFORM pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata;
END
$runbook$;
"""


def _reset_schemas(user_schemas: str, needs_public: str) -> str:
    """Drop every user schema, then put ``public`` back as initdb leaves it when the
    database had one or the archive needs it (pg_dump 15 never emits CREATE SCHEMA public)."""
    return f"""DO $runbook$
DECLARE
    had_public boolean := EXISTS (
        SELECT FROM pg_catalog.pg_namespace WHERE nspname = 'public');
    doomed text;
BEGIN
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(nspname), ', ') INTO doomed
    FROM ({user_schemas}) s;
    IF doomed IS NOT NULL THEN
        EXECUTE 'DROP SCHEMA ' || doomed || ' CASCADE';
    END IF;
    IF had_public OR {needs_public} THEN  -- as initdb leaves it; the archive adds changes
        IF pg_catalog.current_setting('server_version_num')::int >= 150000 THEN
            CREATE SCHEMA public AUTHORIZATION pg_database_owner;
            GRANT USAGE ON SCHEMA public TO PUBLIC;
        ELSE
            EXECUTE pg_catalog.format('CREATE SCHEMA public AUTHORIZATION %I',
                (SELECT rolname FROM pg_catalog.pg_roles WHERE oid = 10));
            GRANT USAGE, CREATE ON SCHEMA public TO PUBLIC;
        END IF;
        COMMENT ON SCHEMA public IS 'standard public schema';
    END IF;
END
$runbook$;"""


_LEDGER_GUARD = """
DO $runbook$
BEGIN
    IF EXISTS (SELECT line FROM pg_temp.runbook_ledger_shape
               EXCEPT ALL SELECT line FROM pg_temp.runbook_ledger_before)
       OR EXISTS (SELECT line FROM pg_temp.runbook_ledger_before
                  EXCEPT ALL SELECT line FROM pg_temp.runbook_ledger_shape) THEN
        RAISE EXCEPTION 'the restore would change the ledger schema';
    END IF;
END
$runbook$;
"""


def restore_database(
    target: Target,
    backup: Path,
    *,
    lock_timeout_ms: int = 30000,
    expected_sha256: str | None = None,
) -> dict[str, Any]:
    """Bring every schema of ``target`` but the ledger back to ``backup``, in one transaction."""
    check_lock_timeout(lock_timeout_ms)
    backup = Path(backup)
    pg_restore = tool(target.pg_restore, "pg_restore")
    toc = read_toc(pg_restore, backup, expected_sha256)
    started = time.monotonic()
    rows, streamed = run_restore(
        target,
        pg_restore,
        _database_prologue(toc),
        [],
        _LEDGER_GUARD,
        lock_timeout_ms,
        backup,
    )
    return {
        "backup": str(backup),
        "target": target.name,
        "toc_entries": len(toc),
        "sql_bytes": streamed,
        "schemas_replaced": [r[1] for r in rows if r[0] == "schema"],
        "extensions_dropped": [r[1] for r in rows if r[0] == "extension"],
        "duration_s": round(time.monotonic() - started, 3),
    }
