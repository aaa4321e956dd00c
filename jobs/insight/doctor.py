"""The doctor: the common migration errors diagnosed, without changing the database.

Each finding is ``{code, message, fix}``, one line each: what is wrong and what to do. The
history is checked against ``alembic_version`` (a revision the scripts do not know, a
database behind head), and every pending revision is rendered offline (Alembic's ``--sql``
mode) and its SQL read for what would fail on the live database (jobs/insight/sql_findings.py):
objects that already exist and NOT NULL on columns that hold NULLs. The messages keep the
error numbers operators know them by ("error 1: Can't locate revision"). Scratch databases
and partial dumps that killed runs left behind are listed too (jobs/backups/leftovers.py).

The target's standbys and replication slots are listed as facts (``level: "info"``, one line
each, as ``plan`` and preflight show them; they alone do not make the doctor exit 1), and
one over the target's bounds is a finding with its fix (jobs/run/replicas.py).
"""

from __future__ import annotations

import difflib
from typing import Any

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs.backups import leftovers
from jobs.config import Target
from jobs.errors import ProjectError, RevisionError
from jobs.insight.sql_findings import Finding, Plan, finding, revision_findings
from jobs.ledger import fingerprints
from jobs.pg import replication
from jobs.pg.sqlstate import describe
from jobs.project.runtime import Project
from jobs.project.scripts import Revision
from jobs.run import replicas, verify
from jobs.states import StepKind


def diagnose(target: Target, conn: Connection) -> list[Finding]:
    """What stands between ``target`` and a clean ``runbook apply``; [] when nothing does.

    ``conn`` must not be in a transaction; only reads are run on it, and none is left open.
    """
    project, script, problem = _load(target)
    findings = [problem] if problem else []
    try:
        rows = version_rows(conn, target.version_table)
        history = _history_findings(target, conn, script, rows)
        findings += history
        if project is not None and not history:
            current = _resolve(script, rows[0]) if rows else None
            findings += _pending_findings(target, conn, project, current)
    except DBAPIError as exc:
        findings.append(
            finding(
                "unreadable",
                f"cannot read {target.version_table} ({describe(exc)})",
                "connect as the role that owns the schema",
            )
        )
    finally:
        if not conn.closed and conn.in_transaction():
            conn.rollback()
    return findings + leftover_findings(target, conn) + replication_findings(target, conn)


# -- standbys and slots (jobs/run/replicas.py) ---------------------------------------------------

INFO = "info"


def replication_findings(target: Target, conn: Connection) -> list[Finding]:
    """One fact per standby and slot; a finding for each over the target's bounds."""
    try:
        rep = replicas.read(conn, target)
    except DBAPIError as exc:
        fix = 'grant the role pg_read_all_stats, or set replicas = "ignore"'
        return [_unreadable("the standbys and replication slots", exc, fix)]
    finally:
        if not conn.closed and conn.in_transaction():
            conn.rollback()
    found: list[Finding] = []
    if rep.standbys or rep.slots:
        for line in replication.describe(rep):
            found.append({**finding("replication", line, "none needed"), "level": INFO})
    verdict = replication.over_bounds(rep, replication.Bounds.of_target(target))
    for reason, (kind, name) in zip(verdict.reasons, verdict.subjects, strict=True):
        code = "replication_slot" if kind == "slot" else "replica_lag"
        found.append(
            finding(
                code,
                f"{reason}: runbook apply would refuse in preflight",
                replicas.fix(kind, name, target.name),
            )
        )
    return found


# -- the project and its history ---------------------------------------------------------------


def _load(target: Target) -> tuple[Project | None, ScriptDirectory | None, Finding | None]:
    """The project, its script directory, and a finding when the project cannot be used."""
    try:
        project = Project(target)
        return project, project.script, None
    except ProjectError as exc:
        script = _script_directory(target)
        heads = sorted(script.get_heads()) if script is not None else []
        if len(heads) > 1:
            return None, script, _several_heads(target, heads)
        fix = "fix the Alembic project (alembic.ini, script_location, revision files)"
        return None, script, finding("project", str(exc), f"{fix}, then run the doctor again")


def _script_directory(target: Target) -> ScriptDirectory | None:
    """The project's scripts as far as they load, without Project's single-head rule."""
    try:
        script = ScriptDirectory.from_config(Config(str(target.alembic_ini)))
        script.get_heads()
        return script
    except Exception:
        return None


def _several_heads(target: Target, heads: list[str]) -> Finding:
    return finding(
        "several_heads",
        f"the scripts have {len(heads)} heads ({', '.join(heads)}): runbook applies one linear "
        "history, so pending revisions were not checked",
        f'`alembic merge heads -m "merge heads"`, then `runbook apply --target {target.name}`',
    )


