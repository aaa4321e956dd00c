"""A dry run: three batches in a transaction that is rolled back, and the projected total.
It writes nothing, not even the ledger.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs.backfill.batch_sql import bound_sql, set_timeouts, update_sql
from jobs.backfill.create import Prepared, prepare
from jobs.backfill.keys import quote
from jobs.backfill.sizing import next_batch_size
from jobs.backfill.spec import Spec
from jobs.errors import (
    BadSpec,
)
from jobs.pg.sqlstate import describe


def dry_run(conn: Connection, spec: Spec, batches: int = 3) -> dict[str, Any]:
    """Run the first ``batches`` batches inside one transaction that is rolled back; what they
    did and the whole backfill's projected time. Nothing is kept, not even in the ledger (the
    sampled rows are locked for the fraction of a second the transaction lasts)."""
    try:
        plan = prepare(conn, spec)
        samples: list[dict[str, Any]] = []
        key = quote(spec.key)
        with conn.begin_nested():
            set_timeouts(conn, spec.lock_timeout_ms, spec.statement_timeout_ms)
            cursor, size = None, spec.batch_size
            while plan.upper is not None and len(samples) < batches:
                bound = bound_sql(plan.table.name, key, plan.key_type, cursor is not None)
                hi = conn.execute(
                    text(bound), {"lo": cursor, "upper": plan.upper, "n": size}
                ).scalar()
                if hi is None:
                    break
                sql = update_sql(
                    plan.table.name,
                    key,
                    plan.key_type,
                    spec.set_sql,
                    spec.where_sql,
                    cursor is not None,
                )
                started = time.monotonic()
                rows = conn.execute(text(sql), {"lo": cursor, "hi": str(hi)}).rowcount
                ms = (time.monotonic() - started) * 1000
                samples.append({"keys": size, "rows": int(rows), "ms": round(ms, 1)})
                cursor = str(hi)
                size = next_batch_size(
                    size,
                    ms,
                    target_ms=spec.target_batch_ms,
                    min_batch=spec.min_batch,
                    max_batch=spec.max_batch,
                )
            conn.rollback()
    except DBAPIError as exc:
        raise BadSpec(f"the dry run's batch failed: {describe(exc)}") from None
    finally:
        if conn.in_transaction():
            conn.rollback()
    return _projection(spec, plan, samples)


def _projection(spec: Spec, plan: Prepared, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The dry run's report: per batch, on average, and projected over the whole key range."""
    keys = sum(s["keys"] for s in samples)
    ms = sum(s["ms"] for s in samples)
    rows = sum(s["rows"] for s in samples)
    # Keys walked per millisecond, sleeps between batches included; slices share the range.
    per_ms = keys / (ms + spec.sleep_ms * len(samples)) if keys and ms else 0.0
    projected = plan.table_rows / per_ms / 1000 / spec.slices if per_ms else 0.0
    return {
        "table": plan.table.name,
        "key": spec.key,
        "set": spec.set_sql,
        "where": spec.where_sql,
        "batches": samples,
        "rows_per_batch": round(rows / len(samples), 1) if samples else 0,
        "ms_per_batch": round(ms / len(samples), 1) if samples else 0,
        "table_rows": plan.table_rows,
        "rows_to_update": plan.estimate,
        "estimate": plan.estimate_kind,
        "slices": spec.slices,
        "projected_s": round(projected, 3),  # a small table projects to milliseconds
        "rolled_back": True,
    }
