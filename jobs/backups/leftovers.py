"""What a killed worker leaves behind: scratch databases and partial dump files.

A delivery SIGKILLed mid-backup or mid-rehearsal cannot clean up, so each thing it makes is
named for its owner and removed later by whoever can prove the owner dead:

- a scratch database ``runbook_scratch_<db>_<run>_d<delivery>_<purpose><random>``: ``<db>``
  is a hash of the target database's name (the scratch lives on the same server, where other
  targets' databases may keep scratch databases of their own), ``<run>`` the run's id in that
  database's ledger and ``<delivery>`` the delivery (``runs.deliveries``) that made it;
- a dump being written ``<backup name>.d<delivery>.partial`` in ``backup_dir``, renamed to
  the backup's name only once the dump is complete and proven (jobs/backups/vault.py).

Every delivery that makes such things holds the target's run lock (jobs/pg/db.py) for as long
as it uses them and drops them before it lets go. So a leftover is dead when its run has
ended, when its run has had a later delivery (which could only start once this one had
ended), or when no session holds the run lock after the leftover was seen. Anything else
may be in use and is left alone, and so is whatever names a run this ledger does not know.
The reconciler (jobs/run/reconcile.py) sweeps every pass; a delivery sweeps before it makes
its own (jobs/backups/vault.py, jobs/insight/rehearse.py); ``runbook doctor`` lists what it finds.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from jobs.config import Target, redact
from jobs.ledger import leases, schema
from jobs.pg import db

log = logging.getLogger("runbook.leftovers")

SCRATCH_PREFIX = "runbook_scratch_"
PARTIAL_SUFFIX = ".partial"
INVALID_CATALOG_NAME = "3D000"  # DROP DATABASE of one already gone

SCRATCH = re.compile(
    rf"^{SCRATCH_PREFIX}(?P<db>[0-9a-f]{{8}})_(?P<run>[0-9a-f]{{16}})_d(?P<delivery>\d+)_"
    r"(?P<purpose>[a-z])[0-9a-f]{4}$"
)
PARTIAL = re.compile(
    r"^(?P<target>.+)-\d{8}T\d{6}Z-(?P<run>[0-9a-f]{16})\.dump\.d(?P<delivery>\d+)"
    + re.escape(PARTIAL_SUFFIX)
    + "$"
)
PURPOSES = {"v": "trial restore of a backup", "r": "rehearsal copy"}


@dataclass(frozen=True)
class Owner:
    """The delivery of a run that makes a scratch database or dump file."""

    run_id: str
    delivery: int


@dataclass(frozen=True)
class Leftover:
    kind: str  # "scratch" or "partial"
    name: str  # the database's name, or the file's path
    run_id: str
    delivery: int
    why: str = ""  # why it is dead, once judged

    def describe(self) -> str:
        if self.kind == "scratch":
            return f"scratch database {self.name}"
        return f"partial dump file {self.name}"


def database_tag(dbname: str) -> str:
    """Eight hex digits naming the target database among those on its server."""
    return hashlib.sha256(dbname.encode()).hexdigest()[:8]


def scratch_name(target: Target, owner: Owner | None, purpose: str) -> str:
    """A new scratch database's name; without an owner (a call outside any run) an anonymous
    one that no sweep will ever remove."""
    if owner is None or not re.fullmatch(r"[0-9a-f]{16}", owner.run_id):
        return f"{SCRATCH_PREFIX}{secrets.token_hex(8)}"
    assert purpose in PURPOSES
    tag = database_tag(str(target.url.database))
    return f"{SCRATCH_PREFIX}{tag}_{owner.run_id}_d{owner.delivery}_{purpose}{secrets.token_hex(2)}"


def partial_path(final: Path, delivery: int | None) -> Path:
    """Where the dump that will become ``final`` is written until it is complete."""
    return final.with_name(f"{final.name}.d{delivery or 0}{PARTIAL_SUFFIX}")


# -- finding them --------------------------------------------------------------------------


def _scratch(conn: Connection, target: Target) -> list[Leftover]:
    """This target database's scratch databases on its server, by their names."""
    tag = database_tag(str(target.url.database))
    names = conn.execute(
        text("SELECT datname FROM pg_database WHERE starts_with(datname, :p) ORDER BY 1"),
        {"p": f"{SCRATCH_PREFIX}{tag}_"},
    ).scalars()
    found = []
    for name in names:
        match = SCRATCH.match(name)
        if match and match["db"] == tag:
            found.append(Leftover("scratch", name, match["run"], int(match["delivery"])))
    return found


def _partials(target: Target) -> list[tuple[Leftover, str]]:
    """Partial dump files in the target's backup_dir, with the target name each carries."""
    try:
        paths = sorted(target.backup_dir.glob(f"*{PARTIAL_SUFFIX}"))
    except OSError:
        return []
    found = []
    for path in paths:
        match = PARTIAL.match(path.name)
        if match:
            leftover = Leftover("partial", str(path), match["run"], int(match["delivery"]))
            found.append((leftover, match["target"]))
    return found


