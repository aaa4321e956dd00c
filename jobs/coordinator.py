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
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from jobs import db, hooks, ledger, plan, preflight, restore, vault
from jobs import rehearse as rehearsal
from jobs import states as st
from jobs.config import Settings, Target, redact
from jobs.errors import DowngradeImpossible, RunbookError, StepFailed
from jobs.ledger import Run, Step
from jobs.migrate import Project, Revision, describe, with_lock_retries
from jobs.verify import digest, schema_lines, verify_revision

log = logging.getLogger("runbook.coordinator")

Progress = Callable[[dict[str, Any]], None]

# Steps after which the target may differ from before the run: a failure must roll back.
CHANGING_STEPS = frozenset({"upgrade", "downgrade", "restore"})


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
        if self.run.kind == "apply" and rev.down == self.run.from_revision:
            return self.run.fingerprint_before
        previous = self.run.step("verify", rev.down)
        if previous is not None:
            return previous.detail.get("fingerprint")
        return ledger.recorded_fingerprint(self.conn, rev.down)

    def _end(self, step: Step, state: str, error: str | None = None, **detail: Any) -> None:
        ledger.finish_step(self.conn, step, state, error=error, **detail)
        self._report(step)

    # -- forward -----------------------------------------------------------------------------

    def forward(self) -> None:
        """The run's work, by kind; raises StepFailed (or any error) to start a rollback."""
        run = self.run
        self.hook("before_run")
        if run.kind == "backup":
            self.backup()
        elif run.kind == "apply":
            path = self.project.upgrade_path(run.from_revision, run.to_revision)
            if not run.irreversible:
                found = {r.id: r.irreversible for r in path if r.irreversible}
                ledger.update_run(self.conn, run, irreversible=found)
            self.preflight(path)
            if run.options.get("backup", True):
                self.backup()
            for rev in path:
                self.upgrade(rev)
                self.verify(rev)
        elif run.kind == "rollback":
            path = self.project.upgrade_path(run.to_revision, run.from_revision)
            if run.options.get("backup", True):
                self.backup()  # fresh and verified: what a failed rollback is restored from
            if run.fingerprint_before is None:
                ledger.update_run(self.conn, run, fingerprint_before=self._fingerprint())
            for rev in reversed(path):
                self.downgrade(rev)
                self.check_at(rev.down)
        elif run.kind == "restore":
            self.backup()  # the state being replaced stays recoverable
            self.restore(run.options["backup_id"], run.options.get("tables") or [])
        elif run.kind == "rehearse":
            self.rehearse()
        elif run.kind == "stamp":
            self.stamp(run.to_revision)
        else:
            raise StepFailed(f"unknown run kind {run.kind!r}")

    def preflight(self, path: list[Revision]) -> None:
        """The run's preconditions, checked before the backup (recorded as a step)."""
        step = self._begin("preflight")
        if step is None:
            return
        tables: list[str] = []
        for rev in path:
            try:
                sql = self.project.upgrade_sql(rev)
            except RunbookError:
                continue  # cannot render offline: its tables are unknown
            tables += [t for t in plan.tables_in(sql) if t != self.target.version_table]
        try:
            checked = preflight.preflight(
                self.conn,
                self.target,
                self.project,
                self.run.from_revision,
                self.run.to_revision,
                sorted(set(tables)),
                backup=bool(self.run.options.get("backup", True)),
            )
        except Exception as exc:
            error = str(exc) if isinstance(exc, RunbookError) else f"preflight: {describe(exc)}"
            self._end(step, st.STEP_FAILED, error)
            raise StepFailed(error) from None
        self._end(step, st.STEP_SUCCEEDED, **checked)

    def hook(self, which: str, state: str | None = None) -> None:
        """Run the target's before_run / after_run hook, recorded as a step."""
        command = getattr(self.target, which)
        if not command:
            return
        step = self._begin("hook", which)
        if step is None:
            return
        try:
            answer = hooks.run_hook(
                self.target, which, command, self.run.id, state or self.run.state
            )
        except hooks.HookFailed as exc:
            self._end(step, st.STEP_FAILED, str(exc))
            raise
        self._end(step, st.STEP_SUCCEEDED, **answer)

    def rehearse(self) -> None:
        """Up, down, up on a scratch copy restored from the latest verified backup at the
        current revision (a fresh one when there is none); the target is not touched."""
        run = self.run
        latest = next(
            (
                b
                for b in ledger.list_backups(self.conn, self.target.name)
                if b.verified and b.revision == run.from_revision
            ),
            None,
        )
        if latest is None:
            self.backup()
            latest = ledger.get_backup(self.conn, (run.backup or {})["id"])
        step = self._begin("rehearse", run.to_revision)
        if step is None:
            return
        try:
            assert latest is not None
            backup = vault.usable_backup(self.conn, self.target, latest.id)
            result = rehearsal.rehearse(self.target, Path(backup.path), run.to_revision)
        except RunbookError as exc:
            self._end(step, st.STEP_FAILED, str(exc))
            raise StepFailed(str(exc)) from None
        result["backup_id"] = latest.id
        if not result["complete"]:
            failed: dict[str, Any] = next(
                (r for r in result["revisions"] if r.get("up_error") or r.get("again_error")),
                {},
            )
            error = (
                f"rehearsal: {failed.get('revision')} failed to upgrade: "
                f"{failed.get('up_error') or failed.get('again_error')}"
            )
            self._end(step, st.STEP_FAILED, error, **result)
            raise StepFailed(error)
        self._end(step, st.STEP_SUCCEEDED, **result)

    def stamp(self, revision: str | None) -> None:
        """Record ``revision`` in the version table without running migrations (§8)."""
        step = self._begin("stamp", revision)
        if step is None:
            return
        before = self.project.recorded(self.conn)
        try:
            self.project.stamp(revision)
        except Exception as exc:
            error = f"stamp {revision or 'base'} failed: {describe(exc)}"
            self._end(step, st.STEP_FAILED, error)
            raise StepFailed(error) from None
        ledger.update_run(self.conn, self.run, current_revision=revision)
        self._end(step, st.STEP_SUCCEEDED, before=before, after=self.project.recorded(self.conn))

    def check_at(self, revision: str | None) -> None:
        """After a downgrade step: the database must be at ``revision``."""
        current = self.project.current(self.conn)
        if current != revision:
            raise StepFailed(f"after the downgrade the database is at {current}, not {revision}")
        ledger.update_run(self.conn, self.run, current_revision=current)

    def backup(self) -> None:
        step = self._begin("backup")
        if step is None:
            return
        try:
            revision = self.project.current(self.conn)
            info = vault.take_backup(self.target, self.run.id)
            ledger.record_backup(
                self.conn, info.ledger_row(self.target.name, self.run.id, revision)
            )
            keep = {self.run.options.get("backup_id") or ""}
            removed = vault.apply_retention(self.conn, self.target, keep)
        except RunbookError as exc:
            self._end(step, st.STEP_FAILED, str(exc))
            raise StepFailed(str(exc)) from None
        ledger.update_run(self.conn, self.run, backup=info.as_dict())
        self._end(
            step,
            st.STEP_SUCCEEDED,
            backup_id=info.id,
            size=info.size,
            sha256=info.sha256,
            verification=info.verification,
            copies=info.copies,
            retention_removed=removed,
        )

    def restore(self, backup_id: str, tables: list[str]) -> None:
        """Restore a backup (whole, or some tables) and prove the result equals it."""
        step = self._begin("restore", backup_id)
        if step is None:
            return
        try:
            backup = vault.usable_backup(self.conn, self.target, backup_id)
            path = Path(backup.path)
            if tables:
                done = restore.restore_tables(self.target, path, tables)
            else:
                done = restore.restore_database(self.target, path)
            checked = vault.check_restored(
                self.conn, backup, tables, self.project.current(self.conn)
            )
        except RunbookError as exc:
            self._end(step, st.STEP_FAILED, str(exc))
            raise StepFailed(str(exc)) from None
        self._end(step, st.STEP_SUCCEEDED, restore=done, checked=checked)

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
        ledger.finish_step(
            self.conn, step, st.STEP_SUCCEEDED, current_revision=rev.id, file_sha256=rev.sha256
        )
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
        """Undo what the run changed; returns the terminal state.

        An apply downgrades what it applied, newest first, each checked by the schema
        fingerprint; an operator rollback or restore that failed is restored from the fresh
        backup it took first. When downgrades cannot undo the run, the backup is restored.
        """
        run = self.run
        if run.kind != "apply":
            if any(s.kind in ("downgrade", "restore") for s in run.steps):
                return self.restore_after(f"the {run.kind} failed: {run.error}")
            return st.FAILED
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
            return self.restore_after(str(exc))

    def restore_after(self, reason: str) -> str:
        """A downgrade cannot undo the run: restore the run's backup, checked; the end state."""
        run = self.run
        backup_id = (run.backup or {}).get("id")
        if backup_id:
            try:
                self.restore(backup_id, [])
                ledger.update_run(
                    self.conn,
                    run,
                    error=f"{run.error or 'run failed'}; restored from backup "
                    f"{backup_id} because {reason}",
                    current_revision=self.project.current(self.conn),
                )
                return st.RESTORED
            except StepFailed as failed:
                reason = f"{reason}; restoring backup {backup_id} failed too: {failed}"
        where = (run.backup or {}).get("path")
        hint = (
            f"the backup is {where} (runbook restore --backup {backup_id})"
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
        if rev.declared_irreversible:
            error = f"{rev.id} cannot be downgraded: {rev.declared_irreversible}"
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
            found = {**self.run.irreversible, rev.id: "its downgrade did not restore the schema"}
            ledger.update_run(self.conn, self.run, irreversible=found)
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
    """Forward, then rollback if forward failed, then the after_run hook; the outcome."""
    final: str | None = None
    if run.state == st.RUNNING:
        try:
            coordinator.forward()
            final = st.SUCCEEDED
        except Exception as exc:
            error = str(exc) if isinstance(exc, RunbookError) else describe(exc)
            if conn.in_transaction():
                conn.rollback()
            if any(s.kind in CHANGING_STEPS for s in run.steps):
                ledger.transition(conn, run, st.ROLLING_BACK, error=error)
            else:  # nothing was changed yet (a hook or the backup failed): nothing to undo
                ledger.update_run(conn, run, error=error)
                final = st.FAILED
    if run.state == st.ROLLING_BACK:
        final = coordinator.rollback()
    assert final is not None
    try:
        coordinator.hook("after_run", final)  # whatever the outcome
    except hooks.HookFailed as exc:
        ledger.update_run(conn, run, error=f"{run.error + '; ' if run.error else ''}{exc}")
    ledger.transition(conn, run, final)
    report({"run_id": run.id, "target": target.name, "state": run.state})
    return Outcome(run.id, target.name, run.state, run.error)
