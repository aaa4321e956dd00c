"""The coordinator: carries one run through backup, upgrade + verify per revision, and
rollback on failure, recording every step in the ledger.

It is idempotent by run id. Celery may deliver the same run twice, or again after a worker
died: the run lock lets only one delivery work at a time, and each step is looked up in the
ledger before it is done, so finished steps are never repeated and an interrupted one is
checked against the database before it is redone.

A revision's declared backfills run between its upgrade and its verify. On a worker their
slices go out as tasks and the delivery returns with the run still ``running`` (the run lock
released); the backfill's last slice sends the run again, and the next delivery finds the
backfill step's outcome in the ledger and goes on, or rolls back.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import Connection

from jobs import states as st
from jobs.backfill import control, declared
from jobs.backfill import slices as backfill_slices
from jobs.backups import leftovers, restore, restore_tables, vault
from jobs.config import Settings, Target, redact
from jobs.dispatch import Progress, SendSlice
from jobs.errors import DowngradeImpossible, RunbookError, StepFailed, VerifyFailed
from jobs.insight import parse
from jobs.insight import rehearse as insight_rehearse
from jobs.ledger import backfills as ledger_backfills
from jobs.ledger import backups, fingerprints, runs
from jobs.ledger.runs import Run, Step
from jobs.pg import db
from jobs.pg.sqlstate import describe
from jobs.project.runtime import Project, with_lock_retries
from jobs.project.scripts import DeclaredBackfill, Revision
from jobs.run import hooks, lease, preflight
from jobs.run.verify import digest, schema_lines, verify_revision

log = logging.getLogger("runbook.coordinator")

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
    waiting_for: str | None = None  # the backfill this run waits for
    waiting_state: str | None = None  # its state when this delivery stopped waiting

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "target": self.target,
            "state": self.state,
            "error": self.error,
            "note": self.note,
            "waiting_for": self.waiting_for,
        }


class AwaitingBackfill(Exception):
    """Raised inside a delivery when the run must wait for a backfill; not a failure."""

    def __init__(self, backfill_id: str, state: str) -> None:
        super().__init__(f"waiting for backfill {backfill_id} ({state})")
        self.backfill_id = backfill_id
        self.state = state


class Coordinator:
    def __init__(
        self,
        conn: Connection,
        target: Target,
        run: Run,
        progress: Progress,
        send_slice: SendSlice | None = None,
    ) -> None:
        self.conn = conn
        self.target = target
        self.run = run
        self.progress = progress
        self.send_slice = send_slice  # None: backfill slices run here, in this process
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
        step = runs.start_step(self.conn, self.run, kind, rev)
        self._report(step)
        return step

    def _schema(self, step: Step | None = None) -> list[str]:
        """The schema lines, read with lock retries like DDL: reading column defaults takes
        a share lock on each table, which an application's ACCESS EXCLUSIVE lock blocks."""
        result: list[list[str]] = []

        def on_retry(attempt: int, error: str, delay: float) -> None:
            if step is not None:
                runs.bump_attempts(self.conn, step, f"lock timeout, retrying in {delay:.1f}s")
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
        return fingerprints.recorded_fingerprint(self.conn, rev.down)

    def _end(self, step: Step, state: str, error: str | None = None, **detail: Any) -> None:
        runs.finish_step(self.conn, step, state, error=error, **detail)
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
                runs.update_run(self.conn, run, irreversible=found)
            self.preflight(path)
            if run.options.get("backup", True):
                self.backup()
            for rev in path:
                self.upgrade(rev)
                self.backfills(rev)
                self.verify(rev)
        elif run.kind == "rollback":
            path = self.project.upgrade_path(run.to_revision, run.from_revision)
            if run.options.get("backup", True):
                self.backup()  # fresh and verified: what a failed rollback is restored from
            if run.fingerprint_before is None:
                runs.update_run(self.conn, run, fingerprint_before=self._fingerprint())
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
        try:  # a bad declaration is refused before anything changes
            self.project.check_declarations(path)
        except RunbookError as exc:
            self._end(step, st.STEP_FAILED, str(exc))
            raise StepFailed(str(exc)) from None
        tables: list[str] = []
        for rev in path:
            tables += [str(item.declared["table"]) for item in rev.backfills]
        for sql in self._render_offline(path):
            tables += [t for t in parse.tables_in(sql) if t != self.target.version_table]
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

    def _render_offline(self, path: list[Revision]) -> list[str]:
        """The SQL of the revisions of ``path`` that render offline, in as few runs of env.py
        as it takes: the rest of the path at once; when a revision fails, the revisions before
        it at once and the rest after it (a revision that cannot render is left out, its
        tables unknown). One env.py run per revision took longer than the run's upgrades."""
        rendered: list[str] = []
        rest = list(path)
        while rest:
            try:
                rendered.append(self.project.upgrade_range_sql(rest, as_runbook_runs_it=True))
                break
            except RunbookError as exc:
                bad = _failing_revision(exc, rest)
            if bad is None:  # no revision to blame: one by one, as each renders alone
                for rev in rest:
                    with contextlib.suppress(RunbookError):
                        rendered.append(self.project.upgrade_sql(rev, as_runbook_runs_it=True))
                break
            if bad:
                with contextlib.suppress(RunbookError):
                    rendered.append(
                        self.project.upgrade_range_sql(rest[:bad], as_runbook_runs_it=True)
                    )
            rest = rest[bad + 1 :]
        return rendered

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
                for b in backups.list_backups(self.conn, self.target.name)
                if b.verified and b.revision == run.from_revision
            ),
            None,
        )
        if latest is None:
            self.backup()
            latest = backups.get_backup(self.conn, (run.backup or {})["id"])
        step = self._begin("rehearse", run.to_revision)
        if step is None:
            return
        try:
            assert latest is not None
            backup = vault.usable_backup(self.conn, self.target, latest.id)
            result = insight_rehearse.rehearse(
                self.target,
                Path(backup.path),
                run.to_revision,
                owner=leftovers.Owner(run.id, run.deliveries),
            )
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
        runs.update_run(self.conn, self.run, current_revision=revision)
        self._end(step, st.STEP_SUCCEEDED, before=before, after=self.project.recorded(self.conn))

    def check_at(self, revision: str | None) -> None:
        """After a downgrade step: the database must be at ``revision``."""
        current = self.project.current(self.conn)
        if current != revision:
            raise StepFailed(f"after the downgrade the database is at {current}, not {revision}")
        runs.update_run(self.conn, self.run, current_revision=current)

    def backup(self) -> None:
        step = self._begin("backup")
        if step is None:
            return
        try:
            revision = self.project.current(self.conn)
            info = vault.take_backup(self.target, self.run.id, delivery=self.run.deliveries)
            backups.record_backup(
                self.conn, info.ledger_row(self.target.name, self.run.id, revision)
            )
            keep = {self.run.options.get("backup_id") or ""}
            removed = vault.apply_retention(self.conn, self.target, keep)
        except RunbookError as exc:
            self._end(step, st.STEP_FAILED, str(exc))
            raise StepFailed(str(exc)) from None
        runs.update_run(self.conn, self.run, backup=info.as_dict())
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
        unmet = self._unmet_requirement(rev)
        if unmet:
            self._end(step, st.STEP_FAILED, unmet)
            raise StepFailed(unmet)

        def on_retry(attempt: int, error: str, delay: float) -> None:
            runs.bump_attempts(self.conn, step, f"lock timeout, retrying in {delay:.1f}s: {error}")
            self._report(step)

        def attempt() -> None:
            if self.run.fingerprint_before is None:  # the run's first revision
                runs.update_run(self.conn, self.run, fingerprint_before=self._fingerprint(step))
            self.project.upgrade_one(rev)

        try:
            with_lock_retries(self.target, attempt, on_retry)
        except Exception as exc:
            error = f"upgrade {rev.id} failed: {describe(exc)}"
            self._end(step, st.STEP_FAILED, error)
            raise StepFailed(error) from None
        self.run.current_revision = rev.id
        runs.finish_step(
            self.conn, step, st.STEP_SUCCEEDED, current_revision=rev.id, file_sha256=rev.sha256
        )
        self._report(step)

    def _unmet_requirement(self, rev: Revision) -> str | None:
        """Why ``rev`` may not go up yet: a backfill it requires has not finished."""
        try:
            return declared.unmet_requirement(self.conn, self.target.name, self.project, rev)
        except RunbookError as exc:
            return str(exc)
        except Exception as exc:
            return f"checking the backfills {rev.id} requires failed: {describe(exc)}"

    # -- declared backfills ------------------------------------------------------------------

    def backfills(self, rev: Revision) -> None:
        """The backfills ``rev`` declares, one after another, as one step. With a sender (on
        a worker) their slices go out as tasks and this delivery ends (AwaitingBackfill);
        without one they run here."""
        items = rev.backfills
        if not items:
            return
        step = self.run.step("backfill", rev.id)
        if step is None or step.state != st.STEP_RUNNING:  # a waiting step is not restarted
            step = self._begin("backfill", rev.id)
            if step is None:
                return
        done = [self._backfill(step, rev, item) for item in items]
        self._end(step, st.STEP_SUCCEEDED, backfills=done)

    def _backfill(self, step: Step, rev: Revision, item: DeclaredBackfill) -> str:
        """One declared backfill to its end; its id. StepFailed when it errored or was
        cancelled; AwaitingBackfill while it runs elsewhere or is paused."""
        bf = declared.latest(self.conn, item, run_id=self.run.id)
        if bf is None:
            try:
                backfill_id = declared.create(self.conn, self.target, item, self.run.id)
            except RunbookError as exc:
                self._fail(step, f"backfill of {rev.id} ({item.describe()}) refused: {exc}")
            ids = [*step.detail.get("backfills", []), backfill_id]
            runs.note_step(self.conn, step, backfills=ids)
            bf = control.get(self.conn, backfill_id)
        if bf.state in st.BACKFILL_CLAIM:  # enqueued, or its slices may have been lost: (re)start
            slices = control.start(self.conn, bf.id)
            bf = control.get(self.conn, bf.id)
            if self.send_slice is not None:
                backfill_slices.send_slices(
                    self.conn, self.target.name, bf.id, slices, self.send_slice
                )
                self._report(step)
                raise AwaitingBackfill(bf.id, bf.state)
            declared.run_here(self.target, bf.id, slices)
            bf = control.get(self.conn, bf.id)
        if bf.state == st.SUCCEEDED:
            return bf.id
        if bf.state in (st.ERRORED, st.CANCELLED):
            why = f": {bf.error}" if bf.error else ""
            self._fail(step, f"backfill {bf.id} of {rev.id} ({item.describe()}) {bf.state}{why}")
        raise AwaitingBackfill(bf.id, bf.state)  # paused: the operator resumes it

    def _fail(self, step: Step, error: str) -> NoReturn:
        self._end(step, st.STEP_FAILED, error)
        raise StepFailed(error)

    def _check_backfilled(self, rev: Revision) -> None:
        """Before ``rev`` is verified: no row still matches a WHERE of its backfills."""
        for item in rev.backfills:
            if declared.rows_still_matching(self.conn, item):
                raise VerifyFailed(
                    f"verify {rev.id}: rows of {item.declared['table']} still match "
                    f"{item.declared['where']} after its backfill finished (written while it "
                    "ran?); make the application write them, then apply again"
                )

    def _cancel_backfills(self) -> None:
        """A run rolling back cancels its unfinished backfills: their revision goes down."""
        for bf in ledger_backfills.list_backfills(self.conn, run_id=self.run.id):
            if bf.state not in st.BACKFILL_TERMINAL:
                control.cancel(self.conn, bf.id)

    def verify(self, rev: Revision) -> None:
        step = self._begin("verify", rev.id)
        if step is None:
            return
        try:
            self._check_backfilled(rev)
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
        self._cancel_backfills()
        applied = {s.revision: s for s in run.steps if s.kind == "upgrade"}
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
        self._end(step, st.STEP_SUCCEEDED, fingerprint=now)


