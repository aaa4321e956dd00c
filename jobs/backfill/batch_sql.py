"""The SQL of one backfill batch: its session settings, its bound, its UPDATE, and the
database's signals the walk (jobs/backfill/walk.py) reads between batches.

Keys are compared by PostgreSQL only (the cursor is stored as text and cast back to the
key's type in SQL), so uuid and text keys walk in the column's own order and collation.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from jobs.backfill.spec import embed

# Every batch transaction names itself, so that slices waiting for each other's ledger rows
# are not mistaken for the application's sessions.
APPLICATION_NAME = "runbook backfill"


def session_settings(lock_ms: int, statement_ms: int) -> dict[str, str]:
    """A batch transaction's settings: its lock and statement timeouts, its name (see
    APPLICATION_NAME), and an asynchronous commit: its COMMIT need not wait for the WAL flush
    (about 10 ms a batch). A server crash can then lose only the last batches together with
    their cursor moves and batch rows (one transaction each), so none is lost or applied
    twice; every state change and hand-off commits synchronously, which flushes them."""
    return {
        "lock_timeout": str(lock_ms),
        "statement_timeout": str(statement_ms),
        "application_name": APPLICATION_NAME,
        "synchronous_commit": "off",
    }


def set_timeouts(conn: Connection, lock_ms: int, statement_ms: int) -> None:
    """The settings of session_settings for the caller's transaction (the dry run's)."""
    settings = session_settings(lock_ms, statement_ms)
    sets = ", ".join(f"set_config(:n{i}, :v{i}, true)" for i in range(len(settings)))
    binds: dict[str, str] = {}
    for i, (name, value) in enumerate(settings.items()):
        binds[f"n{i}"], binds[f"v{i}"] = name, value
    conn.execute(text(f"SELECT {sets}"), binds)


def _lower(key: str, key_type: str, has_lo: bool) -> str:
    return f"{key} > CAST(:lo AS {key_type}) AND " if has_lo else ""


def bound_sql(table: str, key: str, key_type: str, has_lo: bool) -> str:
    """The batch's last key: the ``:n``-th key after ``:lo``, or the last one up to ``:upper``.
    OFFSET steps over the keys without sorting them again (about 1 ms less per batch of
    10,000 keys than taking the largest of the first n); COALESCE evaluates the second
    subquery only when fewer than n keys are left."""
    keys = f"FROM {table} t WHERE {_lower('t.' + key, key_type, has_lo)}"
    keys += f"t.{key} <= CAST(:upper AS {key_type})"
    # The CAST is outside the subqueries: inside, every key stepped over was turned to text.
    return (
        f"SELECT CAST(coalesce((SELECT t.{key} {keys} ORDER BY t.{key} "
        f"OFFSET CAST(:n AS bigint) - 1 LIMIT 1), (SELECT t.{key} {keys} "
        f"ORDER BY t.{key} DESC LIMIT 1)) AS text) AS bound"
    )


def keys_sql(table: str, key: str, key_type: str, has_lo: bool) -> str:
    """Every key in (``:lo``, ``:hi``], in order (for bisecting a failing batch)."""
    return (
        f"SELECT CAST(t.{key} AS text) FROM {table} t WHERE "
        f"{_lower('t.' + key, key_type, has_lo)}t.{key} <= CAST(:hi AS {key_type}) "
        f"ORDER BY t.{key}"
    )


def update_sql(
    table: str, key: str, key_type: str, set_sql: str, where_sql: str | None, has_lo: bool
) -> str:
    """The batch's UPDATE of keys in (``:lo``, ``:hi``]. The fragments sit on lines of their
    own, so that a trailing ``--`` comment in one cannot swallow the key bounds."""
    where = f" AND (\n{embed(where_sql)}\n)" if where_sql else ""
    return (
        f"UPDATE {table} SET\n{embed(set_sql)}\nWHERE {_lower(key, key_type, has_lo)}"
        f"{key} <= CAST(:hi AS {key_type}){where}"
    )


# The application's sessions waiting for a lock that this session (inside its batch) holds.
# OFFSET 0 keeps pg_blocking_pids() to the few sessions that wait on a lock at all.
# pg_stat_get_activity() rather than the pg_stat_activity view: the view's joins (roles,
# databases) cost more than the count (0.1 ms instead of 0.26 ms a batch here).
BLOCKED_SQL = (
    "SELECT count(*) FROM (SELECT a.pid FROM pg_stat_get_activity(NULL) a "
    f"WHERE a.wait_event_type = 'Lock' AND a.application_name <> '{APPLICATION_NAME}' "
    "OFFSET 0) w WHERE pg_backend_pid() = ANY(pg_blocking_pids(w.pid))"
)
# The database's reasons to hold back: the oldest open transaction of another client (it
# keeps the xmin horizon, so vacuum cannot remove the dead rows our batches leave), and
# autovacuum working on the table now.
SIGNALS_SQL = (
    "SELECT (SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0) "
    "  FROM pg_stat_activity WHERE backend_xmin IS NOT NULL AND backend_type = 'client backend' "
    "  AND datname = current_database() AND pid <> pg_backend_pid()) AS oldest_xact_s, "
    "EXISTS (SELECT 1 FROM pg_stat_progress_vacuum v JOIN pg_stat_activity a USING (pid) "
    "  WHERE v.relid = to_regclass(:table) AND a.backend_type = 'autovacuum worker') "
    "AS autovacuum"
)
