"""Every error runbook raises on purpose derives from RunbookError.

The message of each is one line meant for an operator: what is wrong and what to do.
"""


class RunbookError(Exception):
    """Raised when runbook refuses or fails an operation; the root of all runbook errors."""

    #: Exit code the CLI uses: 2 for bad input or configuration, 1 for a run that failed.
    exit_code = 2


class ConfigError(RunbookError):
    """Raised when runbook.toml, the environment or a target definition is invalid."""


class UnknownTarget(ConfigError):
    """Raised when a target name is not in the configuration."""


class TargetUnreachable(RunbookError):
    """Raised when the target database cannot be connected to or refuses the login."""


class ProjectError(RunbookError):
    """Raised when the Alembic project (alembic.ini, script directory, history) is unusable."""


class RevisionError(RunbookError):
    """Raised when a requested revision is unknown or not reachable from the current one."""


class TargetBusy(RunbookError):
    """Raised when another run holds the target."""

    def __init__(self, message: str, holder: str | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class BackupError(RunbookError):
    """Raised when a backup cannot be taken or does not pass its checks."""


class BrokerUnavailable(RunbookError):
    """Raised when the Celery broker (Redis) cannot be reached."""


class UnknownRun(RunbookError):
    """Raised when a run id is not found in any target's ledger."""


class IllegalTransition(RunbookError):
    """Raised when a run or step is asked to move to a state its current state forbids."""


class StepFailed(RunbookError):
    """Raised when a step of a run fails; the run then rolls back."""

    exit_code = 1


class VerifyFailed(StepFailed):
    """Raised when a revision's post-upgrade verification does not hold."""


class DowngradeImpossible(StepFailed):
    """Raised when a revision cannot be undone by its downgrade."""


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


class BadDeclaration(RunbookError):
    """Raised when a revision's declared ``backfills`` or ``requires_backfills`` are unusable."""


class IsolationFailed(BackfillError):
    """Raised when isolating a failing batch finds that every one of its rows fails."""
