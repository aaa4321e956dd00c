"""The transition table is the single authority on run states."""

from __future__ import annotations

import pytest

from jobs import states as st
from jobs.errors import IllegalTransition


def test_terminal_states_have_no_way_out() -> None:
    for state in st.TERMINAL:
        assert st.TRANSITIONS[state] == frozenset()
        for other in st.TRANSITIONS:
            with pytest.raises(IllegalTransition):
                st.check_transition(state, other)


def test_every_state_is_reachable_from_enqueued() -> None:
    seen, todo = {st.ENQUEUED}, [st.ENQUEUED]
    while todo:
        for nxt in st.TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(st.TRANSITIONS)


def test_a_run_only_rolls_back_after_running() -> None:
    st.check_transition(st.RUNNING, st.ROLLING_BACK)
    with pytest.raises(IllegalTransition, match="cannot go from enqueued to rolling_back"):
        st.check_transition(st.ENQUEUED, st.ROLLING_BACK)
    with pytest.raises(IllegalTransition):
        st.check_transition(st.ROLLING_BACK, st.SUCCEEDED)


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
