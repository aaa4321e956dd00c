"""The ``runbook`` command: a thin layer over jobs.api.

Its commands are grouped the way jobs/api is: jobs/cli/runs.py, backups.py, backfills.py
and targets.py; this module holds the one group that registers them, the two commands that
are no api call (worker, demo) and the console script's entry point.

Exit codes: 0 the run succeeded (or there was nothing to do); 1 the run ended in any other
state; 2 bad input or configuration, with nothing enqueued and nothing changed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

import click

from jobs.cli import backfills, backups, exporter, fleet, runs, targets
from jobs.cli.flower import flower
from jobs.cli.options import Command, Group
from jobs.cli.render import err, friendly
from jobs.lazy import lazy_callable

# The heavy modules load on first use: `runbook --help` imports none of them and `runbook
# status` only what reading the ledger needs (tests/unit/test_cli_imports.py).
if TYPE_CHECKING:
    from jobs.config import load_settings
else:
    load_settings = lazy_callable("jobs.config", "load_settings")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runbook")
def cli() -> None:
    """Production schema changes for Alembic projects, as queued, resumable jobs."""


@click.command(
    cls=Command, context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@friendly
def worker(celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker for runbook's queue, and start it again should it die (extra
    arguments go to `celery worker`)."""
    from worker import supervise

    sys.exit(supervise.main(load_settings().queue, celery_args))


@click.command(cls=Command)
@friendly
def demo() -> None:
    """Run the reference history against a scratch database with a real worker."""
    from jobs.cli.demo import run_demo

    sys.exit(run_demo())


for command in (
    runs.apply,
    runs.rollback,
    runs.plan,
    runs.check,
    runs.doctor,
    runs.rehearse,
    runs.stamp,
    runs.status,
    runs.history,
    runs.resume,
    runs.cancel,
    backups.backup,
    backups.backups,
    backups.restore,
    backfills.backfill,
    backfills.backfills,
    backfills.pause,
    targets.targets,
    fleet.rollout,
    fleet.rollouts,
    exporter.exporter,
    worker,
    flower,
    demo,
):
    cli.add_command(command)


def main() -> None:
    try:
        cli(prog_name="runbook", standalone_mode=False)
    except click.UsageError as exc:  # a wrong option or value: one line, like every bad input
        where = f"runbook {exc.ctx.info_name}" if exc.ctx and exc.ctx.parent else "runbook"
        err.print(f"runbook: error: {exc.format_message().rstrip('.')}; see `{where} --help`")
        sys.exit(2)
    except click.Abort:
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def run() -> None:
    """The console script: main(), then exit without tearing the interpreter down.

    A project's env.py and revision files import its application (MLflow's: some 1,500
    modules), and freeing all of that took 0.7 s after every apply (bench/README.md). The
    atexit handlers still run and the streams are flushed; with other threads alive, Python
    exits as usual.
    """
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if threading.active_count() > 1:
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
