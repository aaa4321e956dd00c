"""The way back: a revision's downgrade, checked by the schema fingerprint; a backup's
restore, proved equal to the backup; and the rollback of a failed run, which downgrades
what the run applied and restores the run's backup when downgrades cannot undo it.
"""

from __future__ import annotations

from pathlib import Path

from jobs import states as st
from jobs.backfill import control
from jobs.backups import restore, restore_tables, vault
from jobs.config import redact
from jobs.errors import DowngradeImpossible, RunbookError, StepFailed
from jobs.insight import rewrites
from jobs.ledger import backfills as ledger_backfills
from jobs.ledger import fingerprints, runs
from jobs.pg.backoff import with_lock_retries
from jobs.pg.sqlstate import describe
from jobs.project.scripts import Revision
from jobs.run.steps import RunSteps


class Rollback(RunSteps):
    """The coordinator's steps back (jobs/run/coordinator.py's Coordinator is one)."""

    def rollback(self) -> str:
        """Undo what the run changed; returns the terminal state.

        An apply downgrades what it applied, newest first, each checked by the schema
        fingerprint; an operator rollback or restore that failed is restored from the fresh
        backup it took first. When downgrades cannot undo the run, the backup is restored.
        """
        run = self.run
        if run.kind != st.RunKind.APPLY:
            if any(s.kind in (st.StepKind.DOWNGRADE, st.StepKind.RESTORE) for s in run.steps):
                return self.restore_after(f"the {run.kind} failed: {run.error}")
            return st.FAILED
        self._cancel_backfills()
        applied = {s.revision: s for s in run.steps if s.kind == st.StepKind.UPGRADE}
        try:
            while True:
                current = self.project.current(self.conn)
                runs.update_run(self.conn, run, current_revision=current)
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
                runs.update_run(
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
        runs.update_run(
            self.conn,
            run,
            error=redact(f"{run.error or 'run failed'}; rollback stopped: {reason}; {hint}"),
        )
        return st.FAILED

    def downgrade(self, rev: Revision) -> None:
        step = self._begin(st.StepKind.DOWNGRADE, rev.id)
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
                lambda attempt, error, delay: runs.bump_attempts(self.conn, step, error),
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
            runs.update_run(self.conn, self.run, irreversible=found)
            raise DowngradeImpossible(error)
        waited = self._after_rewrite(step, self._downgrade_rewrites(rev))
        self._end(step, st.STEP_SUCCEEDED, fingerprint=now, **waited)

    def _downgrade_rewrites(self, rev: Revision) -> list[str]:
        """The statements of ``rev``'s downgrade that rewrite a table (rendered offline)."""
        try:
            return rewrites.rewrites(self.project.downgrade_sql(rev))
        except RunbookError:
            return []  # it cannot be rendered offline: what it rewrites is unknown

    def _before(self, rev: Revision) -> str | None:
        """The fingerprint the schema had before ``rev`` went up in this run: what its
        downgrade must bring back. The previous revision's verify step recorded it."""
        if self.run.kind == st.RunKind.APPLY and rev.down == self.run.from_revision:
            return self.run.fingerprint_before
        previous = self.run.step(st.StepKind.VERIFY, rev.down)
        if previous is not None:
            return previous.detail.get("fingerprint")
        return fingerprints.recorded_fingerprint(self.conn, rev.down)

    def _cancel_backfills(self) -> None:
        """A run rolling back cancels its unfinished backfills: their revision goes down."""
        for bf in ledger_backfills.list_backfills(self.conn, run_id=self.run.id):
            if bf.state not in st.BACKFILL_TERMINAL:
                control.cancel(self.conn, bf.id)

    def restore(self, backup_id: str, tables: list[str]) -> None:
        """Restore a backup (whole, or some tables) and prove the result equals it."""
        step = self._begin(st.StepKind.RESTORE, backup_id)
        if step is None:
            return
        try:
            backup = vault.usable_backup(self.conn, self.target, backup_id)
            path = Path(backup.path)
            if tables:
                done = restore_tables.restore_tables(self.target, path, tables)
            else:
                done = restore.restore_database(self.target, path)
            checked = vault.check_restored(
                self.conn, backup, tables, self.project.current(self.conn)
            )
        except RunbookError as exc:
            self._end(step, st.STEP_FAILED, str(exc))
            raise StepFailed(str(exc)) from None
        self._end(step, st.STEP_SUCCEEDED, restore=done, checked=checked)
        # The backup brought its own version table back: the record says where that left us.
        runs.update_run(self.conn, self.run, current_revision=self.project.current(self.conn))
