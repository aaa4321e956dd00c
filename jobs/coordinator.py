"""The coordinator: carries one run through backup, upgrade + verify per revision, and
rollback on failure, recording every step in the ledger.

It is idempotent by run id. Celery may deliver the same run twice, or again after a worker
died: the run lock lets only one delivery work at a time, and each step is looked up in the
ledger before it is done, so finished steps are never repeated and an interrupted one is
checked against the database before it is redone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from jobs import backup as backups
from jobs import db, ledger
from jobs import states as st
from jobs.config import Settings, Target, redact
from jobs.errors import DowngradeImpossible, RunbookError, StepFailed
from jobs.ledger import Run, Step
from jobs.migrate import Project, Revision, describe, with_lock_retries
from jobs.verify import digest, schema_lines, verify_revision

log = logging.getLogger("runbook.coordinator")

Progress = Callable[[dict[str, Any]], None]


@dataclass
class Outcome:
    """What a delivery of a run did; the task's result (names only, no URLs)."""

    run_id: str
    target: str
    state: str
    error: str | None = None
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "target": self.target,
            "state": self.state,
            "error": self.error,
            "note": self.note,
        }


def restore_from_backup(conn: Connection, target: Target, run: Run, reason: str) -> bool:
    """Seam for rollback-by-restore: bring the target back from the run's backup.

    Returns True when the target was restored. Until restore is implemented, nothing is
    restored and the run ends ``failed`` with the backup's path in its error.
    """
    return False


