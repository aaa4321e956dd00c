"""examples/grafana-dashboard.json: it parses, its datasource is a variable, and every panel
asks for metrics the exporter serves (jobs/metrics/families.py METRICS) and no others."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jobs.metrics.families import METRICS

DASHBOARD = Path(__file__).resolve().parents[3] / "examples" / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"\brunbook_[a-z_]+\b")


def test_every_panel_asks_for_metrics_the_exporter_serves() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert panels
    asked: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(METRIC_NAME.findall(target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= set(METRICS), (panel["title"], names - set(METRICS))
            asked |= names
    # What the issue asks the board to show.
    for name in (
        "runbook_runs",
        "runbook_backfill_rows_done",
        "runbook_backfill_rows_left",
        "runbook_backfill_rows_per_second",
        "runbook_backfill_throttled_seconds",
    ):
        assert name in asked, name
    query = variables["target"]["query"]["query"]
    assert set(METRIC_NAME.findall(query)) <= set(METRICS)
