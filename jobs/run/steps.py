"""What every step of a run shares: the ledger's record of it (begin, or skip a step that
already succeeded; end; report the progress) and the schema reads its checks rest on.

jobs/run/coordinator.py (the forward path) and jobs/run/rollback.py (the way back) are
built on it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, NoReturn

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from jobs import states as st
from jobs.config import Target
from jobs.dispatch import Progress, SendSlice
from jobs.errors import StepFailed
from jobs.ledger import runs
from jobs.ledger.records import Run, Step
from jobs.pg.backoff import with_lock_retries
from jobs.pg.replication import Bounds
from jobs.pg.sqlstate import describe
from jobs.project.runtime import Project
from jobs.run import replicas
from jobs.run.verify import digest, schema_lines

log = logging.getLogger("runbook.coordinator")


class RunSteps:
    """One delivery's hold on a run: its connection, target, project and ledger record."""

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
        self.revisions: list[str] = []  # the run's revisions in order, for "upgrade 3 of 7"

    def _report(self, step: Step) -> None:
        started = self.run.started_at or self.run.created_at
        position = (
            self.revisions.index(step.revision) + 1 if step.revision in self.revisions else None
        )
        self.progress(
            {
                "run_id": self.run.id,
                "target": self.target.name,
                "state": self.run.state,
                "step": step.kind,
                "revision": step.revision or None,
                "revision_no": position,
                "revisions": len(self.revisions) or None,
                "step_state": step.state,
                "elapsed_s": round(max((datetime.now(UTC) - started).total_seconds(), 0.0), 1),
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

    def _end(self, step: Step, state: str, error: str | None = None, **detail: Any) -> None:
        runs.finish_step(self.conn, step, state, error=error, **detail)
        self._report(step)

    def _after_rewrite(self, step: Step, rewrote: list[str]) -> dict[str, Any]:
        """After a step whose SQL rewrote a table: wait for the standbys to replay it
        (jobs/run/replicas.py); the step's detail saying how that went ({} when nothing
        was rewritten)."""
        if not rewrote:
            return {}
        target = self.target

        def on_wait(reason: str) -> None:
            runs.note_step(self.conn, step, replica_wait={"outcome": "waiting", "reason": reason})
            self._report(step)

        try:
            waited = replicas.wait_for_standbys(
                lambda: replicas.read(self.conn, target),
                Bounds.of_target(target),
                wait_s=target.replica_wait_ms / 1000,
                check_s=target.throttle_check_ms / 1000,
                on_wait=on_wait,
            )
        except DBAPIError as exc:  # the step itself is done: a failed read must not undo it
            if self.conn.in_transaction():
                self.conn.rollback()
            waited = replicas.ReplicaWait(replicas.UNREADABLE, reason=describe(exc))
        waited.rewrites = rewrote
        if waited.outcome in (replicas.GAVE_UP, replicas.UNREADABLE):
            log.warning(
                "run %s on %s: %s %s: %s",
                self.run.id,
                target.name,
                step.kind,
                step.revision,
                waited.line(),
            )
        return {"replica_wait": waited.as_dict()}

    def _fail(self, step: Step, error: str) -> NoReturn:
        self._end(step, st.STEP_FAILED, error)
        raise StepFailed(error)
