"""Every exception runbook defines, in one place: all but one derive from RunbookError.

The message of each is one line meant for an operator: what is wrong and what to do.
Sub-roots group what callers catch together (``except BackupError`` in jobs/backups/vault.py,
``except StepFailed`` in jobs/run/coordinator.py); a class sits where it was before these were
gathered here, so no ``except`` catches more or less than it did.
"""

from __future__ import annotations


class RunbookError(Exception):
    """Raised when runbook refuses or fails an operation; the root of all runbook errors."""

    #: Exit code the CLI uses: 2 for bad input or configuration, 1 for a run that failed.
    exit_code = 2


# -- configuration, project, input -----------------------------------------------------------


class ConfigError(RunbookError):
    """Raised when runbook.toml, the environment or a target definition is invalid."""


class FlowerAuthMissing(ConfigError):
    """Raised when `runbook flower` finds no usable FLOWER_BASIC_AUTH (user:password)."""


class UnknownTarget(ConfigError):
    """Raised when a target name is not in the configuration."""


class TargetUnreachable(RunbookError):
    """Raised when the target database cannot be connected to or refuses the login."""


class ProjectError(RunbookError):
    """Raised when the Alembic project (alembic.ini, script directory, history) is unusable."""


class RevisionError(RunbookError):
    """Raised when a requested revision is unknown or not reachable from the current one."""


class UnrenderableRevision(RevisionError):
    """Raised when a revision's upgrade or downgrade cannot be rendered as SQL offline."""


class BadDeclaration(RunbookError):
    """Raised when a revision's declared ``backfills`` or ``requires_backfills`` are unusable."""


class UnsafeSql(RunbookError):
    """Raised when an operator-written name or SQL fragment is malformed or not allowed."""


# -- runs ------------------------------------------------------------------------------------


class TargetBusy(RunbookError):
    """Raised when another run holds the target."""

    def __init__(self, message: str, holder: str | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class BrokerUnavailable(RunbookError):
    """Raised when the Celery broker (Redis) cannot be reached."""


class UnknownRun(RunbookError):
    """Raised when a run id is not found in any target's ledger."""


class IllegalTransition(RunbookError):
    """Raised when a run, step, backfill or slice is asked to move where its state forbids."""


class StepFailed(RunbookError):
    """Raised when a step of a run fails; the run then rolls back."""

    exit_code = 1


class PreflightFailed(StepFailed):
    """Raised when a precondition of the run does not hold; nothing was changed."""

    def __init__(self, message: str, **detail: object) -> None:
        super().__init__(message)
        self.detail = detail  # what preflight had found by then, recorded on its step


class HookFailed(StepFailed):
    """Raised when a before_run or after_run hook fails or times out."""


class VerifyFailed(StepFailed):
    """Raised when a revision's post-upgrade verification does not hold."""


class DowngradeImpossible(StepFailed):
    """Raised when a revision cannot be undone by its downgrade."""


class AwaitingBackfill(Exception):
    """Raised when a run must wait for a backfill running elsewhere or paused; not a failure.

    Control flow, deliberately outside RunbookError: jobs/run/coordinator.py catches
    RunbookError around the steps to fail them, and a wait must pass through those handlers
    untouched to end the delivery (the run stays running until the backfill is done).
    """

    def __init__(self, backfill_id: str, state: str) -> None:
        super().__init__(f"waiting for backfill {backfill_id} ({state})")
        self.backfill_id = backfill_id
        self.state = state


# -- backups and restores --------------------------------------------------------------------


class BackupError(RunbookError):
    """Raised when a backup cannot be taken or does not pass its checks."""


class CopyError(BackupError):
    """Raised when a backup copy cannot be written, read back, fetched or removed."""


class RestoreMismatch(BackupError):
    """Raised when a backup restored into a scratch database differs from the pre-run state."""


class RestoreCheckFailed(BackupError):
    """Raised when the restored database does not equal the backup it was restored from."""


class UnknownBackup(RunbookError):
    """Raised when a backup id is not in the target's ledger (or was removed by retention)."""


class RestoreError(RunbookError):
    """Raised when a backup cannot be restored; the target is then left as it was."""


# -- backfills -------------------------------------------------------------------------------


class BackfillError(RunbookError):
    """Raised when a backfill cannot be created, changed or continued."""


class UnusableKey(BackfillError):
    """Raised when a key column cannot walk its table completely and in order."""


class BadSpec(BackfillError):
    """Raised when a backfill's table, SET, WHERE or batch settings are unusable."""


class UnknownBackfill(BackfillError):
    """Raised when a backfill id is not in the target's ledger."""


class BackfillInterrupted(BackfillError):
    """Raised when a slice cannot reach the database to record how it ended."""

    exit_code = 1


class IsolationFailed(BackfillError):
    """Raised when isolating a failing batch finds that every one of its rows fails."""


# -- insight: lint and rehearsal -------------------------------------------------------------


class LintError(RunbookError):
    """Raised when the squawk linter cannot give a report; the root of the two below."""


class LintUnavailable(LintError):
    """Raised when the squawk linter is not installed."""


class LintFailed(LintError):
    """Raised when squawk runs but gives no report."""


class RehearsalRefused(RunbookError):
    """Raised when a rehearsal refuses an upgrade before running it, as an apply would."""


# -- the exporter ----------------------------------------------------------------------------


class ExporterUnavailable(RunbookError):
    """Raised when `runbook exporter` cannot listen on the host and port it was given."""


# -- the demo --------------------------------------------------------------------------------


class DemoError(RunbookError):
    """Raised when the demo cannot go on; one line for the operator."""

    exit_code = 1


class DemoSetupError(DemoError):
    """Raised when the demo's input (environment, files) is unusable; nothing was changed."""

    exit_code = 2


class FleetError(RunbookError):
    """Raised when a group or rollout request cannot be carried out."""


class UnknownGroup(FleetError):
    """Raised when a command names a group runbook.toml does not define."""


class NoControlDatabase(FleetError):
    """Raised when a rollout is asked for and no control database is configured."""


class UnknownRollout(FleetError):
    """Raised when no rollout has the id given."""
