"""Comparing a backup's table counts and checksums with the database's, and the one line a
failed dump or read says; no database."""

from __future__ import annotations

import pytest

from jobs.backups.snapshot import (
    CHECKSUM_FORMAT,
    TableStats,
    _db_error,
    _first_line,
    _read_hint,
    comparable,
    compare_stats,
)
from jobs.config import normalize_url
from tests.unit.server_errors import wrapped


def stats(rows: int, checksum: str | None = f"{CHECKSUM_FORMAT}aa") -> TableStats:
    return {"rows": rows, "checksum": checksum}


def test_equal_stats_agree() -> None:
    same = {"public.a": stats(3), "public.b": stats(0, None)}
    assert compare_stats(same, dict(same)) is None
    assert compare_stats({}, {}) is None


@pytest.mark.parametrize(
    ("actual", "difference"),
    [
        ({"public.b": stats(3)}, "table public.a is missing"),
        (
            {"public.a": stats(3), "public.c": stats(1)},
            "table public.c was not there before the run",
        ),
        ({"public.a": stats(4)}, "table public.a has 4 rows, expected 3"),
        (
            {"public.a": stats(3, f"{CHECKSUM_FORMAT}bb")},
            "table public.a has 3 rows as expected but different content",
        ),
    ],
)
def test_the_first_difference_is_named(actual: dict[str, TableStats], difference: str) -> None:
    assert compare_stats({"public.a": stats(3)}, actual) == difference


def test_checksums_count_only_when_both_exist_in_one_format() -> None:
    assert comparable(f"{CHECKSUM_FORMAT}aa", f"{CHECKSUM_FORMAT}bb")
    assert not comparable(None, f"{CHECKSUM_FORMAT}bb")  # a table too large to hash
    assert not comparable("md5:aa", f"{CHECKSUM_FORMAT}aa")  # an older backup's format
    assert compare_stats({"t": stats(3, "md5:aa")}, {"t": stats(3)}) is None
    assert compare_stats({"t": stats(3, None)}, {"t": stats(3)}) is None


def test_a_tools_output_is_cut_to_its_first_line_redacted() -> None:
    normalize_url("postgresql://app:dump-pw@h/db")  # a known secret from now on
    assert _first_line(b"\npg_dump: error: auth failed dump-pw\nmore\n") == (
        "pg_dump: error: auth failed ***"
    )
    assert _first_line(b"\xff broken") == "\ufffd broken"
    assert _first_line("") == "no output"


def test_a_failed_read_says_what_to_do_by_its_sqlstate() -> None:
    denied = wrapped("42501", "permission denied for table secrets\nDETAIL: x")
    assert _db_error(denied) == "permission denied for table secrets"
    assert _read_hint(denied) == "grant the target's role SELECT on every table"
    assert _read_hint(wrapped("55P03", "lock timeout")) == (
        "another session holds a lock on that table; retry when it is released"
    )
    assert _read_hint(wrapped("57014", "canceling statement")) == "fix the cause and retry"
