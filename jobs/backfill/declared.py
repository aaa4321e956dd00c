"""Backfills declared by revisions, at run time.

A revision declares ``backfills`` (module-level data plain Alembic ignores; read and checked
by jobs/project/); the coordinator runs each right after that revision's upgrade and
checks it before the revision's verify passes. A later revision's ``requires_backfills``
asks, before it goes up, that those backfills finished and that no row still matches their
WHERE — GitLab's "ensure finished". The rehearsal runs them the same way on its scratch copy.
"""

from __future__ import annotations

import dataclasses

from sqlalchemy import Connection, text

from jobs.backfill import control, walk
from jobs.backfill import create as backfill_create
from jobs.backfill import keys as backfill_keys
from jobs.backfill.replicas import ReplicaWatch
from jobs.backfill.spec import replica_bounds
from jobs.config import Target
from jobs.errors import BadSpec
from jobs.ledger import backfills, records, schema
from jobs.pg import db
from jobs.project.runtime import Project
from jobs.project.scripts import DeclaredBackfill, Revision
from jobs.states import BACKFILL_TERMINAL, ERRORED, PAUSED, SUCCEEDED

IN_PROCESS_BUDGET_S = 2.0  # per call of run_slice when the slices run here, in this process


def latest(
    conn: Connection, declared: DeclaredBackfill, run_id: str | None = None
) -> records.Backfill | None:
    """The newest backfill recorded for ``declared`` (of run ``run_id`` when given), or None."""
    if not schema.exists(conn):
        conn.rollback()
        return None
    found = backfills.list_backfills(conn, run_id=run_id, revision=declared.revision)
    return next(
        (
            bf
            for bf in found
            if (bf.set_sql, bf.where_sql) == (declared.set_sql, declared.where_sql)
        ),
        None,
    )


def create(conn: Connection, target: Target, declared: DeclaredBackfill, run_id: str | None) -> str:
    """Record ``declared`` as a backfill of run ``run_id``; its id (BadSpec, UnusableKey)."""
    key = declared.key
    if key is None:
        keys = backfill_keys.candidate_keys(conn, declared.table)
        if not keys:
            raise BadSpec(
                f"revision {declared.revision}: table {declared.declared['table']} has no "
                "usable key (a unique NOT NULL column); declare one with 'key'"
            )
        key = keys[0]
    # A revision declares no replica bounds: its target's apply.
    spec = dataclasses.replace(declared.spec(key, target.lock_timeout_ms), **replica_bounds(target))
    return backfill_create.create(
        conn, target.name, spec, run_id=run_id, revision=declared.revision
    )


def run_here(target: Target, backfill_id: str, slices: list[tuple[int, int]]) -> str:
    """Walk every slice in this process until each stops; the backfill's state then."""
    engine = db.engine(target)
    for slice_no, generation in slices:
        while (
            walk.run_slice(
                engine,
                backfill_id,
                generation,
                slice_no=slice_no,
                budget_s=IN_PROCESS_BUDGET_S,
                watch=ReplicaWatch.of_target(target),
            )
            == walk.CONTINUE
        ):
            pass
    with db.connect(target) as conn:
        control.settle(conn, backfill_id)
        return control.get(conn, backfill_id).state


def rows_still_matching(conn: Connection, declared: DeclaredBackfill) -> bool:
    """Whether some row of the table still matches the backfill's WHERE (False without one)."""
    if declared.where_sql is None:
        return False
    sql = f"SELECT 1 FROM {declared.table} WHERE (\n{declared.where_sql}\n) LIMIT 1"
    try:
        return conn.execute(text(sql.replace(":", "\\:"))).first() is not None
    finally:
        if conn.in_transaction():
            conn.rollback()


def _command(target: str, declared: DeclaredBackfill) -> str:
    """The ``runbook backfill`` command that runs ``declared`` by hand."""
    fields = declared.declared
    where = f' --where "{fields["where"]}"' if fields.get("where") else ""
    key = f" --key {fields['key']}" if fields.get("key") else ""
    return (
        f'runbook backfill --target {target} --table {fields["table"]} --set "{fields["set"]}"'
        f"{where}{key} --wait"
    )


def _unfinished(bf: records.Backfill) -> str:
    """What to do about a backfill that has not finished."""
    if bf.state == PAUSED:
        return f"resume it (runbook resume {bf.id})"
    if bf.state == ERRORED:
        return f"fix its error ({bf.error}) and resume it (runbook resume {bf.id})"
    return f"wait for it (runbook status {bf.id} --watch)"


def unmet_requirement(conn: Connection, target: str, project: Project, rev: Revision) -> str | None:
    """Why ``rev`` may not go up yet (one line for the operator), or None.

    Each backfill ``rev`` requires must have finished (its newest ledger record, if any, has
    succeeded) and, when it has a WHERE, no row may still match it. A revision applied by
    plain Alembic has no ledger record: its WHERE alone decides.
    """
    for declared in project.required_backfills(rev):
        what = f"{rev.id} requires the backfill of {declared.revision} ({declared.describe()})"
        bf = latest(conn, declared)
        if bf is not None and bf.state not in BACKFILL_TERMINAL:
            return f"{what} to have finished, but backfill {bf.id} is {bf.state}; {_unfinished(bf)}"
        if rows_still_matching(conn, declared):
            return (
                f"{what} to have finished, but rows of {declared.declared['table']} still match "
                f"{declared.declared['where']}; run it again ({_command(target, declared)}), "
                "then apply again"
            )
        if declared.where_sql is None and bf is not None and bf.state != SUCCEEDED:
            return (
                f"{what} to have finished, but backfill {bf.id} was {bf.state}; run it again "
                f"({_command(target, declared)}), then apply again"
            )
    return None
