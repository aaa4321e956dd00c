"""`runbook --help` starts without the heavy libraries (jobs/lazy.py): each costs start-up
time on every command, and none is needed to print the help."""

from __future__ import annotations

import subprocess
import sys

# What jobs/cli/ and jobs/api/ load only on first use (pydantic: through jobs/config.py).
HEAVY = (
    "alembic",
    "sqlalchemy",
    "psycopg2",
    "pglast",
    "boto3",
    "celery",
    "kombu",
    "rich",
    "pydantic",
    "pydantic_core",
    "prometheus_client",
)


def imported_by(*argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the console script's own entry point (jobs.cli.commands:run) with ``argv``; the top-level
    packages it imported (from `python -X importtime`)."""
    code = f"import sys; sys.argv = ['runbook', *{list(argv)!r}]; from jobs.cli.commands import run; run()"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=60
    )
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return proc, names


def test_help_imports_no_heavy_module() -> None:
    proc, names = imported_by("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Usage: runbook" in proc.stdout
    assert "click" in names and "jobs" in names  # the parse saw the imports at all
    assert sorted(names & set(HEAVY)) == []


def test_command_help_imports_no_heavy_module() -> None:
    for command in ("apply", "status", "backfill", "exporter"):
        proc, names = imported_by(command, "--help")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"Usage: runbook {command}" in proc.stdout
        assert sorted(names & set(HEAVY)) == [], command


def test_the_console_script_keeps_exit_codes() -> None:
    """jobs.cli.commands:run exits without module teardown; the code and the one line stay."""
    proc, _ = imported_by("no-such-command")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith("runbook: error: No such command"), errors