def _failing_revision(exc: BaseException, path: list[Revision]) -> int | None:
    """The index in ``path`` of the revision whose code raised ``exc``'s cause (the deepest
    frame in one of their files), or None."""
    files = {str(Path(rev.path).resolve()): i for i, rev in enumerate(path)}
    found: int | None = None
    cause = exc.__cause__ or exc.__context__
    tb = cause.__traceback__ if cause is not None else None
    while tb is not None:
        index = files.get(str(Path(tb.tb_frame.f_code.co_filename).resolve()))
        if index is not None:
            found = index
        tb = tb.tb_next
    return found


def execute(
    settings: Settings,
    run_id: str,
    target_name: str,
    *,
    progress: Progress | None = None,
    send_slice: SendSlice | None = None,
    lock_wait_s: float = 5.0,
) -> Outcome:
    """Carry run ``run_id`` of ``target_name`` as far as it goes: one delivery of the task.

    ``send_slice`` queues one task of a declared backfill's slice (worker/tasks.py's
    ``slice_sender``): the run then returns ``running`` and waits for the backfill's last
    slice to send it again. Without it the slices run here, in this delivery.
    """
    target = settings.target(target_name)  # a target the worker does not know is refused
    while True:
        outcome = _deliver(target, run_id, progress, send_slice, lock_wait_s)
        if not _backfill_moved_on(target, outcome):
            return outcome
        # The backfill stopped while this delivery still held the run lock: the delivery its
        # last slice sent may have found the lock held and given up, so carry on here.