def version_rows(conn: Connection, version_table: str) -> list[str]:
    """The revisions ``alembic_version`` holds ([] when it is empty or missing)."""
    table = conn.dialect.identifier_preparer.quote(version_table)
    if not conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table}).scalar_one():
        return []
    return [
        str(r) for r in conn.execute(text(f"SELECT version_num FROM {table} ORDER BY 1")).scalars()
    ]


def _resolve(script: ScriptDirectory | None, rev: str) -> str | None:
    """The full id of a revision the scripts know (Alembic accepts a unique prefix), else None."""
    if script is None:
        return None
    try:
        found = script.get_revision(rev)
    except Exception:
        return None
    return found.revision if found is not None else None


def _ancestors(script: ScriptDirectory, rev: str) -> set[str]:
    """``rev`` and every revision below it."""
    try:
        return {s.revision for s in script.iterate_revisions(rev, "base")}
    except Exception:
        return {rev}


def _history_findings(
    target: Target, conn: Connection, script: ScriptDirectory | None, rows: list[str]
) -> list[Finding]:
    """alembic_version against the scripts: unknown revisions, several rows."""
    if script is None:
        return [_several_rows(target, None, rows)] if len(rows) > 1 else []
    found = [_unknown(target, conn, script, rev) for rev in rows if _resolve(script, rev) is None]
    if len(rows) > 1:
        found.append(_several_rows(target, script, rows))
    return found


def _several_rows(target: Target, script: ScriptDirectory | None, rows: list[str]) -> Finding:
    message = (
        f"{target.version_table} holds {len(rows)} rows ({', '.join(rows)}): the database is on "
        "several branches, and runbook applies one linear history"
    )
    return finding("several_versions", message, _several_rows_fix(target, script, rows))


def _several_rows_fix(target: Target, script: ScriptDirectory | None, rows: list[str]) -> str:
    stamp = f"`runbook stamp --target {target.name}"
    known = [_resolve(script, r) for r in rows]
    if script is None or None in known:
        return f"find the revision the schema is at (`alembic history`), then {stamp} <rev>`"
    full = [k for k in known if k is not None]
    for rev in full:
        if set(full) <= _ancestors(script, rev):
            return f"{stamp} {rev}` (the other rows are its ancestors)"
    if len(script.get_heads()) == 1:
        return "`alembic upgrade head` applies the merge revision; then runbook can take over"
    return "merge the branches (`alembic merge heads`), then `alembic upgrade head`"


# -- an unknown revision ------------------------------------------------------------------------


def _unknown(target: Target, conn: Connection, script: ScriptDirectory, rev: str) -> Finding:
    changes = fingerprints.ledger_changes(conn)
    applied_by = _applied_by(changes, rev)
    nearest = _nearest_known(target, conn, script, rev, changes)
    message = (
        f"{target.version_table} holds revision {rev!r}, which the scripts do not know "
        "(§8 error 1: Can't locate revision)"
    )
    if applied_by:
        message += f"; runbook applied it in run {applied_by}: the database is ahead of this code"
    if nearest:
        message += f"; nearest known revision: {nearest[0]} ({nearest[1]})"
    stamp = f"`runbook stamp --target {target.name} {nearest[0] if nearest else '<rev>'}`"
    if applied_by:
        fix = f"deploy the code that has revision {rev}, or undo it by hand and {stamp}"
    elif nearest:
        fix = f"check that the schema is at {nearest[0]}, then {stamp}"
    else:
        fix = f"find the revision the schema is at (`alembic history`), then {stamp}"
    return finding("unknown_revision", message, fix)


def _nearest_known(
    target: Target,
    conn: Connection,
    script: ScriptDirectory,
    rev: str,
    changes: list[Any],
) -> tuple[str, str] | None:
    """(revision, why) for the known revision the database most likely is at."""
    try:
        known = [s.revision for s in script.walk_revisions()]
    except Exception:
        return None
    return (
        _by_id(rev, known)
        or _by_fingerprint(target, conn, known)
        or _by_ledger(script, rev, known, changes)
    )


def _by_id(rev: str, known: list[str]) -> tuple[str, str] | None:
    """A known id the unknown one extends, or one a typo away from it."""
    extended = [k for k in known if rev.startswith(k)]
    if len(extended) == 1:
        return extended[0], "its id starts with it"
    close = difflib.get_close_matches(rev, known, n=1, cutoff=0.75)
    return (close[0], "the closest id: a typo?") if close else None


def _by_fingerprint(target: Target, conn: Connection, known: list[str]) -> tuple[str, str] | None:
    """The one known revision whose recorded schema fingerprint the live schema matches."""
    recorded = fingerprints.recorded_fingerprints(conn)
    if not recorded:
        return None
    now = verify.fingerprint(conn, target.version_table)
    matches = [r for r in known if recorded.get(r) == now]
    if len(matches) == 1:
        return matches[0], "the schema matches the fingerprint runbook recorded there"
    return None