def _run_lock_held(conn: Connection) -> bool:
    """Whether some session holds this database's run lock (read from pg_locks, without
    taking it: a delivery polling for it must never find it taken by us)."""
    key = db.RUN_LOCK_KEY
    return bool(
        conn.execute(
            text(
                "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database() "
                "AND l.classid::bigint = :hi AND l.objid::bigint = :lo AND l.objsubid = 1)"
            ),
            {"hi": key >> 32, "lo": key & 0xFFFFFFFF},
        ).scalar_one()
    )


def dead(conn: Connection, target: Target, *, holder: Owner | None = None) -> list[Leftover]:
    """The target's leftovers whose owner is proven dead, each with why.

    ``holder``: the delivery calling, which holds the run lock; without it (the reconciler,
    the doctor) the run lock is looked at, after the leftovers were listed.
    """
    try:
        return _judge(conn, target, holder)
    finally:
        if conn.in_transaction():
            conn.rollback()


def _judge(conn: Connection, target: Target, holder: Owner | None) -> list[Leftover]:
    seen = _scratch(conn, target)
    partials = _partials(target)
    seen += [p for p, _ in partials]
    if not seen or not schema.exists(conn):
        return []
    lock_free = holder is None and not _run_lock_held(conn)
    runs = leases.run_deliveries(conn, {s.run_id for s in seen})
    names = {p.name: name for p, name in partials}
    found = []
    for item in seen:
        run = runs.get(item.run_id)
        if run is None or (item.kind == "partial" and names[item.name] != run.target):
            continue  # not a run of this ledger: not ours to judge
        if run.finished:
            why = f"its run {run.id} is {run.state}"
        elif item.delivery < run.deliveries:
            why = f"its run {run.id} has been delivered again since (delivery {run.deliveries})"
        elif holder is not None and holder != Owner(run.id, item.delivery):
            why = f"its delivery of run {run.id} is over (this delivery holds the run lock)"
        elif lock_free:
            why = (
                f"no worker holds the run lock of {target.name} (run {run.id} is not being worked)"
            )
        else:
            continue  # it may be in use right now
        found.append(Leftover(item.kind, item.name, item.run_id, item.delivery, why))
    return found


def unknown(conn: Connection, target: Target) -> list[Leftover]:
    """Scratch databases named for this target database whose run its ledger does not know
    (the database was recreated since): no sweep can prove them dead."""
    try:
        seen = _scratch(conn, target)
        if not seen or not schema.exists(conn):
            return []
        runs = leases.run_deliveries(conn, {s.run_id for s in seen})
        return [s for s in seen if s.run_id not in runs]
    finally:
        if conn.in_transaction():
            conn.rollback()


# -- removing them -------------------------------------------------------------------------


def _remove(conn: Connection, item: Leftover, target: Target) -> bool:
    """Drop or delete one leftover; whether it was this call that removed it."""
    try:
        if item.kind == "partial":
            Path(item.name).unlink()
            return True
        quoted = conn.dialect.identifier_preparer.quote(item.name)
        conn.execute(text(f"DROP DATABASE {quoted} WITH (FORCE)"))
        return True
    except FileNotFoundError:
        return False  # another sweep was first
    except DBAPIError as exc:
        if getattr(exc.orig, "pgcode", None) == INVALID_CATALOG_NAME:
            return False
        log.warning(
            "could not remove %s on %s: %s; remove it by hand",
            item.describe(),
            target.name,
            redact(str(exc.orig or exc).strip().splitlines()[0]),
        )
    except OSError as exc:
        log.warning(
            "could not remove %s of %s: %s; remove it by hand",
            item.describe(),
            target.name,
            exc.strerror,
        )
    return False


def sweep(target: Target, *, holder: Owner | None = None) -> list[Leftover]:
    """Remove the target's dead leftovers, one log line each; what was removed."""
    with db.connect(target, autocommit=True) as conn:
        removed = []
        for item in dead(conn, target, holder=holder):
            if _remove(conn, item, target):
                log.warning(
                    "removed %s left by run %s (delivery %d) on %s: %s",
                    item.describe(),
                    item.run_id,
                    item.delivery,
                    target.name,
                    item.why,
                )
                removed.append(item)
    return removed


def before_making(target: Target, owner: Owner | None) -> None:
    """A delivery about to make a scratch database or a dump file removes what earlier ones
    left first; a failure here is logged and never stops the run."""
    if owner is None:
        return
    try:
        sweep(target, holder=owner)
    except Exception as exc:
        log.warning(
            "run %s on %s: could not look for leftovers: %s",
            owner.run_id,
            target.name,
            redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__),
        )
