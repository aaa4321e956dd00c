"""Rollouts over a group of real member databases, driven through the installed `runbook`
command and a `runbook worker`: canary first, waves, skipped members, and the fleet's answer
to "where is it?" (jobs/fleet/, jobs/api/rollouts.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import Config, Databases, Worker, runbook_cli
from tests.integration.fleet_support import make_fleet

pytestmark = pytest.mark.usefixtures("control_db")


def test_a_clean_rollout_brings_every_member_to_head_canary_first(
    config: Config,
    databases: Databases,
    worker: Worker,
    control_db: str,
    tmp_path: Path,  # noqa: F811
) -> None:
    fleet = make_fleet(config, databases, tmp_path, 12)
    ahead = [f"{fleet.group}_05", f"{fleet.group}_11"]
    for name in ahead:  # already at head: skipped, without a run
        done = runbook_cli("apply", "--target", name, "--wait")
        assert done.returncode == 0, done.stderr

    out = runbook_cli(
        "rollout", "--group", fleet.group, "--parallel", "3", "--wait", "--json", timeout=300
    )
    assert out.returncode == 0, out.stderr + out.stdout
    found = json.loads(out.stdout)
    assert found["kind"] == "rollout" and found["state"] == "succeeded"
    assert found["to_revision"] == "f3"
    assert found["counts"] == {"succeeded": 10, "skipped": 2}
    members = {m["target"]: m for m in found["members"]}
    assert [m["target"] for m in found["members"]] == sorted(fleet.members)
    assert members[f"{fleet.group}_01"]["canary"]
    for name in fleet.members:
        assert fleet.revision(name) == "f3", name
        expected = "skipped" if name in ahead else "succeeded"
        assert members[name]["state"] == expected
        assert (members[name]["run_id"] is None) == (name in ahead)
        if name not in ahead:
            assert members[name]["from_revision"] is None  # base
    # The canary ended before any other member started.
    canary = members[f"{fleet.group}_01"]
    others = [m for m in found["members"] if not m["canary"] and m["state"] == "succeeded"]
    assert all(m["started_at"] >= canary["finished_at"] for m in others)

    status = runbook_cli("status", found["id"], "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "succeeded"
    listed = runbook_cli("rollouts", "--group", fleet.group, "--json")
    assert [r["id"] for r in json.loads(listed.stdout)] == [found["id"]]
    mix = runbook_cli("targets", "--group", fleet.group, "--json")
    assert json.loads(mix.stdout)["revisions"] == {"f3": 12}
    # A member run is found by its id without opening every target (the control index).
    run_id = members[f"{fleet.group}_02"]["run_id"]
    shown = runbook_cli("status", run_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["target"] == f"{fleet.group}_02"