class Coordinator:
    def __init__(self, conn: Connection, target: Target, run: Run, progress: Progress) -> None:
        self.conn = conn
        self.target = target
        self.run = run
        self.progress = progress
        self.project = Project(target)  # loaded once per run, not once per step

    # -- helpers -----------------------------------------------------------------------------

    def _report(self, step: Step) -> None:
        self.progress(
            {
                "run_id": self.run.id,
                "target": self.target.name,
                "state": self.run.state,
                "step": step.kind,
                "revision": step.revision or None,
                "step_state": step.state,
            }
        )

    def _begin(self, kind: str, rev: str | None = None) -> Step | None:
        """Start a step, or None when the ledger says it already succeeded."""
        done = self.run.step(kind, rev)
        if done is not None and done.state == st.STEP_SUCCEEDED:
            return None
        step = ledger.start_step(self.conn, self.run, kind, rev)
        self._report(step)
        return step

    def _schema(self, step: Step | None = None) -> list[str]:
        """The schema lines, read with lock retries like DDL: reading column defaults takes
        a share lock on each table, which an application's ACCESS EXCLUSIVE lock blocks."""
        result: list[list[str]] = []

        def on_retry(attempt: int, error: str, delay: float) -> None:
            if step is not None:
                ledger.bump_attempts(self.conn, step, f"lock timeout, retrying in {delay:.1f}s")
                self._report(step)

        def read() -> None:
            if self.conn.in_transaction():  # a lock timeout aborted the last one
                self.conn.rollback()
            result.append(schema_lines(self.conn, self.target.version_table))

        with_lock_retries(self.target, read, on_retry)
        return result[-1]

    def _fingerprint(self, step: Step | None = None) -> str:
        return digest(self._schema(step))

    def _before(self, rev: Revision) -> str | None:
        """The fingerprint the schema had before ``rev`` went up in this run: what its
        downgrade must bring back. The previous revision's verify step recorded it."""
        if rev.down == self.run.from_revision:
            return self.run.fingerprint_before
        previous = self.run.step("verify", rev.down)
        return previous.detail.get("fingerprint") if previous else None

    def _end(self, step: Step, state: str, error: str | None = None, **detail: Any) -> None:
        ledger.finish_step(self.conn, step, state, error=error, **detail)
        self._report(step)

    # -- forward -----------------------------------------------------------------------------

    def forward(self) -> None:
        run = self.run
        path = self.project.upgrade_path(run.from_revision, run.to_revision)
        if run.options.get("backup", True):
            self.backup()
        for rev in path:
            self.upgrade(rev)
            self.verify(rev)

    def backup(self) -> None:
        step = self._begin("backup")
        if step is None:
            return
        try:
            info = backups.take_backup(self.target, self.run.id)
        except RunbookError as exc:
            self._end(step, st.STEP_FAILED, str(exc))
            raise StepFailed(str(exc)) from None
        ledger.update_run(self.conn, self.run, backup=info.as_dict())
        self._end(step, st.STEP_SUCCEEDED, size=info.size, sha256=info.sha256)

    def upgrade(self, rev: Revision) -> None:
        step = self._begin("upgrade", rev.id)
        if step is None:
            return
        current = self.project.current(self.conn)
        if step.attempts > 1 and current == rev.id:
            # An earlier delivery committed this upgrade and died before recording it.
            self._end(step, st.STEP_SUCCEEDED, recovered=True)
            return
        if current != rev.down:
            error = (
                f"expected the database at {rev.down or 'base'} before {rev.id}, found {current}"
            )
            self._end(step, st.STEP_FAILED, error)
            raise StepFailed(error)

        def on_retry(attempt: int, error: str, delay: float) -> None:
            ledger.bump_attempts(
                self.conn, step, f"lock timeout, retrying in {delay:.1f}s: {error}"
            )
            self._report(step)

        def attempt() -> None:
            if self.run.fingerprint_before is None:  # the run's first revision
                ledger.update_run(self.conn, self.run, fingerprint_before=self._fingerprint(step))
            self.project.upgrade_one(rev)

        try:
            with_lock_retries(self.target, attempt, on_retry)
        except Exception as exc:
            error = f"upgrade {rev.id} failed: {describe(exc)}"
            self._end(step, st.STEP_FAILED, error)
            raise StepFailed(error) from None
        self.run.current_revision = rev.id
        ledger.finish_step(self.conn, step, st.STEP_SUCCEEDED, current_revision=rev.id)
        self._report(step)

    def verify(self, rev: Revision) -> None:
        step = self._begin("verify", rev.id)
        if step is None:
            return
        try:
            lines = self._schema(step)
            checked = verify_revision(self.conn, self.project, self.target, rev, lines)
        except RunbookError as exc:
            self._end(step, st.STEP_FAILED, str(exc))
            raise StepFailed(str(exc)) from None
        except Exception as exc:
            error = f"verify {rev.id} failed: {describe(exc)}"
            self._end(step, st.STEP_FAILED, error)
            raise StepFailed(error) from None
        self._end(step, st.STEP_SUCCEEDED, fingerprint=digest(lines), **checked)

    # -- rollback ----------------------------------------------------------------------------

    def rollback(self) -> str:
        """Downgrade what this run applied, newest first; returns the terminal state."""
        run = self.run
        applied = {s.revision: s for s in run.steps if s.kind == "upgrade"}
        try:
            while True:
                current = self.project.current(self.conn)
                ledger.update_run(self.conn, run, current_revision=current)
                if current == run.from_revision:
                    break
                if current not in applied:
                    raise DowngradeImpossible(
                        f"the database is at {current}, which this run did not apply; "
                        "refusing to downgrade it"
                    )
                self.downgrade(self.project.revision(current))
            now = self._fingerprint()
            if run.fingerprint_before and now != run.fingerprint_before:
                raise DowngradeImpossible(
                    f"the database is back at {current or 'base'} but its schema differs from "
                    "before the run (work outside a transaction was not undone)"
                )
            return st.ROLLED_BACK
        except DowngradeImpossible as exc:
            reason = str(exc)
            if restore_from_backup(self.conn, self.target, run, reason):
                return st.RESTORED
            where = (run.backup or {}).get("path")
            hint = (
                f"restore the backup {where} (pg_restore --clean --if-exists)"
                if where
                else "no backup was taken for this run"
            )
            ledger.update_run(
                self.conn,
                run,
                error=redact(f"{run.error or 'run failed'}; rollback stopped: {reason}; {hint}"),
            )
            return st.FAILED

    def downgrade(self, rev: Revision) -> None:
        step = self._begin("downgrade", rev.id)
        if step is None:  # recorded as done, yet the database is still there: refuse to loop
            raise DowngradeImpossible(f"downgrade of {rev.id} ran but did not take effect")
        if rev.irreversible:
            error = f"{rev.id} cannot be downgraded: {rev.irreversible}"
            self._end(step, st.STEP_FAILED, error)
            raise DowngradeImpossible(error)
        try:
            with_lock_retries(
                self.target,
                lambda: self.project.downgrade_one(rev),
                lambda attempt, error, delay: ledger.bump_attempts(self.conn, step, error),
            )
        except Exception as exc:
            error = f"downgrade {rev.id} failed: {describe(exc)}"
            self._end(step, st.STEP_FAILED, error)
            raise DowngradeImpossible(error) from None
        expected = self._before(rev)
        now = self._fingerprint(step)
        if expected and now != expected:
            error = f"downgrade of {rev.id} did not bring the schema back to before its upgrade"
            self._end(step, st.STEP_FAILED, error, fingerprint=now)
            raise DowngradeImpossible(error)
        self._end(step, st.STEP_SUCCEEDED, fingerprint=now)


