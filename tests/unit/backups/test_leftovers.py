"""Names of what a run leaves behind: scratch databases and partial dumps (no services)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from jobs.backups import leftovers
from jobs.backups.leftovers import Owner
from jobs.config import Target, load_settings


def target(tmp_path: Path, name: str = "prod-eu", database: str = "a" * 63) -> Target:
    path = tmp_path / "runbook.toml"
    path.write_text(
        f'[targets.{name}]\nurl = "postgresql://u:pw@h/{database}"\nalembic_ini = "a.ini"\n'
        f'backup_dir = "{tmp_path}"\n'
    )
    return load_settings(path).target(name)


def test_a_scratch_name_carries_database_run_and_delivery_and_fits_postgres(
    tmp_path: Path,
) -> None:
    t = target(tmp_path)
    name = leftovers.scratch_name(t, Owner("0123456789abcdef", 123456), "r")
    assert len(name.encode()) <= 63  # NAMEDATALEN - 1: longer names are cut by the server
    match = leftovers.SCRATCH.match(name)
    assert match is not None
    assert match["db"] == leftovers.database_tag("a" * 63)
    assert (match["run"], match["delivery"], match["purpose"]) == (
        "0123456789abcdef",
        "123456",
        "r",
    )
    # Another database on the same server gets another tag; a call outside a run, a name no
    # sweep can attribute.
    assert leftovers.database_tag("b") != leftovers.database_tag("a" * 63)
    anonymous = leftovers.scratch_name(t, None, "v")
    assert anonymous.startswith(leftovers.SCRATCH_PREFIX) and not leftovers.SCRATCH.match(anonymous)


def test_a_partial_dump_name_tells_target_run_and_delivery(tmp_path: Path) -> None:
    final = tmp_path / "prod-eu-20261201T100000Z-0123456789abcdef.dump"
    partial = leftovers.partial_path(final, 3)
    assert partial.name == f"{final.name}.d3.partial"
    match = leftovers.PARTIAL.match(partial.name)
    assert match is not None
    assert (match["target"], match["run"], match["delivery"]) == (
        "prod-eu",
        "0123456789abcdef",
        "3",
    )
    assert leftovers.PARTIAL.match(final.name) is None  # a finished dump is never a leftover


def test_partial_dumps_are_found_in_the_backup_dir_by_their_names(tmp_path: Path) -> None:
    t = target(tmp_path)
    run = "0123456789abcdef"
    for name in (
        f"prod-eu-20261201T100000Z-{run}.dump.d2.partial",
        f"other-20261201T100000Z-{run}.dump.partial",  # no delivery: not a name runbook writes
        f"prod-eu-20261201T100000Z-{run}.dump",  # finished
        "notes.partial",
    ):
        (tmp_path / name).write_text("")
    [(found, its_target)] = leftovers._partials(t)
    assert (found.kind, found.run_id, found.delivery, its_target) == ("partial", run, 2, "prod-eu")
    assert (
        found.describe()
        == f"partial dump file {tmp_path}/prod-eu-20261201T100000Z-{run}.dump.d2.partial"
    )
    assert leftovers.partial_path(tmp_path / "x.dump", None).name == "x.dump.d0.partial"


def test_a_missing_backup_dir_holds_no_partial_dump(tmp_path: Path) -> None:
    assert leftovers._partials(replace(target(tmp_path), backup_dir=tmp_path / "gone")) == []
