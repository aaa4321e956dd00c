"""jobs/states.py is the single authority on states: every table is closed, terminal states
have no way out, and the groups are the sets the code (and the ledger's SQL) asks about."""

from __future__ import annotations

import json
import re
from enum import StrEnum
from pathlib import Path

import pytest

from jobs import states as st
from jobs.errors import IllegalTransition

JOBS = Path(st.__file__).parent

# (enum, table, checker, what the checker's message calls it)
MACHINES = [
    (st.RunState, st.RUN_TRANSITIONS, st.check_transition, "run"),
    (st.StepState, st.STEP_TRANSITIONS, st.check_step_transition, "step"),
    (st.BackfillState, st.BACKFILL_TRANSITIONS, st.check_backfill_transition, "backfill"),
    (st.SliceState, st.SLICE_TRANSITIONS, st.check_slice_transition, "backfill slice"),
    (st.RolloutState, st.ROLLOUT_TRANSITIONS, st.check_rollout_transition, "rollout"),
]
MACHINE_IDS = [m[3] for m in MACHINES]


def _reachable(table: dict[str, frozenset[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize(("enum", "table", "check", "what"), MACHINES, ids=MACHINE_IDS)
def test_every_table_is_closed(enum, table, check, what) -> None:
    assert set(table) == set(enum), "every state has a row"
    for state, targets in table.items():
        assert isinstance(state, enum)
        for target in targets:
            assert isinstance(target, enum), (state, target)


@pytest.mark.parametrize(("enum", "table", "check", "what"), MACHINES, ids=MACHINE_IDS)
def test_the_checker_follows_its_table(enum, table, check, what) -> None:
    for state in enum:
        for other in enum:
            if other in table[state]:
                check(state, other)
                check(str(state), str(other))  # as read back from the ledger: plain text
            else:
                with pytest.raises(IllegalTransition, match=f"a {what} cannot go from {state} "):
                    check(state, other)


@pytest.mark.parametrize(("enum", "table", "check", "what"), MACHINES, ids=MACHINE_IDS)
def test_terminal_states_have_no_way_out(enum, table, check, what) -> None:
    terminal = [s for s, targets in table.items() if not targets]
    assert terminal, "a machine without an end"
    for state in terminal:
        for other in enum:
            with pytest.raises(IllegalTransition):
                check(state, other)


def test_an_unknown_state_goes_nowhere() -> None:
    with pytest.raises(IllegalTransition, match="a run cannot go from bogus to running"):
        st.check_transition("bogus", st.RunState.RUNNING)


def test_every_run_and_backfill_state_is_reachable_from_enqueued() -> None:
    assert _reachable(st.RUN_TRANSITIONS, st.ENQUEUED) == set(st.RunState)
    assert _reachable(st.BACKFILL_TRANSITIONS, st.BackfillState.ENQUEUED) == set(st.BackfillState)
    assert _reachable(st.SLICE_TRANSITIONS, st.SliceState.ACTIVE) == set(st.SliceState)
    # skipped is kept for old ledgers; nothing moves a step there.
    assert _reachable(st.STEP_TRANSITIONS, st.StepState.RUNNING) == set(st.StepState) - {
        st.StepState.SKIPPED
    }


def test_a_run_only_rolls_back_after_running() -> None:
    st.check_transition(st.RUNNING, st.ROLLING_BACK)
    with pytest.raises(IllegalTransition, match="cannot go from enqueued to rolling_back"):
        st.check_transition(st.ENQUEUED, st.ROLLING_BACK)
    with pytest.raises(IllegalTransition):
        st.check_transition(st.ROLLING_BACK, st.SUCCEEDED)


def test_a_succeeded_step_is_not_redone_and_a_done_slice_not_reopened() -> None:
    st.check_step_transition(st.STEP_FAILED, st.STEP_RUNNING)
    with pytest.raises(IllegalTransition, match="a step cannot go from succeeded to running"):
        st.check_step_transition(st.STEP_SUCCEEDED, st.STEP_RUNNING)
    st.check_slice_transition(st.SliceState.STOPPED, st.SliceState.ACTIVE)
    with pytest.raises(IllegalTransition, match="a backfill slice cannot go from done to stopped"):
        st.check_slice_transition(st.SliceState.DONE, st.SliceState.STOPPED)


# -- groups ----------------------------------------------------------------------------------


def test_run_groups_split_the_states() -> None:
    groups = [st.RUN_ACTIVE, st.RUN_STOPPING, st.TERMINAL]
    assert set().union(*groups) == set(st.RunState)
    assert sum(len(g) for g in groups) == len(st.RunState), "the groups overlap"
    assert {s for s, targets in st.RUN_TRANSITIONS.items() if not targets} == st.TERMINAL
    assert st.TRANSITIONS is st.RUN_TRANSITIONS


def test_backfill_groups_split_the_states() -> None:
    assert set(st.BackfillState) == st.BACKFILL_ACTIVE | st.BACKFILL_SETTLED
    assert not st.BACKFILL_ACTIVE & st.BACKFILL_SETTLED
    assert st.BACKFILL_STOPPING <= st.BACKFILL_ACTIVE
    assert st.BACKFILL_TERMINAL <= st.BACKFILL_SETTLED
    assert {
        s for s, targets in st.BACKFILL_TRANSITIONS.items() if not targets
    } == st.BACKFILL_TERMINAL
    # A claim, resume, pause or cancel only ever asks for a move the table allows.
    for mapping in (
        st.BACKFILL_CLAIM,
        st.BACKFILL_RESUME,
        st.BACKFILL_PAUSE,
        st.BACKFILL_CANCEL,
        st.BACKFILL_ALL_DONE,
        st.BACKFILL_ALL_STOPPED,
    ):
        for old, new in mapping.items():
            assert new == old or new in st.BACKFILL_TRANSITIONS[old], (old, new)
    # What a claim finds is what a worker may still be at work on.
    assert set(st.BACKFILL_CLAIM) == st.BACKFILL_ACTIVE
    assert {st.StepState.SUCCEEDED, st.StepState.SKIPPED} == st.STEP_TERMINAL


def _sql_set(source: str, pattern: str) -> set[str]:
    found = re.search(pattern, source)
    assert found, pattern
    return set(re.findall(r"'(\w+)'", found.group(1)))


def test_the_groups_are_what_the_ledger_sql_spells_out() -> None:
    # The ledger's SQL cannot import the enums: it spells the same sets by hand.
    leases = (JOBS / "ledger" / "queries" / "leases.sql").read_text()
    assert _sql_set(leases, r"b\.state IN \(([^)]*)\)") == st.BACKFILL_ACTIVE
    schema = (JOBS / "ledger" / "migrations" / "0004_backfill_slices.sql").read_text()
    assert _sql_set(schema, r"CHECK \(state IN \(([^)]*)\)\)") == set(st.SliceState)


def test_the_control_sql_spells_the_member_groups() -> None:
    control = (JOBS / "fleet" / "queries.sql").read_text()
    assert _sql_set(control, r"state IN \(([^)]*)\) ORDER BY ordinal") == st.MEMBER_IN_FLIGHT
    assert _sql_set(control, r"state IN \(([^)]*)\)\) AS open") == {"pending", "running"}


def test_every_rollout_state_is_reachable_and_settles() -> None:
    table = st.ROLLOUT_TRANSITIONS
    assert _reachable(table, st.RolloutState.ENQUEUED) == set(st.RolloutState)
    for state in st.RolloutState:  # nothing is stuck: each state can come to rest
        assert _reachable(table, state) & st.ROLLOUT_SETTLED, state
    assert not st.ROLLOUT_STOPPING & {st.RolloutState.RUNNING, st.RolloutState.ROLLING_BACK}


def test_the_code_uses_the_groups_not_copies_of_them() -> None:
    from jobs.backfill import slices
    from jobs.cli import render
    from jobs.ledger import records

    assert not hasattr(slices, "STOPS") and not hasattr(slices, "ACTIVE")
    assert not hasattr(render, "BACKFILL_STOPS")
    assert slices.BACKFILL_SETTLED is st.BACKFILL_SETTLED
    assert records.BACKFILL_ACTIVE is st.BACKFILL_ACTIVE


# -- values: the ledger and JSON see the same strings as before ------------------------------


def test_values_are_the_ledgers_strings() -> None:
    assert [str(s) for s in st.RunState] == [
        "enqueued",
        "running",
        "rolling_back",
        "succeeded",
        "rolled_back",
        "restored",
        "failed",
        "cancelled",
    ]
    assert [str(s) for s in st.StepState] == ["running", "succeeded", "failed", "skipped"]
    assert {str(s) for s in st.BackfillState} == {
        "enqueued",
        "running",
        "pausing",
        "paused",
        "cancelling",
        "cancelled",
        "errored",
        "succeeded",
    }
    assert [str(s) for s in st.SliceState] == ["active", "stopped", "done"]
    assert {str(k) for k in st.RunKind} == {
        "apply",
        "rollback",
        "backup",
        "restore",
        "rehearse",
        "stamp",
    }
    assert {"upgrade", "downgrade", "restore"} == st.CHANGING_STEPS


@pytest.mark.parametrize(
    "enum", [st.RunState, st.StepState, st.BackfillState, st.SliceState, st.RunKind, st.StepKind]
)
def test_a_member_reads_and_prints_as_its_string(enum: type[StrEnum]) -> None:
    for member in enum:
        value = member.value
        assert member == value and hash(member) == hash(value)
        assert f"{member}" == f"{member}" == str(member) == value
        assert json.dumps({member: member}) == json.dumps({value: value})
        assert {value: 1}[member] == 1 and dict[str, int]({member: 1})[value] == 1


def test_the_flat_names_are_the_members() -> None:
    assert st.SUCCEEDED is st.RunState.SUCCEEDED
    assert st.SUCCEEDED == st.BackfillState.SUCCEEDED  # the two machines spell it alike
    assert st.ERRORED is st.BackfillState.ERRORED
    assert st.STEP_FAILED is st.StepState.FAILED


def test_the_backfill_transition_table_covers_every_request() -> None:
    states = set(st.BACKFILL_TRANSITIONS)
    for moves in (
        st.BACKFILL_CLAIM,
        st.BACKFILL_RESUME,
        st.BACKFILL_PAUSE,
        st.BACKFILL_CANCEL,
    ):
        for old, new in moves.items():
            assert old in states and new in states
            assert new == old or new in st.BACKFILL_TRANSITIONS[old], (old, new)
    assert {s for s, nxt in st.BACKFILL_TRANSITIONS.items() if not nxt} == st.BACKFILL_TERMINAL
    # The worker's own moves.
    for old, new in (("pausing", "paused"), ("cancelling", "cancelled"), ("running", "errored")):
        st.check_backfill_transition(old, new)
    with pytest.raises(IllegalTransition):
        st.check_backfill_transition("succeeded", "running")
