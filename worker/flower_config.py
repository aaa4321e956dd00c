"""Flower's settings for runbook, read by `runbook flower` (``--conf`` this file; Flower
executes it and takes every module-level name that is one of its options).

The Tasks page shows each task's arguments and result as columns, and ``format_task``
shapes what they say: the figures first (rows, percent, rate, ETA: what fits the page's
400 px cell, the arguments beside it saying which backfill), then the readable line a
runbook result starts with (worker/flower_lines.py), then its fields one per line; a slice
task that handed its slice on shows "handed on at …" and the line only, so the page reads
as one short row per hand-off under the live task of each slice (the newest row of its
chain: the page sorts by Received, newest first).
Flower's own options (auth, port, the database) are given by `runbook flower`.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from worker import flower_lines

# The Tasks page's columns, in order: the result right after the badge, where a narrow
# window still shows it; the uuid links to the task's page.
tasks_columns = "name,state,result,args,uuid,received,runtime,worker"
# With --persistent: the state is also written every minute, not only on a clean stop, so
# a killed Flower loses one minute of history at most.
state_save_interval = 60_000
# A worker gone for an hour leaves the Workers page.
purge_offline_workers = 3600

# The readable line of a result that saferepr cut short (literal_eval fails on it): it is
# the first key, so it is complete.
_LINE = re.compile(r"^\{'line': '((?:[^'\\]|\\.)*)'")


def result_fields(result: Any) -> dict[str, Any] | None:
    """A runbook result as Flower holds it (the repr of the returned dict, or of the dict a
    task-progress event carried) back as a dict; None when it is not one of ours."""
    if isinstance(result, dict):
        return result if "line" in result else None
    if not isinstance(result, str) or not result.startswith("{'line': "):
        return None
    try:
        value = ast.literal_eval(result)
    except (ValueError, SyntaxError):
        cut = _LINE.match(result)
        if cut is None:
            return None
        return {"line": ast.literal_eval(f"'{cut.group(1)}'"), "cut": "(shortened by Celery)"}
    return value if isinstance(value, dict) and "line" in value else None


def figures(fields: dict[str, Any]) -> str:
    """The line without its ``backfill ID on T: `` (``run ID on T: ``) lead: the Tasks page
    cuts a cell at 400 px, and the task's arguments already say which backfill or run."""
    head, _, rest = str(fields["line"]).partition(": ")
    rest = rest or head
    if fields.get("outcome") == flower_lines.HANDED_ON:
        return f"handed on at {rest.split('; ')[0]}"
    return rest


def shown(fields: dict[str, Any]) -> str:
    """The figures (what the Tasks page's cell shows), the line, then each field on a line of
    its own (slices one a line)."""
    out = [figures(fields), str(fields["line"]), ""]
    for key, value in fields.items():
        if key == "line" or value is None:
            continue
        if key == "slices" and isinstance(value, list):
            out.append("slices:")
            out += [f"  {piece}" for piece in value]
        else:
            out.append(f"{key}: {value}")
    return "\n".join(out)


def format_task(task: Any) -> Any:
    """Flower's hook (called on a copy of each task it shows): the result as a person reads
    it. Arguments are left as they are: a slice task's are its label (worker/flower.py)."""
    fields = result_fields(getattr(task, "result", None))
    if fields is None:
        return task
    if fields.get("outcome") == flower_lines.HANDED_ON:
        task.result = f"{figures(fields)}\n{fields['line']}"
    else:
        task.result = shown(fields)
    return task