def _backfill_moved_on(target: Target, outcome: Outcome) -> bool:
    """Whether the backfill ``outcome`` waits for has changed state since."""
    if outcome.waiting_for is None:
        return False
    with db.connect(target) as conn:
        bf = ledger_backfills.get_backfill(conn, outcome.waiting_for)
    return bf is not None and bf.state != outcome.waiting_state


def _deliver(
    target: Target,
    run_id: str,
    progress: Progress | None,
    send_slice: SendSlice | None,
    lock_wait_s: float,
) -> Outcome:
    """One pass over the run under its run lock."""
    report = progress or (lambda _info: None)
    with db.run_lock(target, wait_s=lock_wait_s) as locked, db.connect(target) as conn:
        run = runs.get_run(conn, run_id)
        if run.target != target.name:
            raise RunbookError(
                f"run {run_id} belongs to target {run.target!r}, not {target.name!r}"
            )
        if run.terminal:
            return Outcome(run.id, target.name, run.state, run.error, "already finished")
        if not locked:
            return Outcome(run.id, target.name, run.state, None, "another delivery holds the run")
        with lease.held(target, run.id) as carry_on:
            if not carry_on:  # a poison run, failed just now
                run = runs.get_run(conn, run_id)
                return Outcome(run.id, target.name, run.state, run.error)
            return _carry(conn, target, run, report, send_slice)


