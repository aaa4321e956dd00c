"""The readable line a task's result and progress start with in Flower, and the fields that
follow it, named so that none contradicts the task's badge.

Flower's badge is the Celery state (PROGRESS, SUCCESS): a slice task that handed its slice on
is a SUCCESS while its backfill still runs, and a run's task returns while the run waits for
its backfill. So the backfill's and the run's own states are ``backfill_state`` and
``run_state`` here, never ``state``, and ``outcome`` says what the task itself did.

The figures are the ledger's (jobs/ledger/records.py ``backfill_progress``, the run's steps):
nothing is recomputed here. No Celery import: worker/flower.py and worker/flower_config.py
(Flower's process) use it, tests/unit/worker/test_flower_board.py checks it.
"""

from __future__ import annotations

from typing import Any

# What a slice task did, as its result says it (jobs/backfill/walk.py, control.py outcomes).
SLICE_OUTCOMES = {
    "continue": "handed on to the next slice task",
    "fenced": "stopped: a newer task owns this slice",
    "stopped": "slice stopped; another slice settles the backfill",
}
HANDED_ON = SLICE_OUTCOMES["continue"]


def count(n: int) -> str:
    return f"{n:,}"


def rate(rows_s: float) -> str:
    """383k, 1.2M: rows per second as a person reads them."""
    if rows_s >= 1_000_000:
        return f"{rows_s / 1_000_000:.1f}M"
    if rows_s >= 10_000:
        return f"{rows_s / 1000:.0f}k"
    if rows_s >= 1000:
        return f"{rows_s / 1000:.1f}k"
    return f"{rows_s:.0f}"


def seconds(s: float) -> str:
    """2 s, 4 min 10 s, 1 h 05 min."""
    s = round(s)
    if s < 60:
        return f"{s} s"
    minutes, secs = divmod(s, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def backfill_line(info: dict[str, Any]) -> str:
    """``backfill 3f2a… on orders: 2,333,889 / 3,000,000 rows (77.8%), 383k rows/s, ETA 2 s``,
    then what holds or stopped it."""
    total = info.get("rows_total")
    rows = count(info["rows_done"])
    if total:
        approx = "~" if info.get("estimate") == "planner" else ""
        rows += f" / {approx}{count(total)}"
    rows += " rows"
    if info.get("percent") is not None:
        rows += f" ({info['percent']}%)"
    state = info.get("state") or info.get("backfill_state")
    said = "" if state in {"running", None} else f"{state}, "
    parts = [f"backfill {info['backfill_id']} on {info['target']}: {said}{rows}"]
    if info.get("rate_rows_s"):
        parts.append(f"{rate(info['rate_rows_s'])} rows/s")
    if info.get("eta_s") is not None:
        parts.append(f"ETA {seconds(info['eta_s'])}")
    if info.get("throttling"):
        parts.append(f"waiting: {info['throttling']}")
    if info.get("pause_reason"):
        parts.append(f"paused: {info['pause_reason']}")
    if info.get("error"):
        parts.append(f"error: {info['error']}")
    return ", ".join(parts)


def _renamed(info: dict[str, Any], state_key: str) -> dict[str, Any]:
    """``info`` with its ``state`` under ``state_key``."""
    fields = {k: v for k, v in info.items() if k != "state"}
    if "state" in info:
        fields[state_key] = info["state"]
    return fields


def slice_progress(info: dict[str, Any]) -> dict[str, Any]:
    """A running slice task's progress: the backfill's line, then its fields."""
    return {"line": backfill_line(info), **_renamed(info, "backfill_state")}


def slice_result(result: dict[str, Any]) -> dict[str, Any]:
    """A slice task's return value: the line, what the task did, then the progress."""
    outcome = str(result.get("outcome", ""))
    said = SLICE_OUTCOMES.get(outcome, f"settled the backfill: {outcome}" if outcome else "")
    line = backfill_line(result)
    if "slice" in result and said:
        line += f"; slice {result['slice']} {said}"
    fields = _renamed({k: v for k, v in result.items() if k != "outcome"}, "backfill_state")
    return {"line": line, "outcome": said or outcome, **fields}


def step_text(info: dict[str, Any]) -> str:
    """``upgrade 3 of 7 (a1b2c3)``, ``backup``, with the step's state unless it runs."""
    text = str(info.get("step") or "")
    if info.get("revision_no") and info.get("revisions"):
        text += f" {info['revision_no']} of {info['revisions']}"
    if info.get("revision"):
        text += f" ({info['revision']})"
    if info.get("step_state") not in {"running", None}:
        text += f" {info['step_state']}"
    return text


def run_progress(info: dict[str, Any]) -> dict[str, Any]:
    """``run 9c1d… on prod: upgrade 3 of 7 (a1b2c3), 12 s`` (the run's time so far), then
    the step's fields."""
    line = f"run {info['run_id']} on {info['target']}: {step_text(info)}"
    if info.get("elapsed_s") is not None:
        line += f", {seconds(info['elapsed_s'])}"
    return {"line": line, **_renamed(info, "run_state")}


def run_result(result: dict[str, Any]) -> dict[str, Any]:
    """A run task's return value: the run's state and why this delivery ended."""
    state = result.get("state")
    line = f"run {result['run_id']} on {result['target']}: {state}"
    if result.get("error"):
        line += f": {result['error']}"
    if result.get("note"):
        line += f" ({result['note']})"
    outcome = result.get("note") or f"the run is {state}"
    return {"line": line, "outcome": outcome, **_renamed(result, "run_state")}


def refusal(kind: str, work_id: str, target: str, error: str) -> dict[str, Any]:
    """What a task that was refused (an unknown target, a broken one) returns."""
    return {
        "line": f"{kind} {work_id} on {target}: refused: {error}",
        "outcome": "refused",
        f"{kind}_id": work_id,
        "target": target,
        "error": error,
    }


def rollout_line(found: dict[str, Any]) -> str:
    """One line of a rollout: its state and how many members are in each state."""
    counts = found.get("counts") or {}
    total = sum(counts.values())
    done = sum(counts.get(s, 0) for s in ("succeeded", "skipped", "rolled_back"))
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()) if n)
    return (
        f"rollout {found.get('id')} of {found.get('group')}: {found.get('state')}, "
        f"{done}/{total} done ({parts or 'no members listed yet'})"
    )


def rollout_result(found: dict[str, Any]) -> dict[str, Any]:
    """An advancing pass's return value: the rollout's line, state and counts."""
    if "note" in found:
        return {"line": f"rollout {found['rollout']}: {found['note']}", **found}
    return {"line": rollout_line(found), **found}
