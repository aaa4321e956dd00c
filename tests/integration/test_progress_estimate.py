"""A backfill's percent and ETA hold where the planner's guess does not: on a table bloated by
earlier full-table UPDATEs, on integer keys with a large gap, under a WHERE that skips 90% of
the rows, and on uuid keys. Counting at creation is switched off (RUNBOOK_COUNT_BUDGET_MS=0),
so that the key-mark estimate (jobs/ledger/estimate.py) is what status shows, sampled while
the installed `runbook backfill` runs on the shared worker."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.integration.conftest import (
    Config,
    Databases,
    Worker,
    db_url,
    query,
    runbook_cli,
)

pytestmark = pytest.mark.integration

ESTIMATE_ONLY = {"RUNBOOK_COUNT_BUDGET_MS": "0"}
# Slow per updated row (sqlguard cannot see inside functions), so that a backfill of a
# 100-200k-row table runs for several seconds at a steady rate: CPU (an md5 of n bytes and
# the key, the same for every key, about 30 us for 15,000 bytes here), not pg_sleep, whose
# wake-ups on a busy machine vary tenfold. The key keeps the planner from folding it.
SLOW = (
    "CREATE FUNCTION slow_one(k text, n int) RETURNS int LANGUAGE sql "
    "AS 'SELECT length(md5(repeat(''x'', n) || k)) * 0 + 1'"
)
SET_SLOWLY = "counter = counter + slow_one(CAST(id AS text), 40000)"


@dataclass
class Sample:
    at: float  # time.monotonic() when status answered
    now: dict[str, Any]


def make_table(config: Config, databases: Databases, keys_sql: str, key_type: str) -> tuple:
    """A table whose keys ``keys_sql`` selects, autovacuum off so that dead rows stay."""
    dbname = databases.create()
    query(
        dbname,
        f"""
        CREATE TABLE t (id {key_type} PRIMARY KEY, counter int NOT NULL DEFAULT 0)
            WITH (autovacuum_enabled = false);
        INSERT INTO t (id) {keys_sql};
        {SLOW};
        ANALYZE t;
        """,
    )
    name = f"t_{dbname}"
    config.add(name, url=db_url(dbname), backup=False)
    return name, dbname


def planner_rows(dbname: str) -> int:
    plan = query(dbname, "EXPLAIN (FORMAT JSON) SELECT 1 FROM t")[0][0]
    return int(plan[0]["Plan"]["Plan Rows"])


def status(backfill_id: str) -> dict[str, Any]:
    out = runbook_cli("status", backfill_id, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def run_and_sample(name: str, *args: str) -> tuple[str, list[Sample], float]:
    """Start a backfill (counting off) and sample `runbook status --json` until it succeeds;
    its id, the samples and when it was first seen finished."""
    started = runbook_cli(
        "backfill", "--target", name, "--table", "t", *args, "--json", env=ESTIMATE_ONLY
    )
    assert started.returncode == 0, started.stderr
    backfill_id = json.loads(started.stdout)["id"]
    samples: list[Sample] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = status(backfill_id)
        samples.append(Sample(time.monotonic(), now))
        if now["state"] == "succeeded":
            return backfill_id, samples, samples[-1].at
        assert now["state"] in {"enqueued", "running"}, now
        time.sleep(0.1)
    pytest.fail(f"backfill {backfill_id} did not finish: {samples[-1].now}")


def check_progress(samples: list[Sample], finished_at: float, final_rows: int, kind: str) -> None:
    """From 10% done on, every percent within 10% of the truth (rows done / rows it finally
    updated) and of the estimate kind expected; the ETA at about half way within 10% of the
    time that was actually left (or 1 s: the ETA is whole seconds, and status is sampled
    every few tenths of a second, so the finish is seen up to about half a second late)."""
    running = [s for s in samples if s.now["state"] == "running" and s.now["rows_done"]]
    checked = [s for s in running if s.now["rows_done"] >= 0.1 * final_rows]
    assert len(checked) >= 5, f"too few samples while running: {[s.now for s in samples]}"
    for s in checked:
        truth = 100.0 * s.now["rows_done"] / final_rows
        assert abs(s.now["percent"] - truth) <= 0.1 * truth, (truth, s.now)
        assert s.now["estimate"] == kind, s.now
        assert abs(s.now["rows_total"] - final_rows) <= 0.1 * final_rows, (final_rows, s.now)
    # The ETA around half way (45-55% done): each status answer against the time that was
    # actually left after it, the median of their misses within the bound. One answer alone
    # is at the mercy of a second of load from the other test process on a 2-core machine.
    halfway = [s for s in checked if 0.45 * final_rows <= s.now["rows_done"] <= 0.55 * final_rows]
    halfway = halfway or [next(s for s in checked if s.now["rows_done"] >= 0.5 * final_rows)]
    misses = []
    for s in halfway:
        actual_left = finished_at - s.at
        assert s.now["eta_s"] is not None, s.now
        misses.append(abs(s.now["eta_s"] - actual_left) - max(0.1 * actual_left, 1.0))
    assert statistics.median(misses) <= 0, [
        (m, s.now["eta_s"]) for m, s in zip(misses, halfway, strict=True)
    ]


def check_finished(samples: list[Sample], final_rows: int) -> None:
    """The finished backfill: 100% of its exact count, the rows it updated."""
    done = samples[-1].now
    assert (done["percent"], done["rows_total"], done["rows_done"]) == (
        100.0,
        final_rows,
        final_rows,
    )
    assert done["estimate"] == "counted" and done["eta_s"] is None, done
    line = runbook_cli("status", done["backfill_id"])
    assert f"{final_rows} of {final_rows} rows (exact count), 100.0%" in line.stdout, line.stdout


def test_a_table_bloated_by_earlier_updates(
    worker: Worker, config: Config, databases: Databases
) -> None:
    rows = 120_000
    name, dbname = make_table(
        config, databases, f"SELECT g FROM generate_series(1, {rows}) g", "bigint"
    )
    for _ in range(5):  # every UPDATE leaves a dead version of each row: six times the pages
        query(dbname, "UPDATE t SET counter = counter + 1")
    assert planner_rows(dbname) >= 4 * rows  # reltuples / relpages x today's pages
    backfill_id, samples, finished_at = run_and_sample(
        name, "--set", SET_SLOWLY, "--slices", "2", "--batch-size", "500"
    )
    assert samples[0].now["rows_total"] <= 1.1 * rows, samples[0].now  # not the planner's
    check_progress(samples, finished_at, rows, "key-range")
    check_finished(samples, rows)


def test_integer_keys_with_a_large_gap(
    worker: Worker, config: Config, databases: Databases
) -> None:
    # Half the rows packed at the bottom, half spread thinly a thousand times higher: the key
    # span alone would put the cursor at the end after the first half.
    keys = (
        "SELECT g FROM generate_series(1, 60000) g "
        "UNION ALL SELECT 100000000 + g * 50 FROM generate_series(1, 60000) g"
    )
    name, _ = make_table(config, databases, keys, "bigint")
    _, samples, finished_at = run_and_sample(name, "--set", SET_SLOWLY, "--batch-size", "500")
    check_progress(samples, finished_at, 120_000, "sampled")
    check_finished(samples, 120_000)


def test_a_where_that_skips_most_rows(worker: Worker, config: Config, databases: Databases) -> None:
    name, dbname = make_table(
        config, databases, "SELECT g FROM generate_series(1, 200000) g", "bigint"
    )
    query(dbname, "UPDATE t SET counter = 1 WHERE id % 10 = 0")
    slow = "counter = counter + slow_one(CAST(id AS text), 300000)"  # 10x fewer rows
    _, samples, finished_at = run_and_sample(
        name, "--set", slow, "--where", "counter = 1", "--batch-size", "2000"
    )
    final = query(dbname, "SELECT count(*) FROM t WHERE counter > 1")[0][0]
    assert final == 20_000
    check_progress(samples, finished_at, final, "key-range")
    check_finished(samples, final)


def test_uuid_keys(worker: Worker, config: Config, databases: Databases) -> None:
    keys = "SELECT gen_random_uuid() FROM generate_series(1, 60000)"
    name, _ = make_table(config, databases, keys, "uuid")
    _, samples, finished_at = run_and_sample(name, "--set", SET_SLOWLY, "--batch-size", "500")
    check_progress(samples, finished_at, 60_000, "key-range")
    check_finished(samples, 60_000)


def test_a_cheap_count_is_exact(worker: Worker, config: Config, databases: Databases) -> None:
    name, _ = make_table(config, databases, "SELECT g FROM generate_series(1, 5000) g", "bigint")
    started = runbook_cli(
        "backfill", "--target", name, "--table", "t", "--set", "counter = 2", "--wait", "--json"
    )
    assert started.returncode == 0, started.stderr
    done = json.loads(started.stdout)
    assert (done["estimate"], done["rows_total"], done["percent"]) == ("counted", 5000, 100.0)