def _carry(
    conn: Connection,
    target: Target,
    run: Run,
    report: Progress,
    send_slice: SendSlice | None,
) -> Outcome:
    """The delivery that holds the run lock and the lease: count it, and carry the run."""
    runs.count_delivery(conn, run)
    if run.state == st.ENQUEUED:
        runs.transition(conn, run, st.RUNNING)
    log.info(
        "run %s on target %s: %s (delivery %d)", run.id, target.name, run.state, run.deliveries
    )
    try:
        coordinator = Coordinator(conn, target, run, report, send_slice)
    except RunbookError as exc:
        # A worker that meets bad configuration ends the run with the CLI's own line.
        runs.transition(conn, run, st.FAILED, error=str(exc))
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
        except AwaitingBackfill as waiting:
            if conn.in_transaction():
                conn.rollback()
            log.info("run %s on target %s: %s", run.id, target.name, waiting)
            return Outcome(
                run.id,
                target.name,
                run.state,
                note=str(waiting),
                waiting_for=waiting.backfill_id,
                waiting_state=waiting.state,
            )
        except Exception as exc:
            error = str(exc) if isinstance(exc, RunbookError) else describe(exc)
            if conn.in_transaction():
                conn.rollback()
            if any(s.kind in CHANGING_STEPS for s in run.steps):
                runs.transition(conn, run, st.ROLLING_BACK, error=error)
            else:  # nothing was changed yet (a hook or the backup failed): nothing to undo
                runs.update_run(conn, run, error=error)
                final = st.FAILED
    if run.state == st.ROLLING_BACK:
        final = coordinator.rollback()
    assert final is not None
    try:
        coordinator.hook("after_run", final)  # whatever the outcome
    except hooks.HookFailed as exc:
        runs.update_run(conn, run, error=f"{run.error + '; ' if run.error else ''}{exc}")
    runs.transition(conn, run, final)
    report({"run_id": run.id, "target": target.name, "state": run.state})
    return Outcome(run.id, target.name, run.state, run.error)
