"""The CLI's output: one-line errors, step and backfill lines, summaries, and the console."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from jobs.errors import RunbookError
from jobs.lazy import lazy_callable
from jobs.states import SliceState, StepState

# The heavy modules load on first use: `runbook --help` imports none of them and `runbook
# status` only what reading the ledger needs (tests/unit/test_cli_imports.py).
if TYPE_CHECKING:
    from rich.console import Console

    from jobs.config import redact
else:
    Console = lazy_callable("rich.console", "Console")
    redact = lazy_callable("jobs.config", "redact")


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def backfill_line(now: dict[str, Any]) -> str:
    """One line of a backfill's progress: rows, percent, rate, ETA, why it paused itself,
    the throttle holding it now, throttling so far, a standby gone, skips."""
    about = "" if now["estimate"] == "counted" else "~"
    label = now.get("estimate_label") or now["estimate"]
    parts = [
        f"backfill {now['backfill_id']} {now['state']}: {now['rows_done']} of "
        f"{about}{now['rows_total']} rows ({label})"
    ]
    if now["percent"] is not None:
        parts.append(f"{now['percent']}%")
    if now["rate_rows_s"]:
        parts.append(f"{now['rate_rows_s']} rows/s")
    if now["eta_s"] is not None:
        parts.append(f"ETA {duration(now['eta_s'])}")
    if now.get("pause_reason"):
        parts.append(f"paused: {now['pause_reason']}")
    if now.get("throttling"):
        parts.append(f"waiting: {now['throttling']} ({duration(now['throttling_s'] or 0)})")
    if now["throttled_s"] >= 0.5:  # shown in whole seconds; --json has the tenths
        last = f" (last: {now['throttle']})" if now["throttle"] else ""
        parts.append(f"throttled {duration(now['throttled_s'])}{last}")
    if now.get("replica_note"):
        parts.append(now["replica_note"])
    if now["skipped"]:
        parts.append(f"{now['skipped']} rows skipped")
    if len(now["slices"]) > 1:
        done = sum(1 for s in now["slices"] if s["state"] == SliceState.DONE)
        parts.append(f"slices {done}/{len(now['slices'])} done")
    return ", ".join(parts)


def statement(now: dict[str, Any]) -> str:
    """The backfill's UPDATE, every assignment of it, as the ledger holds it."""
    where = f" WHERE {now['where']}" if now.get("where") else ""
    return f"UPDATE {now['table']} SET {now['set']}{where}"


def _console(stderr: bool) -> Console:
    # Markup off: run output holds brackets. Piped output is not wrapped at 80 columns.
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, markup=False, width=width, soft_wrap=True)


class LazyConsole:
    """A console made on first use (rich loads only when something is printed)."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def resolve(self) -> Console:
        """The console itself: rich's Live (a progress bar) needs the object, not a proxy."""
        if self._console is None:
            self._console = _console(self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.resolve(), name)


err = cast("Console", LazyConsole(stderr=True))
out = cast("Console", LazyConsole(stderr=False))
F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn every error into one line on stderr and an exit code; never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RunbookError as exc:
            click.echo(f"runbook: error: {redact(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except click.UsageError as exc:  # a command's own usage check: main() says it, exit 2
            exc.ctx = exc.ctx or click.get_current_context(silent=True)
            raise
        except KeyboardInterrupt:
            click.echo("runbook: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("RUNBOOK_DEBUG"):
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            click.echo(
                f"runbook: internal error: {type(exc).__name__}: {redact(first)} "
                "(set RUNBOOK_DEBUG=1 for a traceback)",
                err=True,
            )
            sys.exit(1)

    return cast(F, wrapper)


def step_line(step: dict[str, Any]) -> str:
    rev = f" {step['revision']}" if step.get("revision") else ""
    tries = f" (attempt {step['attempts']})" if step.get("attempts", 1) > 1 else ""
    head = f"{step['kind']}{rev} {step['state']}{tries}"
    if not (step.get("error") and step["state"] == StepState.FAILED):
        return head
    # Step errors often name the step already ("upgrade r1 failed: ..."): say it once.
    return step["error"] if step["error"].startswith(head) else f"{head}: {step['error']}"


def step_notes(step: dict[str, Any]) -> list[str]:
    """What a step's detail says beyond its state: the standbys and slots preflight saw, and
    the wait for the standbys after a rewrite (jobs/run/replicas.py)."""
    detail = step.get("detail") or {}
    rev = f" {step['revision']}" if step.get("revision") else ""
    seen = detail.get("replication") or {}
    notes = list(seen.get("lines", [])) if seen.get("standbys") or seen.get("slots") else []
    waited = detail.get("replica_wait") or {}
    if waited.get("outcome") == "waiting":
        notes.append(f"waiting for the standbys to replay: {waited.get('reason')}")
    elif waited.get("outcome") in ("caught_up", "gave_up", "unreadable"):  # it waited, or tried
        notes.append(str(waited.get("line")))
    return [f"{step['kind']}{rev}: {note}" for note in notes]


def summary(run: dict[str, Any]) -> None:
    err.print(
        f"run {run['id']} {run['state']}: {run['from_revision'] or 'base'} -> "
        f"{run['to_revision'] or 'base'} (now at {run['current_revision'] or 'base'})"
    )
    if run.get("backup"):
        b = run["backup"]
        err.print(f"  backup {b['path']} ({b['size']} bytes, sha256 {b['sha256'][:12]}…)")
    if run.get("error"):
        err.print(f"  error: {run['error']}")