def _by_ledger(
    script: ScriptDirectory, rev: str, known: list[str], changes: list[Any]
) -> tuple[str, str] | None:
    """The known revision the ledger last left the database at (before ``rev``, if there)."""
    seen = [c.revision for c in changes]
    start = seen.index(rev) + 1 if rev in seen else 0
    for change in changes[start:]:
        if change.revision not in known:
            continue
        at = change.revision if change.kind == StepKind.UPGRADE else _down(script, change.revision)
        return (at, "where the ledger last recorded the database") if at else None
    return None


def _down(script: ScriptDirectory, rev: str) -> str | None:
    found = script.get_revision(rev)
    down = found.down_revision if found is not None else None
    return down if isinstance(down, str) else None


def _applied_by(changes: list[Any], rev: str) -> str | None:
    """The run that applied ``rev`` when the ledger's last change of it is an upgrade."""
    for change in changes:
        if change.revision == rev:
            return str(change.run_id) if change.kind == StepKind.UPGRADE else None
    return None


# -- pending revisions: behind head, and what their SQL would hit -------------------------------


def _pending_findings(
    target: Target, conn: Connection, project: Project, current: str | None
) -> list[Finding]:
    try:
        pending = project.upgrade_path(current, project.head)
    except RevisionError as exc:
        return [finding("history", str(exc), "fix the history, then run the doctor again")]
    if not pending:
        return []
    return [_behind(target, current, project.head, pending)] + _sql_findings(
        target, conn, project, pending
    )


def _behind(
    target: Target, current: str | None, head: str | None, pending: list[Revision]
) -> Finding:
    n = len(pending)
    shown = ", ".join(r.id for r in pending[:5]) + (f", … ({n - 5} more)" if n > 5 else "")
    at = f"at {current}" if current else "at no revision (never migrated)"
    return finding(
        "behind",
        f"the database is {at}, {n} revision{'s' if n > 1 else ''} behind head {head}: {shown} "
        "(§8 error 4: Target database is not up to date)",
        f"`runbook apply --target {target.name}`",
    )


def _sql_findings(
    target: Target, conn: Connection, project: Project, pending: list[Revision]
) -> list[Finding]:
    """Read each pending revision's offline SQL for what would fail on the live database."""
    plan = Plan()
    found: list[Finding] = []
    for i, rev in enumerate(pending):
        try:
            sql = project.upgrade_sql(rev)
        except RevisionError as exc:
            found.append(
                finding(
                    "unrenderable",
                    f"{exc}; its SQL was not checked",
                    f"review {rev.id} by hand, or apply it to a copy of the database first",
                )
            )
            continue
        previous = pending[i - 1].id if i else None
        found += revision_findings(target, conn, rev, sql, plan, previous)
    return found


# -- what killed runs left behind (jobs/backups/leftovers.py) ------------------------------


def leftover_findings(target: Target, conn: Connection) -> list[Finding]:
    """Scratch databases and partial dump files of dead runs, and scratch databases named for
    this database whose run its ledger does not know."""
    try:
        dead = leftovers.dead(conn, target)
        unknown = leftovers.unknown(conn, target)
    except DBAPIError as exc:
        fix = "connect as the role that owns the database"
        return [_unreadable("leftovers of killed runs", exc, fix, verb="look for")]
    reconciler = "a running `runbook worker` removes it within RUNBOOK_RECONCILE_S (15 s)"
    found = []
    for item in dead:
        left = f"{item.describe()} was left by run {item.run_id} (delivery {item.delivery})"
        if item.kind == "scratch":
            by_hand = f'`DROP DATABASE "{item.name}" WITH (FORCE)`'
            found.append(
                finding(
                    "leftover_scratch",
                    f"{left} on {_server(target)}, and nothing uses it: {item.why}",
                    f"{reconciler}; or drop it by hand: {by_hand}",
                )
            )
        else:
            found.append(
                finding(
                    "leftover_dump",
                    f"{left}, and nothing writes it: {item.why}",
                    f"{reconciler}; or delete it by hand: `rm {item.name}`",
                )
            )
    for item in unknown:
        found.append(
            finding(
                "unknown_scratch",
                f"{item.describe()} on {_server(target)} is named for this database, but its run "
                f"{item.run_id} is not in the ledger (was the database recreated?); runbook "
                "cannot prove it unused and leaves it alone",
                f'if nothing uses it, `DROP DATABASE "{item.name}" WITH (FORCE)`',
            )
        )
    return found


def _unreadable(what: str, exc: DBAPIError, fix: str, verb: str = "read") -> Finding:
    return finding("unreadable", f"cannot {verb} {what} ({describe(exc)})", fix)


def _server(target: Target) -> str:
    return target.where.rsplit("/", 1)[0]
