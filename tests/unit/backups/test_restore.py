"""Reading what pg_restore and psql print, and the one line a failed restore says; no archive,
no database."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.backups.restore import (
    HEADER,
    TOC_LINE,
    RestoreError,
    _database_prologue,
    _describe_failure,
    _first_error,
    check_lock_timeout,
    sql_literal,
)
from jobs.config import Target, normalize_url

# What pg_restore --list prints (its header lines start with ";").
TOC = """\
;
; Archive created at 2026-12-01 10:00:00 UTC
;     dbname: app
;
3; 3079 16385 EXTENSION - citext
4321; 0 0 COMMENT - EXTENSION citext
215; 1259 16390 TABLE public items app
3350; 0 16390 TABLE DATA public items app
216; 1259 16396 SEQUENCE shop orders_id_seq -
"""


def target() -> Target:
    return Target(
        name="prod",
        url=normalize_url("postgresql://app:restore-pw@db/app"),
        alembic_ini=Path("/nowhere/alembic.ini"),
        backup_dir=Path("/nowhere"),
    )


def test_toc_lines_and_entry_headers_are_read_as_pg_restore_prints_them() -> None:
    entries = [m.group(2) for line in TOC.splitlines() if (m := TOC_LINE.match(line))]
    assert entries == [
        "EXTENSION - citext",
        "COMMENT - EXTENSION citext",
        "TABLE public items app",
        "TABLE DATA public items app",
        "SEQUENCE shop orders_id_seq -",
    ]
    header = HEADER.search("--\n-- Name: items id; Type: DEFAULT; Schema: public; Owner: app\n--\n")
    assert header is not None and header.groups() == ("items id", "DEFAULT", "public", "app")


def test_the_prologue_keeps_the_backups_extensions_and_public_when_it_holds_it() -> None:
    prologue = _database_prologue(TOC.splitlines())
    assert "e.extname <> ALL(ARRAY['citext']::text[])" in prologue
    assert "IF had_public OR true THEN" in prologue
    without = _database_prologue(["216; 1259 16396 SEQUENCE shop orders_id_seq -"])
    assert "ALL(ARRAY[]::text[])" in without and "IF had_public OR false THEN" in without


def test_sql_literals_double_their_quotes() -> None:
    assert sql_literal("public.items") == "'public.items'"
    assert sql_literal("o'brien") == "'o''brien'"


def test_a_lock_timeout_must_be_positive() -> None:
    check_lock_timeout(1)
    with pytest.raises(RestoreError, match="lock_timeout_ms must be greater than zero, got 0"):
        check_lock_timeout(0)


def test_the_first_error_psql_or_pg_restore_printed() -> None:
    stderr = (
        "SET\npsql:<stdin>:12: ERROR:  55P03: canceling statement due to lock timeout\n"
        "psql:<stdin>:13: ERROR:  25P02: current transaction is aborted\n"
    )
    assert _first_error(stderr) == ("55P03", "canceling statement due to lock timeout")
    assert _first_error("psql: FATAL:  the database system is shutting down\n") == (
        None,
        "the database system is shutting down",
    )
    assert _first_error("pg_restore: error: could not read input file: end of file\n") == (
        None,
        "could not read input file: end of file",
    )
    assert _first_error("something odd\nsecond\n") == (None, "something odd")
    assert _first_error("") == (None, "no output")


@pytest.mark.parametrize(
    ("stderr", "says"),
    [
        ("ERROR:  55P03: canceling statement due to lock timeout", "waited over 300 ms for a lock"),
        ("ERROR:  40P01: deadlock detected", "deadlocked with another session; nothing was"),
        (
            "psql: error: connection to server was lost",
            "lost the connection to target 'prod' during the restore; check whether it committed",
        ),
        (
            "ERROR:  P0001: the restore would change the ledger schema",
            "would change the ledger schema runbook",
        ),
        (
            "ERROR:  42501: must be owner of table items (restore-pw)",
            "failed, nothing was changed: must be owner of table items (***)",
        ),
    ],
)
def test_a_failed_restore_is_one_line_that_says_what_to_do(stderr: str, says: str) -> None:
    line = _describe_failure(target(), stderr, 300)
    assert line.startswith(("restore of target 'prod'", "lost the connection to target 'prod'"))
    assert says in line and "\n" not in line and "restore-pw" not in line
