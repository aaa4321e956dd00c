"""Rollouts that go wrong, driven through the installed `runbook` command and a `runbook
worker`: a member whose data breaks a revision halts the rollout (the failed member back where
it started, the advanced ones at the revision, the others untouched), `rollback ROLLOUT` brings
back exactly the advanced members, `resume` finishes a halted rollout once the cause is fixed,
a failed canary stops everything, pause and cancel, and bad input refused with nothing
recorded (jobs/fleet/, jobs/api/rollouts.py, jobs/cli/fleet.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    GATED,
    Config,
    Databases,
    Worker,
    db_url,
    open_gate,
    query,
    runbook_cli,
    schema_dump,
    until,
)
from tests.integration.fleet_support import FLEET_HISTORY, Fleet, make_fleet
from tests.projects import Rev

pytestmark = pytest.mark.usefixtures("control_db")

# Alembic's own version table, empty: a member at base that has been migrated before, so that
# a member brought back to base is comparable with its start line for line (a downgrade to
# base leaves the version table behind, empty).
_VERSION_TABLE = (
    "CREATE TABLE alembic_version (version_num varchar(32) NOT NULL, "
    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
)


def _dump(dbname: str, *options: str) -> str:
    """pg_dump of a member without its ledger (schema runbook), without the lines that differ
    on every call."""
    cmd = ["pg_dump", *options, "--exclude-schema=runbook", "-d", db_url(dbname)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    skip = ("--", "\\restrict", "\\unrestrict")
    return "\n".join(line for line in text.splitlines() if not line.startswith(skip))


def data_dump(dbname: str) -> str:
    """pg_dump --data-only, each table's rows sorted: an UPDATE and its downgrade move rows
    on disk, and COPY writes them in the order it finds them."""
    lines, rows, copying = [], [], False
    for line in _dump(dbname, "--data-only").splitlines():
        if copying and line == "\\.":
            lines += sorted(rows)
            rows, copying = [], False
        if copying:
            rows.append(line)
            continue
        lines.append(line)
        copying = line.startswith("COPY ")
    return "\n".join(lines)


def has_ledger(dbname: str) -> bool:
    return bool(query(dbname, "SELECT 1 FROM pg_namespace WHERE nspname = 'runbook'"))


def status(rollout_id: str) -> dict[str, Any]:
    shown = runbook_cli("status", rollout_id, "--json")
    assert shown.returncode in (0, 1), shown.stderr  # 1: settled, but not succeeded
    return dict(json.loads(shown.stdout))


def members(found: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["target"]: m for m in found["members"]}


def settled(rollout_id: str, timeout_s: float = 120) -> dict[str, Any]:
    """The rollout's status once nothing more happens by itself."""

    def found() -> dict[str, Any] | None:
        now = status(rollout_id)
        return now if now["settled_at"] else None

    return dict(until(f"rollout {rollout_id} to settle", found, timeout_s))


def rollout(group: str, *args: str) -> subprocess.CompletedProcess[str]:
    return runbook_cli("rollout", "--group", group, *args, timeout=300)


