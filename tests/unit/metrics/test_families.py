"""The exporter's metrics drawn from ledger records (jobs/metrics/families.py), without a
database: what each target, run and backfill gives, and what a target that is down gives."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from jobs.fleet.overview import RolloutFacts
from jobs.ledger.records import Backfill, Run, Step, backfill_progress
from jobs.metrics.facts import BackfillFacts, ControlFacts, SliceThrottle, TargetFacts
from jobs.metrics.families import METRICS, families, reason_kind
from jobs.states import TERMINAL, BackfillState, MemberState, RolloutState, RunState

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def run(state: str, *, started: float, finished: float | None = None) -> Run:
    return Run(
        id=f"run-{state}",
        target="prod",
        kind="apply",
        state=state,
        from_revision=None,
        to_revision="r2",
        current_revision="r1",
        error=None,
        options={},
        backup=None,
        fingerprint_before=None,
        created_at=NOW - timedelta(seconds=started + 1),
        started_at=NOW - timedelta(seconds=started),
        finished_at=None if finished is None else NOW - timedelta(seconds=finished),
        deliveries=1,
    )


def backfill(state: str = "running", rows_done: int = 2500) -> Backfill:
    # The fields progress reads; the others (batch settings, bounds) None, so that a column
    # the ledger gains later does not break this test.
    given: dict[str, Any] = {
        "id": "bf1",
        "target": "prod",
        "table_name": "public.orders",
        "set_sql": "v = 1",
        "state": state,
        "rows_total_estimate": 10000,
        "estimate_kind": "counted",
        "created_at": NOW,
        "updated_at": NOW,
        "rows_done": rows_done,
        "throttled_ms": 4500,
        "skipped": 0,
    }
    return Backfill(**{**dict.fromkeys(f.name for f in fields(Backfill)), **given})


def scrape(targets: list[TargetFacts], control: ControlFacts | None = None) -> tuple[str, Samples]:
    registry = CollectorRegistry()

    class Fixed(Collector):
        def collect(self) -> Iterator[Metric]:
            return families(targets, NOW, control)

    registry.register(Fixed())
    text = generate_latest(registry).decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def test_a_target_with_a_run_in_its_upgrade_a_finished_run_and_a_backfill() -> None:
    current = run("running", started=90)
    current.steps = [
        Step(1, current.id, "backup", "", "succeeded", NOW - timedelta(seconds=89), NOW, 1, None),
        Step(2, current.id, "upgrade", "r2", "running", NOW - timedelta(seconds=30), None, 1, None),
    ]
    bf = backfill()
    # 1,000 rows in 2 busy seconds over the last minute: 500 rows/s, 7,500 left, ETA 15 s.
    progress = backfill_progress(bf, (1000, 2.0), None, [])
    facts = TargetFacts(
        "prod",
        up=True,
        read_s=0.02,
        runs_by_state={"succeeded": 3, "running": 1},
        current=current,
        last=run("rolled_back", started=400, finished=100),
        backfills=[
            BackfillFacts(
                progress,
                [
                    SliceThrottle(0, 4.0, "a transaction open for 700 s holds back vacuum"),
                    SliceThrottle(1, 0.5, None),
                ],
            )
        ],
    )
    text, samples = scrape([facts])
    t = {"target": "prod"}

    for state in RunState:  # every known state, zeros included
        expected = {"succeeded": 3, "running": 1}.get(state, 0)
        assert samples[("runbook_runs", frozenset({**t, "state": state}.items()))] == expected
    info = {**t, "run": "run-running", "kind": "apply", "state": "running"}
    step = {"step": "upgrade", "revision": "r2", "step_state": "running"}
    assert samples[("runbook_run_current_info", frozenset({**info, **step}.items()))] == 1
    age = {**t, "run": "run-running", "kind": "apply"}
    assert samples[("runbook_run_current_age_seconds", frozenset(age.items()))] == 90
    step_age = {**t, "run": "run-running", "step": "upgrade", "revision": "r2"}
    assert samples[("runbook_run_current_step_age_seconds", frozenset(step_age.items()))] == 30
    for state in TERMINAL:
        key = ("runbook_run_last_outcome", frozenset({**t, "state": state}.items()))
        assert samples[key] == (1 if state == "rolled_back" else 0)
    last = {**t, "run": "run-rolled_back", "kind": "apply"}
    assert samples[("runbook_run_last_duration_seconds", frozenset(last.items()))] == 300

    b = {**t, "backfill": "bf1", "table": "public.orders"}
    for bf_state in BackfillState:
        key = ("runbook_backfill_state", frozenset({**b, "state": bf_state}.items()))
        assert samples[key] == (1 if bf_state == "running" else 0)
    assert samples[("runbook_backfill_rows_done", frozenset(b.items()))] == 2500
    assert samples[("runbook_backfill_rows_left", frozenset(b.items()))] == 7500
    total = frozenset({**b, "estimate": "counted"}.items())
    assert samples[("runbook_backfill_rows_total", total)] == 10000
    assert samples[("runbook_backfill_rows_per_second", frozenset(b.items()))] == 500
    assert samples[("runbook_backfill_eta_seconds", frozenset(b.items()))] == 15
    assert samples[("runbook_backfill_throttled_seconds", frozenset(b.items()))] == 4.5
    slice0 = frozenset({**b, "slice": "0", "reason": "old_transaction"}.items())
    slice1 = frozenset({**b, "slice": "1", "reason": "none"}.items())
    assert samples[("runbook_backfill_slice_throttled_seconds", slice0)] == 4.0
    assert samples[("runbook_backfill_slice_throttled_seconds", slice1)] == 0.5
    assert samples[("runbook_target_up", frozenset(t.items()))] == 1
    # Every metric the exporter declares has its HELP and TYPE, whether or not it has samples.
    for name in METRICS:
        assert f"# TYPE {name} gauge" in text


def test_a_target_that_is_down_gives_up_0_and_its_read_time_only() -> None:
    down = TargetFacts("down", up=False, read_s=0.004, error="target 'down': unreachable")
    finished = backfill(state="succeeded", rows_done=10000)
    up = TargetFacts(
        "prod", up=True, backfills=[BackfillFacts(backfill_progress(finished, (0, 0.0), None, []))]
    )
    _, samples = scrape([down, up])
    of_down = {name for (name, labels), _ in samples.items() if ("target", "down") in labels}
    assert of_down == {"runbook_target_up", "runbook_target_scrape_duration_seconds"}
    assert samples[("runbook_target_up", frozenset({("target", "down")}))] == 0
    # Finished: nothing left, no rate, no ETA sample at all.
    b = frozenset({"target": "prod", "backfill": "bf1", "table": "public.orders"}.items())
    assert samples[("runbook_backfill_rows_left", b)] == 0
    assert samples[("runbook_backfill_rows_per_second", b)] == 0
    assert ("runbook_backfill_eta_seconds", b) not in samples
    # No run yet: zeros by state, no current or last run.
    assert samples[("runbook_runs", frozenset({"target": "prod", "state": "failed"}.items()))] == 0
    assert not [name for (name, _), _ in samples.items() if name.startswith("runbook_run_")]


def test_throttle_reasons_are_a_few_kinds_not_their_text() -> None:
    assert reason_kind(None) == "none"
    assert reason_kind("") == "none"
    assert reason_kind("a transaction open for 612 s holds back vacuum (limit 600 s)") == (
        "old_transaction"
    )
    assert reason_kind("autovacuum is working on public.orders") == "autovacuum"
    assert reason_kind("replica lag 3.4 s on standby1 (max_replica_lag 2 s)") == "replica_lag"
    assert reason_kind("slot cdc retains 1.3 GB of WAL (max_retained_wal 1.1 GB)") == (
        "retained_wal"
    )
    assert reason_kind("WAL rate 25.0 MB/s over max_wal_rate 20 MB/s") == "wal_rate"
    assert reason_kind("something new") == "other"


def test_labels_are_names_and_ids_never_urls() -> None:
    allowed = {"target", "state", "run", "kind", "step", "revision", "step_state"}
    allowed |= {"backfill", "table", "estimate", "slice", "reason"}
    allowed |= {"rollout", "group", "to_revision"}
    for name, (_, labels) in METRICS.items():
        assert name.startswith("runbook_")
        assert set(labels) <= allowed, name


def test_rollouts_by_state_with_their_members_counted() -> None:
    going = RolloutFacts(
        "ro1",
        "tenants",
        "running",
        "a3",
        NOW - timedelta(seconds=120),
        None,
        {"succeeded": 7, "running": 3, "pending": 2},
    )
    settled = RolloutFacts(
        "ro0",
        "tenants",
        "halted",
        None,
        NOW - timedelta(hours=2),
        NOW - timedelta(hours=1),
        {"succeeded": 4, "failed": 1, "pending": 7},
    )
    _, samples = scrape([], ControlFacts(up=True, rollouts=[going, settled]))
    assert samples[("runbook_control_up", frozenset())] == 1
    for r, revision, state in (("ro1", "a3", "running"), ("ro0", "base", "halted")):
        for each in RolloutState:
            labels = {"rollout": r, "group": "tenants", "to_revision": revision, "state": each}
            assert samples[("runbook_rollout_state", frozenset(labels.items()))] == (
                1 if each == state else 0
            )
    for member_state in MemberState:  # every member state, zeros included
        labels = {"rollout": "ro1", "group": "tenants", "state": member_state}
        expected = going.members.get(member_state, 0)
        assert samples[("runbook_rollout_members", frozenset(labels.items()))] == expected
    age = ("runbook_rollout_age_seconds", frozenset({"rollout": "ro1", "group": "tenants"}.items()))
    assert samples[age] == 120
    done = frozenset({"rollout": "ro0", "group": "tenants"}.items())
    assert samples[("runbook_rollout_age_seconds", done)] == 3600  # until it settled


def test_no_control_database_gives_no_control_samples_and_one_down_gives_up_0() -> None:
    _, samples = scrape([])
    assert not [n for (n, _), _ in samples.items() if "control" in n or "rollout" in n]
    _, samples = scrape([], ControlFacts(up=False, error="control database unreachable"))
    assert samples == {("runbook_control_up", frozenset()): 0}
