"""The exporter's metrics, drawn from the targets' facts (jobs/metrics/facts.py): no I/O here.

Labels are names and ids (target, run, backfill, table, state, step, revision, slice, and
the kind of a throttle's reason), never a URL, a host or a password. Every metric is a gauge:
each value is what the ledger says now, read at the scrape.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client.core import GaugeMetricFamily

from jobs.ledger.records import Run
from jobs.metrics.facts import BackfillFacts, ControlFacts, TargetFacts
from jobs.states import TERMINAL, BackfillState, MemberState, RolloutState, RunState

TARGET = ("target",)
BACKFILL = ("target", "backfill", "table")
ROLLOUT = ("rollout", "group")

# name: (help, labels). The dashboard (examples/grafana-dashboard.json) and README name these.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "runbook_target_up": (
        "1 when the target's ledger was read at this scrape, 0 when it could not be "
        "(broken entry, database down, no ledger yet)",
        TARGET,
    ),
    "runbook_target_scrape_duration_seconds": (
        "Seconds spent reading the target's ledger at this scrape",
        TARGET,
    ),
    "runbook_runs": ("Runs of the target in each state", (*TARGET, "state")),
    "runbook_run_current_info": (
        "The target's unfinished run and its latest step (1 while there is one)",
        (*TARGET, "run", "kind", "state", "step", "revision", "step_state"),
    ),
    "runbook_run_current_age_seconds": (
        "Seconds since the target's unfinished run was started (or enqueued, if not yet)",
        (*TARGET, "run", "kind"),
    ),
    "runbook_run_current_step_age_seconds": (
        "Seconds since the unfinished run's latest step started",
        (*TARGET, "run", "step", "revision"),
    ),
    "runbook_run_last_outcome": (
        "1 for the state the target's last finished run ended in, 0 for the other end states",
        (*TARGET, "state"),
    ),
    "runbook_run_last_duration_seconds": (
        "Seconds the target's last finished run took, from its start (or enqueue) to its end",
        (*TARGET, "run", "kind"),
    ),
    "runbook_run_last_finished_timestamp_seconds": (
        "When the target's last finished run ended (Unix time)",
        (*TARGET, "run", "kind"),
    ),
    "runbook_backfill_state": (
        "1 for the backfill's state, 0 for the others",
        (*BACKFILL, "state"),
    ),
    "runbook_backfill_rows_done": ("Rows the backfill has updated", BACKFILL),
    "runbook_backfill_rows_left": (
        "Rows still to update, as `runbook status` estimates them",
        BACKFILL,
    ),
    "runbook_backfill_rows_total": (
        "Rows to update in all, counted or the planner's estimate (the estimate label)",
        (*BACKFILL, "estimate"),
    ),
    "runbook_backfill_rows_per_second": (
        "Rows per second over the last minute of batches, throttled time left out",
        BACKFILL,
    ),
    "runbook_backfill_eta_seconds": ("Seconds left at the current rate", BACKFILL),
    "runbook_backfill_throttled_seconds": (
        "Seconds the backfill's slices waited on the database's signals, in all",
        BACKFILL,
    ),
    "runbook_backfill_slice_throttled_seconds": (
        "Seconds each slice waited, labelled with the kind of the latest reason it waited for "
        "(the ledger keeps each slice's total and latest reason, not time per reason)",
        (*BACKFILL, "slice", "reason"),
    ),
    "runbook_backfill_skipped_rows": ("Rows an isolating backfill left alone", BACKFILL),
    "runbook_control_up": (
        "1 when the control database was read at this scrape, 0 when it could not be "
        "(served only when one is configured)",
        (),
    ),
    "runbook_rollout_state": (
        "1 for the rollout's state, 0 for the others (unsettled rollouts, and those settled "
        "in the last 24 hours)",
        (*ROLLOUT, "to_revision", "state"),
    ),
    "runbook_rollout_members": (
        "The rollout's members in each state, 0 for the states with none",
        (*ROLLOUT, "state"),
    ),
    "runbook_rollout_age_seconds": (
        "Seconds since the rollout was asked for, until it settled",
        ROLLOUT,
    ),
}

# What a throttle's reason is about, from the words jobs/backfill/pacing.py and
# jobs/pg/replication.py write: a fixed set of label values, where the text holds numbers.
REASON_KINDS = (
    ("old_transaction", re.compile(r"holds back vacuum")),
    ("autovacuum", re.compile(r"^autovacuum\b")),
    ("replica_lag", re.compile(r"\breplica lag\b|\bstandby\b")),
    ("retained_wal", re.compile(r"\bretains\b.*\bWAL\b")),
    ("wal_rate", re.compile(r"\bWAL rate\b")),
)


def reason_kind(reason: str | None) -> str:
    """The throttle reason's kind: one of REASON_KINDS' names, "none" or "other"."""
    if not reason:
        return "none"
    for kind, pattern in REASON_KINDS:
        if pattern.search(reason):
            return kind
    return "other"


def _family(name: str) -> GaugeMetricFamily:
    doc, labels = METRICS[name]
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _since(moment: datetime | None, now: datetime) -> float:
    return 0.0 if moment is None else max((now - moment).total_seconds(), 0.0)


def _add_runs(fams: dict[str, GaugeMetricFamily], facts: TargetFacts, now: datetime) -> None:
    t = facts.target
    for state in RunState:
        fams["runbook_runs"].add_metric([t, state], facts.runs_by_state.get(state, 0))
    run = facts.current
    if run is not None:
        step = run.steps[-1] if run.steps else None
        kind, revision = (step.kind, step.revision) if step else ("", "")
        fams["runbook_run_current_info"].add_metric(
            [t, run.id, run.kind, run.state, kind, revision, step.state if step else ""], 1
        )
        fams["runbook_run_current_age_seconds"].add_metric(
            [t, run.id, run.kind], _since(run.started_at or run.created_at, now)
        )
        if step is not None:
            fams["runbook_run_current_step_age_seconds"].add_metric(
                [t, run.id, kind, revision], _since(step.started_at, now)
            )
    _add_last(fams, t, facts.last)


def _add_last(fams: dict[str, GaugeMetricFamily], t: str, last: Run | None) -> None:
    if last is None or last.finished_at is None:
        return
    for state in sorted(TERMINAL):
        fams["runbook_run_last_outcome"].add_metric([t, state], 1 if last.state == state else 0)
    labels = [t, last.id, last.kind]
    began = last.started_at or last.created_at
    fams["runbook_run_last_duration_seconds"].add_metric(labels, _since(began, last.finished_at))
    fams["runbook_run_last_finished_timestamp_seconds"].add_metric(
        labels, last.finished_at.timestamp()
    )


def _add_backfill(fams: dict[str, GaugeMetricFamily], facts: BackfillFacts) -> None:
    p = facts.progress
    labels = [p["target"], p["backfill_id"], p["table"]]
    for state in BackfillState:
        fams["runbook_backfill_state"].add_metric([*labels, state], 1 if p["state"] == state else 0)
    fams["runbook_backfill_rows_done"].add_metric(labels, p["rows_done"])
    fams["runbook_backfill_rows_left"].add_metric(labels, p["rows_left"])
    fams["runbook_backfill_rows_total"].add_metric(
        [*labels, p["estimate"] or "unknown"], p["rows_total"]
    )
    fams["runbook_backfill_rows_per_second"].add_metric(labels, p["rate_rows_s"] or 0)
    if p["eta_s"] is not None:
        fams["runbook_backfill_eta_seconds"].add_metric(labels, p["eta_s"])
    fams["runbook_backfill_throttled_seconds"].add_metric(labels, p["throttled_s"])
    for s in facts.throttles:
        fams["runbook_backfill_slice_throttled_seconds"].add_metric(
            [*labels, str(s.slice), reason_kind(s.reason)], s.throttled_s
        )
    fams["runbook_backfill_skipped_rows"].add_metric(labels, p["skipped"])


def _add_control(fams: dict[str, GaugeMetricFamily], control: ControlFacts, now: datetime) -> None:
    fams["runbook_control_up"].add_metric([], 1 if control.up else 0)
    for r in control.rollouts:
        labels = [r.id, r.group]
        for state in RolloutState:
            fams["runbook_rollout_state"].add_metric(
                [*labels, r.to_revision or "base", state], 1 if r.state == state else 0
            )
        for member_state in MemberState:
            fams["runbook_rollout_members"].add_metric(
                [*labels, member_state], r.members.get(member_state, 0)
            )
        fams["runbook_rollout_age_seconds"].add_metric(
            labels, _since(r.created_at, r.settled_at or now)
        )


def families(
    targets: list[TargetFacts],
    now: datetime | None = None,
    control: ControlFacts | None = None,
) -> Iterator[GaugeMetricFamily]:
    """Every metric of METRICS, with a sample per target (and per run, backfill) it applies
    to, and per rollout when there is a control database."""
    now = now or datetime.now(UTC)
    fams = {name: _family(name) for name in METRICS}
    if control is not None:
        _add_control(fams, control, now)
    for facts in targets:
        fams["runbook_target_up"].add_metric([facts.target], 1 if facts.up else 0)
        fams["runbook_target_scrape_duration_seconds"].add_metric([facts.target], facts.read_s)
        if not facts.up:
            continue
        _add_runs(fams, facts, now)
        for bf in facts.backfills:
            _add_backfill(fams, bf)
    yield from fams.values()
