"""A run drawn while it goes (`runbook status RUN --watch`, `apply --wait`): on a terminal a
table redrawn in place (rich Live) with each step's state and time, the current step's time
ticking and a bar for each backfill a step runs; elsewhere one line per change.

Both read the snapshots jobs/api/runs.py ``follow_run`` yields: ``{"run": …, "backfills": {id:
progress}, "clock_offset_s": …}``. rich is imported here only, and only by the watch.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from jobs.cli.render import backfill_line, duration, step_line, step_notes
from jobs.states import BACKFILL_SETTLED, ENQUEUED, SUCCEEDED, StepKind, StepState

# Off a terminal a backfill's progress is printed at most this often (its state changes at
# once): a CI log of a one-hour backfill gets about 700 lines, not one per batch.
BACKFILL_LINE_EVERY_S = 5.0
BAR_WIDTH = 30
# What a redraw is for: the current step's time ticks at a tenth of a second.
REFRESH_PER_SECOND = 4


def took(seconds: float) -> str:
    """A step's time: tenths of a second under a minute, then as ``duration``."""
    seconds = max(seconds, 0.0)
    return f"{seconds:.1f}s" if seconds < 59.95 else duration(seconds)


def _at(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def elapsed(started: str | None, finished: str | None, now: datetime | None = None) -> float | None:
    """Seconds from ``started`` to ``finished``, or to ``now`` while it has not finished."""
    began, ended = _at(started), _at(finished) or now
    return None if began is None or ended is None else (ended - began).total_seconds()


def backfill_ids(step: dict[str, Any]) -> list[str]:
    """The backfills a step started, in order (jobs/run/coordinator.py notes each)."""
    return list((step.get("detail") or {}).get("backfills") or [])


def backfill_bar(progress: dict[str, Any]) -> ProgressBar:
    """A backfill's bar: rows done of the rows to do (a pulse while none are known)."""
    total = progress["rows_total"] or None
    done = progress["rows_done"]
    if total is not None and progress["state"] == SUCCEEDED:
        total = max(total, done)  # a finished backfill's bar is full, whatever the estimate
    return ProgressBar(total=total, completed=done, width=BAR_WIDTH, pulse=total is None)


def _backfill_cell(progress: dict[str, Any]) -> Table:
    """A backfill's bar and its line (rows, percent, rate, ETA, throttling) side by side."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column()
    grid.add_row(backfill_bar(progress), Text(backfill_line(progress)))
    return grid


def _step_row(step: dict[str, Any], watch: dict[str, Any], now: datetime) -> list[Any]:
    """A step's cells: kind, revision, state, time, and what its detail adds (notes, the
    error of a failed step, the bars of a backfill step)."""
    state = step["state"]
    if step.get("attempts", 1) > 1:
        state += f" (attempt {step['attempts']})"
    seconds = elapsed(step.get("started_at"), step.get("finished_at"), now)
    named = f"{step['kind']}{' ' + step['revision'] if step.get('revision') else ''}: "
    detail: list[Any] = [Text(note.removeprefix(named)) for note in step_notes(step)]
    if step.get("error") and step["state"] == StepState.FAILED:
        detail.insert(0, Text(step["error"]))
    if step["kind"] == StepKind.BACKFILL:
        found = watch["backfills"]
        detail += [_backfill_cell(found[i]) for i in backfill_ids(step) if i in found]
    return [
        step["kind"],
        step.get("revision") or "",
        state,
        "" if seconds is None else took(seconds),
        Group(*detail) if detail else "",
    ]


def run_view(watch: dict[str, Any], now: datetime, max_rows: int | None = None) -> Group:
    """The run at ``now`` (the database's clock): a header line and a table of its steps;
    past ``max_rows`` steps the earliest are folded into one row (a terminal's Live cannot
    redraw what scrolled off the screen)."""
    run = watch["run"]
    spent = elapsed(run.get("started_at") or run.get("created_at"), run.get("finished_at"), now)
    head = (
        f"run {run['id']} [{run['target']}] {run['state']}: {run['from_revision'] or 'base'} -> "
        f"{run['to_revision'] or 'base'} (now at {run['current_revision'] or 'base'})"
    )
    if spent is not None:
        head += f", {took(spent)}"
    table = Table("step", "revision", "state", "time", "", expand=False)
    steps = run["steps"]
    if max_rows is not None and len(steps) > max_rows:
        shown = max(max_rows - 1, 1)  # and one row for the rest
        folded, steps = steps[:-shown], steps[-shown:]
        states = Counter(s["state"] for s in folded)
        said = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        table.add_row(f"… {len(folded)} earlier steps", "", said, "", "")
    for step in steps:
        table.add_row(*_step_row(step, watch, now))
    if not run["steps"] and run["state"] == ENQUEUED:
        table.add_row("", "", "", "", "waiting for a worker to start the run")
    return Group(Text(head), table)


# Lines of the view that are not step rows: the header line and the table's borders and head.
FRAME_LINES = 5


class LiveRun:
    """What rich's Live redraws: the latest snapshot, drawn at the moment of each redraw, so
    that the running step's time ticks between two reads of the ledger."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._clock = clock
        self.watch: dict[str, Any] | None = None

    def update(self, watch: dict[str, Any]) -> None:
        self.watch = watch

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.watch is None:
            return
        now = self._clock() + timedelta(seconds=self.watch.get("clock_offset_s") or 0.0)
        # A backfill step's row takes a line or two more (its bar and line wrap).
        fits = (options.height or console.height) - FRAME_LINES - 2
        yield run_view(self.watch, now, max_rows=max(fits, 3))


class RunLines:
    """The lines a change of the run adds, for a log (no terminal): a step that started,
    finished or was tried again (with its time), what its detail adds, the run's state; and
    a backfill's progress when its state changes, else at most every ``every_s``."""

    def __init__(
        self,
        every_s: float = BACKFILL_LINE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._every_s = every_s
        self._clock = clock
        self._steps: dict[tuple[str, str | None], tuple[str, int]] = {}
        self._notes: set[str] = set()
        self._state: str | None = None
        # backfill id -> (state, rows done, when printed)
        self._backfills: dict[str, tuple[str, int, float]] = {}

    def __call__(self, watch: dict[str, Any]) -> list[str]:
        run = watch["run"]
        lines: list[str] = []
        for step in run["steps"]:
            key = (step["kind"], step.get("revision"))
            mark = (step["state"], step.get("attempts", 1))
            if self._steps.get(key) != mark:
                self._steps[key] = mark
                line = step_line(step)
                seconds = elapsed(step.get("started_at"), step.get("finished_at"))
                if seconds is not None:  # it finished
                    line = f"{line} ({took(seconds)})"
                lines.append(f"  {line}")
            for note in step_notes(step):
                if note not in self._notes:
                    self._notes.add(note)
                    lines.append(f"    {note}")
            for backfill_id in backfill_ids(step):
                progress = watch["backfills"].get(backfill_id)
                if progress is not None and self._due(progress):
                    lines.append(f"    {backfill_line(progress)}")
        if self._state != run["state"]:
            self._state = run["state"]
            lines.append(f"run {run['id']} [{run['target']}]: {run['state']}")
        return lines

    def _due(self, progress: dict[str, Any]) -> bool:
        """Whether the backfill's progress is worth a line now (and remember it if so)."""
        now = self._clock()
        state, rows = progress["state"], progress["rows_done"]
        last = self._backfills.get(progress["backfill_id"])
        if last is not None:
            if (state, rows) == last[:2]:
                return False
            if state == last[0] and state not in BACKFILL_SETTLED and now - last[2] < self._every_s:
                return False
        self._backfills[progress["backfill_id"]] = (state, rows, now)
        return True
