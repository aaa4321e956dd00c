"""What every step of a run shares: the ledger's record of it (begin, or skip a step that
already succeeded; end; report the progress) and the schema reads its checks rest on.

jobs/run/coordinator.py (the forward path) and jobs/run/rollback.py (the way back) are
built on it.
"""

from __future__ import annotations

from typing import Any, NoReturn

from sqlalchemy import Connection

from jobs import states as st
from jobs.config import Target
from jobs.dispatch import Progress, SendSlice
from jobs.errors import StepFailed
from jobs.ledger import runs
from jobs.ledger.records import Run, Step
from jobs.pg.backoff import with_lock_retries
from jobs.project.runtime import Project
from jobs.run.verify import digest, schema_lines


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

    def _end(self, step: Step, state: str, error: str | None = None, **detail: Any) -> None:
        runs.finish_step(self.conn, step, state, error=error, **detail)
        self._report(step)

    def _fail(self, step: Step, error: str) -> NoReturn:
        self._end(step, st.STEP_FAILED, error)
        raise StepFailed(error)