def execute(
    settings: Settings,
    run_id: str,
    target_name: str,
    *,
    progress: Progress | None = None,
    lock_wait_s: float = 5.0,
) -> Outcome:
    """Carry run ``run_id`` of ``target_name`` as far as it goes: one delivery of the task."""
    report = progress or (lambda _info: None)
    target = settings.target(target_name)  # a target the worker does not know is refused
    with db.run_lock(target, wait_s=lock_wait_s) as locked, db.connect(target) as conn:
        run = ledger.get_run(conn, run_id)
        if run.target != target.name:
            raise RunbookError(
                f"run {run_id} belongs to target {run.target!r}, not {target.name!r}"
            )
        if run.terminal:
            return Outcome(run.id, target.name, run.state, run.error, "already finished")
        if not locked:
            return Outcome(run.id, target.name, run.state, None, "another delivery holds the run")
        ledger.count_delivery(conn, run)
        if run.state == st.ENQUEUED:
            ledger.transition(conn, run, st.RUNNING)
        log.info(
            "run %s on target %s: %s (delivery %d)", run.id, target.name, run.state, run.deliveries
        )
        try:
            coordinator = Coordinator(conn, target, run, report)
        except RunbookError as exc:
            # A worker that meets bad configuration ends the run with the CLI's own line.
            ledger.transition(conn, run, st.FAILED, error=str(exc))
            return Outcome(run.id, target.name, run.state, run.error)
        try:
            return _drive(conn, coordinator, run, target, report)
        finally:
            coordinator.project.close()


def _drive(
    conn: Connection, coordinator: Coordinator, run: Run, target: Target, report: Progress
) -> Outcome:
    """Forward, then rollback if forward failed; the run's outcome."""
    if run.state == st.RUNNING:
        try:
            coordinator.forward()
            ledger.transition(conn, run, st.SUCCEEDED)
        except Exception as exc:
            error = str(exc) if isinstance(exc, RunbookError) else describe(exc)
            if conn.in_transaction():
                conn.rollback()
            if any(s.kind == "upgrade" for s in run.steps):
                ledger.transition(conn, run, st.ROLLING_BACK, error=error)
            else:  # nothing was changed yet (the backup failed): nothing to roll back
                ledger.transition(conn, run, st.FAILED, error=error)
    if run.state == st.ROLLING_BACK:
        ledger.transition(conn, run, coordinator.rollback())
    report({"run_id": run.id, "target": target.name, "state": run.state})
    return Outcome(run.id, target.name, run.state, run.error)
