"""How a rollout reads at a glance: the bar, the counts, and Flower's line (jobs/cli/fleet.py,
worker/flower_lines.py)."""

from __future__ import annotations

from jobs.cli.fleet import bar, counts_line, summary_line
from worker.flower_lines import rollout_line, rollout_result


def found(state: str, **counts: int) -> dict[str, object]:
    return {"id": "r1", "group": "tenants", "state": state, "to_revision": "f3", "counts": counts}


def test_the_bar_shows_done_failed_in_flight_and_waiting_in_proportion() -> None:
    shown = bar(found("running", succeeded=6, failed=1, running=3, pending=2), width=12)
    assert shown == "[######x>>>..]"
    assert bar(found("succeeded", succeeded=10, skipped=2), width=12) == "[############]"
    assert bar(found("enqueued"), width=4) == "[....]"


def test_rolling_back_counts_the_advanced_members_as_work_left() -> None:
    going = found("rolling_back", succeeded=4, rolling_back=2, rolled_back=6)
    assert bar(going, width=12) == "[######>>....]"


def test_the_counts_name_only_the_states_that_hold_members_in_reading_order() -> None:
    assert counts_line(found("running", pending=2, succeeded=9, failed=1)) == (
        "12 members: 9 succeeded, 2 pending, 1 failed"
    )
    assert counts_line(found("enqueued")) == "0 members: not listed yet"
    line = summary_line(found("halted", succeeded=1, failed=1))
    assert line.startswith("rollout r1 of group tenants to f3: halted [")


def test_flowers_line_says_how_much_is_done() -> None:
    assert rollout_line(found("running", succeeded=7, skipped=1, running=2, pending=2)) == (
        "rollout r1 of tenants: running, 8/12 done (2 pending, 2 running, 1 skipped, 7 succeeded)"
    )
    assert rollout_result({"rollout": "r1", "note": "a newer pass has taken over"})["line"] == (
        "rollout r1: a newer pass has taken over"
    )
