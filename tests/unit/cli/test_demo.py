"""The demo's words for how a backup was checked (no services)."""

from __future__ import annotations

from jobs.cli.demo import verification_words


def test_the_demo_says_how_the_backup_was_checked_in_words() -> None:
    said = verification_words(
        {
            "list": "pg_restore --list read 42 entries",
            "restore": {"tables": 7, "rows": 3012, "checksummed": 6, "scratch_restore": "ok"},
        }
    )
    assert said == (
        "verified: pg_restore --list read 42 entries; a trial restore into a scratch database "
        "held the same 7 tables and 3,012 rows as the snapshot, content checksums of 6 tables "
        "equal"
    )
    skipped = verification_words(
        {"list": "pg_restore --list read 1 entries", "restore": "skipped (verify_restore = false)"}
    )
    assert "{" not in skipped and "trial restore skipped (verify_restore = false)" in skipped
