"""A revision's declared backfills, checked when read: a bad one refused in one line."""

from __future__ import annotations

import pytest

from jobs.errors import BadDeclaration
from tests.unit.revisions import revision_with


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ("big", "backfills must be a list of dicts"),
        (["big"], "give a dict with table, set"),
        ([{"table": "big"}], "'set' is required"),
        ([{"table": "big", "set": "v = 1", "sett": "x"}], "unknown field 'sett'"),
        ([{"table": "big; drop", "set": "v = 1"}], "table 'big; drop' is not a plain name"),
        ([{"table": "big", "set": "v = pg_sleep(1)"}], "set calls pg_sleep()"),
        (
            [{"table": "big", "set": "v = 1", "where": "true; DELETE FROM big"}],
            "where contains ';'",
        ),
        ([{"table": "big", "set": "id = 1", "key": "id"}], "assigns the key id"),
        ([{"table": "big", "set": "v = 1", "batch_size": 0}], "batch_size must be a positive"),
        ([{"table": "big", "set": "v = 1", "slices": 1000}], "--slices must be between 1 and"),
        ([{"table": "big", "set": "v = 1", "on_error": "ignore"}], "--on-error must be one of"),
    ],
)
def test_a_bad_declaration_is_refused_in_one_line(declared: object, message: str) -> None:
    with pytest.raises(BadDeclaration) as refused:
        revision_with(backfills=declared).backfills  # noqa: B018 - reading it is the check
    assert message in str(refused.value)
    assert str(refused.value).startswith("revision r1")
    assert "\n" not in str(refused.value)