def started(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout.strip()


def fleet_of(
    config: Config, databases: Databases, tmp_path: Path, count: int, **options: Any
) -> Fleet:
    """make_fleet's members, each with an empty version table (at base)."""
    fleet = make_fleet(config, databases, tmp_path, count, **options)
    for dbname in fleet.members.values():
        query(dbname, _VERSION_TABLE)
    return fleet


def duplicate_sku(dbname: str) -> None:
    """A second row with sku-1: the unique index of f3 cannot be built."""
    query(dbname, "INSERT INTO items VALUES (100001, 'sku-1')")


def fix_duplicate(dbname: str) -> None:
    query(dbname, "DELETE FROM items WHERE id = 100001")


def test_a_failed_member_halts_the_rollout_and_rollback_brings_back_the_advanced_ones(
    config: Config, databases: Databases, worker: Worker, tmp_path: Path
) -> None:
    # Rolling back drops f1's column `note`, which holds data: a backup is needed for that.
    fleet = fleet_of(config, databases, tmp_path, 12, rows=50, backup=True, verify_restore=False)
    bad = f"{fleet.group}_06"
    duplicate_sku(fleet.db(bad))
    ahead = f"{fleet.group}_03"  # starts at f1: the rollback brings it back to f1, not base
    early = runbook_cli("apply", "--target", ahead, "--to", "f1", "--wait")
    assert early.returncode == 0, early.stderr
    starts = {n: "f1" if n == ahead else None for n in fleet.members}
    schemas = {n: schema_dump(db) for n, db in fleet.members.items()}
    datas = {n: data_dump(db) for n, db in fleet.members.items()}
    wholes = {n: _dump(db) for n, db in fleet.members.items()}

    out = rollout(fleet.group, "--parallel", "3", "--max-failures", "0", "--wait", "--json")
    assert out.returncode == 1, out.stderr + out.stdout
    halted = json.loads(out.stdout)
    assert halted["state"] == "halted", halted
    assert bad in halted["error"]
    by_name = members(halted)
    assert by_name[bad]["state"] == "failed" and "items_sku" in by_name[bad]["error"]
    assert fleet.revision(bad) is None
    assert schema_dump(fleet.db(bad)) == schemas[bad]
    assert data_dump(fleet.db(bad)) == datas[bad]
    advanced = [n for n, m in by_name.items() if m["state"] == "succeeded"]
    untouched = [n for n, m in by_name.items() if m["state"] == "pending"]
    assert set(advanced) | set(untouched) | {bad} == set(fleet.members), by_name
    assert f"{fleet.group}_01" in advanced and untouched, by_name
    assert ahead in advanced
    for name in advanced:
        assert fleet.revision(name) == "f3", name
        assert by_name[name]["from_revision"] == starts[name], name
    for name in untouched:
        assert by_name[name]["run_id"] is None
        assert not has_ledger(fleet.db(name)), name
        assert _dump(fleet.db(name)) == wholes[name], name

    refused = runbook_cli("rollback", halted["id"], "--wait")
    assert refused.returncode == 2 and "--accept-data-loss" in refused.stderr, refused.stderr
    assert status(halted["id"])["state"] == "halted"
    back = runbook_cli("rollback", halted["id"], "--accept-data-loss", "--wait", "--json")
    assert back.returncode == 0, back.stderr + back.stdout
    rolled = json.loads(back.stdout)
    assert rolled["state"] == "rolled_back", rolled
    assert rolled["counts"] == {
        "rolled_back": len(advanced),
        "failed": 1,
        "pending": len(untouched),
    }
    for name in advanced:
        assert fleet.revision(name) == starts[name], name
        assert schema_dump(fleet.db(name)) == schemas[name], name
        assert data_dump(fleet.db(name)) == datas[name], name
    for name in untouched:
        assert not has_ledger(fleet.db(name)), name
        assert _dump(fleet.db(name)) == wholes[name], name

    fix_duplicate(fleet.db(bad))
    again = rollout(fleet.group, "--parallel", "3", "--wait", "--json")
    assert again.returncode == 0, again.stderr + again.stdout
    finished = json.loads(again.stdout)
    assert finished["state"] == "succeeded" and finished["counts"] == {"succeeded": 12}
    assert all(fleet.revision(name) == "f3" for name in fleet.members)


def test_rollback_refuses_data_loss_on_any_member_before_sending_anything(
    config: Config, databases: Databases, worker: Worker, tmp_path: Path
) -> None:
    # A rollout to f1 adds an empty column `note` everywhere; then the application writes to
    # it on one member, not the first. Rolling back would drop those rows: refused before any
    # member moves (a refusal met by that member's own run would leave the fleet split).
    fleet = fleet_of(config, databases, tmp_path, 4, rows=20)
    done = json.loads(rollout(fleet.group, "--to", "f1", "--wait", "--json").stdout)
    assert done["state"] == "succeeded", done
    written = f"{fleet.group}_03"
    query(fleet.db(written), "UPDATE items SET note = 'kept' WHERE id <= 5")

    refused = runbook_cli("rollback", done["id"], "--wait")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    line = refused.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert f"{written}: the downgrade of f1 drops column items.note holding 5 rows" in line, line
    assert "--accept-data-loss" in line and f"{fleet.group}_01" not in line, line
    no_backup = runbook_cli("rollback", done["id"], "--accept-data-loss")
    assert no_backup.returncode == 2, no_backup.stdout + no_backup.stderr
    assert f"{written} would lose data" in no_backup.stderr and "backup = false" in no_backup.stderr
    after = status(done["id"])
    assert after["state"] == "succeeded" and after["counts"] == {"succeeded": 4}, after
    assert all(fleet.revision(n) == "f1" for n in fleet.members)

    query(fleet.db(written), "UPDATE items SET note = NULL")  # the operator moved the data
    back = runbook_cli("rollback", done["id"], "--wait", "--json")
    assert back.returncode == 0, back.stderr + back.stdout
    assert json.loads(back.stdout)["counts"] == {"rolled_back": 4}
    assert all(fleet.revision(n) is None for n in fleet.members)


# f2's downgrade cannot be run at all (as an enum value that PostgreSQL cannot drop).
NO_WAY_DOWN = [
    FLEET_HISTORY[0],
    Rev(
        "f2",
        "op.execute(\"UPDATE items SET note = 'n' || id\")",
        "raise NotImplementedError('PostgreSQL cannot drop an ENUM value')",
    ),
]


def test_rollback_of_a_revision_with_no_way_down_is_refused_before_sending_anything(
    config: Config, databases: Databases, worker: Worker, tmp_path: Path
) -> None:
    # Found by hand: each member was sent a rollback run that failed on the same render, and
    # the rollout ended `failed` with every member `rollback_failed`, where `rollback --to`
    # of one target refuses up front.
    fleet = fleet_of(config, databases, tmp_path, 3, rows=20, revisions=NO_WAY_DOWN)
    done = json.loads(rollout(fleet.group, "--to", "f2", "--wait", "--json").stdout)
    assert done["state"] == "succeeded", done

    refused = runbook_cli("rollback", done["id"], "--wait")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    line = refused.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert "cannot render the downgrade of f2" in line and "cannot drop an ENUM" in line, line
    assert "no member was sent a rollback" in line and "runbook restore" in line, line
    after = status(done["id"])
    assert after["state"] == "succeeded" and after["counts"] == {"succeeded": 3}, after
    for name, dbname in fleet.members.items():
        assert fleet.revision(name) == "f2", name
        assert query(dbname, "SELECT count(*) FROM runbook.runs WHERE kind = 'rollback'") == [(0,)]


def test_a_halted_rollout_finishes_with_resume_once_the_cause_is_fixed(
    config: Config, databases: Databases, worker: Worker, tmp_path: Path
) -> None:
    fleet = fleet_of(config, databases, tmp_path, 5, rows=20)
    bad = f"{fleet.group}_03"
    duplicate_sku(fleet.db(bad))

    out = rollout(fleet.group, "--parallel", "2", "--wait", "--json")
    assert out.returncode == 1, out.stderr + out.stdout
    halted = json.loads(out.stdout)
    assert halted["state"] == "halted" and members(halted)[bad]["state"] == "failed"
    failed_run = members(halted)[bad]["run_id"]

    fix_duplicate(fleet.db(bad))
    resumed = runbook_cli("resume", halted["id"])
    assert resumed.returncode == 0, resumed.stderr
    done = settled(halted["id"])
    assert done["state"] == "succeeded", done
    assert done["counts"] == {"succeeded": 5}
    assert members(done)[bad]["run_id"] != failed_run  # a new run, not the failed one again
    assert all(fleet.revision(name) == "f3" for name in fleet.members)


def test_a_failed_canary_stops_the_rollout_before_any_other_member_starts(
    config: Config, databases: Databases, worker: Worker, tmp_path: Path
) -> None:
    fleet = fleet_of(config, databases, tmp_path, 5, rows=20)
    canary = f"{fleet.group}_04"  # named: it goes first although it sorts fourth
    config.add_group(fleet.group, targets=[f"{fleet.group}_*"], canary=[canary])
    duplicate_sku(fleet.db(canary))
    wholes = {n: _dump(db) for n, db in fleet.members.items()}

    out = rollout(fleet.group, "--parallel", "4", "--max-failures", "3", "--wait", "--json")
    assert out.returncode == 1, out.stderr + out.stdout
    halted = json.loads(out.stdout)
    assert halted["state"] == "halted" and "canary" in halted["error"], halted
    assert halted["counts"] == {"failed": 1, "pending": 4}
    assert halted["members"][0]["target"] == canary and halted["members"][0]["canary"]
    for name, m in members(halted).items():
        if name == canary:
            continue
        assert m["state"] == "pending" and m["run_id"] is None, m
        assert fleet.revision(name) is None
        assert not has_ledger(fleet.db(name))
        assert _dump(fleet.db(name)) == wholes[name]


def gated_fleet(config: Config, databases: Databases, tmp_path: Path) -> Fleet:
    """Four members whose one revision waits for a row in its table ``gate``: the first
    member's gate is shut (the rollout holds there until the test opens it), the others'
    open."""
    fleet = fleet_of(config, databases, tmp_path, 4, revisions=GATED, rows=5)
    for i, dbname in enumerate(fleet.members.values()):
        query(dbname, "CREATE TABLE gate (opened_at timestamptz NOT NULL DEFAULT now())")
        if i:
            open_gate(dbname)
    return fleet


def first_member_running(rollout_id: str) -> None:
    def running() -> bool:
        found = status(rollout_id)["members"]
        return bool(found) and found[0]["state"] == "running"

    until("the first member to run", running, 60)


def test_pause_holds_the_rollout_and_resume_finishes_it(
    config: Config, databases: Databases, worker: Worker, tmp_path: Path
) -> None:
    fleet = gated_fleet(config, databases, tmp_path)
    first = f"{fleet.group}_01"
    rollout_id = started(rollout(fleet.group, "--parallel", "1"))
    first_member_running(rollout_id)

    paused = runbook_cli("pause", rollout_id)
    assert paused.returncode == 0, paused.stderr
    assert status(rollout_id)["state"] == "pausing"
    open_gate(fleet.db(first))
    held = settled(rollout_id)
    assert held["state"] == "paused", held
    assert held["counts"] == {"succeeded": 1, "pending": 3}
    time.sleep(1.5)  # a pass or two later: still nothing started
    assert status(rollout_id)["counts"] == {"succeeded": 1, "pending": 3}
    assert all(not has_ledger(db) for n, db in fleet.members.items() if n != first)

    resumed = runbook_cli("resume", rollout_id)
    assert resumed.returncode == 0, resumed.stderr
    done = settled(rollout_id)
    assert done["state"] == "succeeded" and done["counts"] == {"succeeded": 4}, done
    assert all(fleet.revision(name) == "g1" for name in fleet.members)


def test_cancel_stops_starting_members_and_leaves_the_rest_untouched(
    config: Config, databases: Databases, worker: Worker, tmp_path: Path
) -> None:
    fleet = gated_fleet(config, databases, tmp_path)
    first = f"{fleet.group}_01"
    wholes = {n: _dump(db) for n, db in fleet.members.items()}
    rollout_id = started(rollout(fleet.group, "--parallel", "1"))
    first_member_running(rollout_id)

    cancelled = runbook_cli("cancel", rollout_id)
    assert cancelled.returncode == 0, cancelled.stderr
    open_gate(fleet.db(first))  # the member in flight finishes
    done = settled(rollout_id)
    assert done["state"] == "cancelled", done
    assert done["counts"] == {"succeeded": 1, "pending": 3}
    assert fleet.revision(first) == "g1"
    for name, dbname in fleet.members.items():
        if name != first:
            assert not has_ledger(dbname) and _dump(dbname) == wholes[name], name
    again = runbook_cli("resume", rollout_id)
    assert again.returncode == 2 and "cancelled" in again.stderr, again.stderr


def rollout_rows(control_db: str) -> list[tuple[Any, ...]]:
    return query(control_db, "SELECT id, state FROM runbook_control.rollouts ORDER BY id")


def test_bad_input_is_one_line_exit_2_and_records_nothing(
    config: Config, databases: Databases, worker: Worker, control_db: str, tmp_path: Path
) -> None:
    fleet = fleet_of(config, databases, tmp_path, 2, rows=5)
    done = json.loads(rollout(fleet.group, "--wait", "--json").stdout)
    assert done["state"] == "succeeded"
    # A runbook.toml with the same group but no [control]: the group cannot run.
    alone = tmp_path / "alone.toml"
    member = next(iter(fleet.members))
    alone.write_text(
        f"[targets.{member}]\nurl = {json.dumps(db_url(fleet.db(member)))}\n"
        f"alembic_ini = {json.dumps(str(fleet.ini))}\n\n"
        f'[groups.{fleet.group}]\ntargets = ["{fleet.group}_*"]\n'
    )
    no_control = {"RUNBOOK_CONFIG": str(alone), "RUNBOOK_CONTROL_URL": ""}
    before = rollout_rows(control_db)
    cases: list[tuple[tuple[str, ...], dict[str, str] | None, str]] = [
        (("rollout", "--group", "nosuchgroup"), None, "nosuchgroup"),
        (("rollout", "--group", fleet.group), no_control, "[control]"),
        (("rollout", "--group", fleet.group, "--parallel", "0"), None, "--parallel"),
        (("rollout", "--group", fleet.group, "--to", "nosuchrev"), None, "nosuchrev"),
        (("rollback", done["id"], "--to", "base"), None, "--to"),
        (("rollback", "--accept-data-loss"), None, "--to"),
        (("status", "r-nosuch"), None, "r-nosuch"),
    ]
    for args, env, expected in cases:
        result = runbook_cli(*args, env=env)
        shown = f"{args}: {result.stderr!r} {result.stdout!r}"
        assert result.returncode == 2, shown
        assert result.stderr.count("\n") == 1 and expected in result.stderr, shown
        assert result.stderr.startswith("runbook: error: "), shown
        assert "Traceback" not in result.stderr + result.stdout, shown
    assert rollout_rows(control_db) == before
    assert all(fleet.revision(name) == "f3" for name in fleet.members)
