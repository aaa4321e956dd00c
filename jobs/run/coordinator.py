"""The coordinator: carries one run forward, by its kind: backup, upgrade + verify per
revision, rehearse, stamp; recording every step in the ledger (jobs/run/steps.py). Its way
back (downgrade, restore, rollback on failure) is jobs/run/rollback.py; a delivery of the
run's task, which drives both, is jobs/run/deliver.py.

Each step is looked up in the ledger before it is done, so a step a delivery finished is
never repeated and an interrupted one is checked against the database before it is redone.

A revision's declared backfills run between its upgrade and its verify. On a worker their
slices go out as tasks and the delivery returns with the run still ``running`` (the run lock
released); the backfill's last slice sends the run again, and the next delivery finds the
backfill step's outcome in the ledger and goes on, or rolls back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from jobs import states as st
from jobs.backfill import control, declared
from jobs.backfill import slices as backfill_slices
from jobs.backups import leftovers, vault
from jobs.errors import (
    AwaitingBackfill,
    HookFailed,
    PreflightFailed,
    RunbookError,
    StepFailed,
    VerifyFailed,
)
from jobs.insight import parse, rewrites
from jobs.insight import rehearse as insight_rehearse
from jobs.ledger import backups, runs
from jobs.ledger.records import Step
from jobs.pg.backoff import with_lock_retries
from jobs.pg.sqlstate import describe
from jobs.project.scripts import DeclaredBackfill, Revision
from jobs.run import hooks, preflight
from jobs.run.rollback import Rollback
from jobs.run.verify import digest, verify_revision


class Coordinator(Rollback):
    """One delivery's work on a run: forward by the run's kind, back when that failed."""

    # -- forward -----------------------------------------------------------------------------

    def forward(self) -> None:
        """The run's work, by kind; raises StepFailed (or any error) to start a rollback."""
        run = self.run
        self.hook("before_run")
        if run.kind == st.RunKind.BACKUP:
            self.backup()
        elif run.kind == st.RunKind.APPLY:
            path = self.project.upgrade_path(run.from_revision, run.to_revision)
            self.revisions = [rev.id for rev in path]
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
        elif run.kind == st.RunKind.ROLLBACK:
            path = self.project.upgrade_path(run.to_revision, run.from_revision)
            self.revisions = [rev.id for rev in reversed(path)]
            if run.options.get("backup", True):
                self.backup()  # fresh and verified: what a failed rollback is restored from
            if run.fingerprint_before is None:
                runs.update_run(self.conn, run, fingerprint_before=self._fingerprint())
            for rev in reversed(path):
                self.downgrade(rev)
                self.check_at(rev.down)
        elif run.kind == st.RunKind.RESTORE:
            self.backup()  # the state being replaced stays recoverable
            self.restore(run.options["backup_id"], run.options.get("tables") or [])
        elif run.kind == st.RunKind.REHEARSE:
            self.rehearse()
        elif run.kind == st.RunKind.STAMP:
            self.stamp(run.to_revision)
        else:
            raise StepFailed(f"unknown run kind {run.kind!r}")

    def preflight(self, path: list[Revision]) -> None:
        """The run's preconditions, checked before the backup (recorded as a step)."""
        step = self._begin(st.StepKind.PREFLIGHT)
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
        rewriting: dict[str, list[str]] = {}  # what the run waits for standbys after
        for sql in self._render_offline(path):
            tables += [t for t in parse.tables_in(sql) if t != self.target.version_table]
            for rev_id, own in rewrites.by_revision(sql).items():
                found = rewrites.rewrites(own)
                if found:
                    rewriting[rev_id] = found
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
        except PreflightFailed as exc:
            self._end(step, st.STEP_FAILED, str(exc), **exc.detail)
            raise StepFailed(str(exc)) from None
        except Exception as exc:
            error = str(exc) if isinstance(exc, RunbookError) else f"preflight: {describe(exc)}"
            self._end(step, st.STEP_FAILED, error)
            raise StepFailed(error) from None
        self._end(step, st.STEP_SUCCEEDED, **checked, rewrites=rewriting)

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
        step = self._begin(st.StepKind.HOOK, which)
        if step is None:
            return
        try:
            answer = hooks.run_hook(
                self.target, which, command, self.run.id, state or self.run.state
            )
        except HookFailed as exc:
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
        step = self._begin(st.StepKind.REHEARSE, run.to_revision)
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
        """Record ``revision`` in the version table without running migrations."""
        step = self._begin(st.StepKind.STAMP, revision)
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
        step = self._begin(st.StepKind.BACKUP)
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

    def upgrade(self, rev: Revision) -> None:
        step = self._begin(st.StepKind.UPGRADE, rev.id)
        if step is None:
            return
        current = self.project.current(self.conn)
        if step.attempts > 1 and current == rev.id:
            # An earlier delivery committed this upgrade and died before recording it.
            waited = self._after_rewrite(step, self._upgrade_rewrites(rev))
            self._end(step, st.STEP_SUCCEEDED, recovered=True, **waited)
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
        waited = self._after_rewrite(step, self._upgrade_rewrites(rev))
        runs.finish_step(
            self.conn,
            step,
            st.STEP_SUCCEEDED,
            current_revision=rev.id,
            file_sha256=rev.sha256,
            **waited,
        )
        self._report(step)

    def _upgrade_rewrites(self, rev: Revision) -> list[str]:
        """The statements of ``rev``'s upgrade that rewrite a table, as preflight found them
        (a run without a preflight step renders the revision now)."""
        checked = self.run.step(st.StepKind.PREFLIGHT)
        if checked is not None and "rewrites" in checked.detail:
            return list(checked.detail["rewrites"].get(rev.id, []))
        try:
            return rewrites.rewrites(self.project.upgrade_sql(rev, as_runbook_runs_it=True))
        except RunbookError:
            return []  # it cannot be rendered offline: what it rewrites is unknown

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
        step = self.run.step(st.StepKind.BACKFILL, rev.id)
        if step is None or step.state != st.STEP_RUNNING:  # a waiting step is not restarted
            step = self._begin(st.StepKind.BACKFILL, rev.id)
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

    def _check_backfilled(self, rev: Revision) -> None:
        """Before ``rev`` is verified: no row still matches a WHERE of its backfills."""
        for item in rev.backfills:
            if declared.rows_still_matching(self.conn, item):
                raise VerifyFailed(
                    f"verify {rev.id}: rows of {item.declared['table']} still match "
                    f"{item.declared['where']} after its backfill finished (written while it "
                    "ran?); make the application write them, then apply again"
                )

    def verify(self, rev: Revision) -> None:
        step = self._begin(st.StepKind.VERIFY, rev.id)
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
