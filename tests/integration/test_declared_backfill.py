"""Backfills declared by revisions: expand -> backfill -> contract of the reference history's
large_table, run by apply between d2e3f4g5h6i7's upgrade and its verify (real Postgres).

The first tests drive the coordinator in this process (no Celery): with a sender that only
records the slices, the run waits for the backfill and a later delivery finds its outcome;
without one the slices run in the delivery. The last ones go through a real worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from jobs import api
from jobs.backfill import walk
from jobs.config import load_settings
from jobs.dispatch import SliceMessage
from jobs.ledger import backfills, records, runs, schema
from jobs.pg import db
from jobs.run.deliver import execute
from tests.integration.conftest import (
    Config,
    Databases,
    Worker,
    db_url,
    query,
    reference_copy,
    runbook_cli,
    schema_dump,
    seeded_reference_db,
)
from worker.flower import slice_label

pytestmark = pytest.mark.integration

ROWS = 2500
BEFORE, EXPAND, BACKFILL, CONTRACT = (
    "b0c1d2e3f4g5",
    "c1d2e3f4g5h6",
    "d2e3f4g5h6i7",
    "e3f4g5h6i7j8",
)
NULLS = "SELECT count(*) FROM large_table WHERE new_column IS NULL"
BACKFILL_FILE = "d2e3f4g5h6i7_backfill_large_table_new_column.py"
CONTRACT_FILE = "e3f4g5h6i7j8_make_large_table_new_column_not_null.py"


def reference_target(
    config: Config, databases: Databases, tmp_path: Path, rows: int = ROWS, at: str | None = None
) -> tuple[str, str, Path]:
    """A seeded database at the reference history's first revision (or, with plain alembic,
    at ``at``) and a target for it (no backup: these tests are about backfills); (target,
    database, migrations/versions)."""
    ini = reference_copy(tmp_path)
    dbname = seeded_reference_db(databases, ini, large_rows=rows)
    if at:
        subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", at],
            env={"DATABASE_URL": db_url(dbname), "PATH": "/usr/bin:/bin"},
            check=True,
            capture_output=True,
        )
    name = f"t_{dbname}"
    config.add(
        name, url=db_url(dbname), alembic_ini=str(ini), backup_dir=str(tmp_path / "b"), backup=False
    )
    return name, dbname, ini.parent / "migrations" / "versions"


def admit(name: str, to: str = CONTRACT) -> str:
    """Record an apply run without sending it anywhere; its id."""
    target = load_settings().target(name)
    with db.connect(target) as conn:
        schema.ensure(conn)
        current = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        conn.rollback()
        return runs.admit(
            conn,
            target=name,
            kind="apply",
            from_revision=current,
            to_revision=to,
            options={"backup": False},
        )


def run_record(name: str, run_id: str) -> dict[str, Any]:
    with db.connect(load_settings().target(name)) as conn:
        return runs.get_run(conn, run_id).as_dict()


def backfills_of(name: str, run_id: str) -> list[records.Backfill]:
    with db.connect(load_settings().target(name)) as conn:
        return backfills.list_backfills(conn, run_id=run_id)


def steps(run: dict[str, Any], revisions: tuple[str, ...]) -> list[tuple[str, str, str]]:
    return [
        (s["kind"], s["revision"], s["state"]) for s in run["steps"] if s["revision"] in revisions
    ]


def in_order(state: str = "succeeded") -> list[tuple[str, str, str]]:
    return [
        ("upgrade", EXPAND, "succeeded"),
        ("verify", EXPAND, "succeeded"),
        ("upgrade", BACKFILL, "succeeded"),
        ("backfill", BACKFILL, state),
    ]


# -- the coordinator in this process ----------------------------------------------------------


def test_the_run_waits_for_its_backfill_and_a_later_delivery_carries_on(
    config: Config, databases: Databases, tmp_path: Path
) -> None:
    name, dbname, _ = reference_target(config, databases, tmp_path, at=BEFORE)
    run_id = admit(name)
    sent: list[tuple[str, str, int, int]] = []

    def send(message: SliceMessage) -> None:
        backfill_id, target, slice_no = message.backfill_id, message.target, message.slice_no
        label = slice_label(message)  # what Flower will show
        assert label.startswith(f"backfill {backfill_id} on {target}, slice {slice_no} keys ("), (
            label
        )
        assert "]: UPDATE " in label, label
        sent.append((backfill_id, target, slice_no, message.generation))

    settings = load_settings()
    first = execute(settings, run_id, name, send_slice=send)
    # The run waits, still running, its lock released; the slices went to the sender.
    assert (first.state, first.waiting_for) == ("running", sent[0][0])
    run = run_record(name, run_id)
    assert steps(run, (EXPAND, BACKFILL, CONTRACT)) == in_order("running")
    (bf,) = backfills_of(name, run_id)
    assert (bf.id, bf.revision, bf.state, bf.table_name) == (
        sent[0][0],
        BACKFILL,
        "running",
        "public.large_table",
    )
    assert run["steps"][-1]["detail"]["backfills"] == [bf.id]
    assert query(dbname, NULLS) == [(ROWS,)]  # the upgrade itself skipped its inline loop

    # A duplicate delivery while it waits re-sends the slices (fencing the first ones).
    again = execute(settings, run_id, name, send_slice=send)
    assert again.waiting_for == bf.id and len(sent) == 2
    assert sent[1][3] > sent[0][3]

    # The slices run (here, as a worker would), then the delivery they send finishes the run.
    engine = db.engine(settings.target(name))
    _, _, slice_no, generation = sent[1]
    while walk.run_slice(engine, bf.id, generation, slice_no=slice_no) == "continue":
        pass
    done = execute(settings, run_id, name, send_slice=send)
    assert done.state == "succeeded", done.error
    run = run_record(name, run_id)
    assert steps(run, (EXPAND, BACKFILL, CONTRACT)) == [
        *in_order(),
        ("verify", BACKFILL, "succeeded"),
        ("upgrade", CONTRACT, "succeeded"),
        ("verify", CONTRACT, "succeeded"),
    ]
    assert all(s["attempts"] == 1 for s in run["steps"])
    assert query(dbname, NULLS) == [(0,)]
    assert query(dbname, "SELECT count(*) FROM large_table WHERE new_column = 'default_value'") == [
        (ROWS,)
    ]
    assert len(sent) == 2  # nothing was sent once the backfill had succeeded


def test_an_errored_backfill_fails_its_step_and_the_run_rolls_back(
    config: Config, databases: Databases, tmp_path: Path
) -> None:
    name, dbname, _ = reference_target(config, databases, tmp_path, at=BEFORE)
    # Row 1200 refuses the new value: the batch holding it fails with a check violation.
    query(
        dbname,
        "CREATE FUNCTION refuse_1200() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.id = 1200 AND NEW.new_column IS NOT NULL THEN "
        "RAISE check_violation USING MESSAGE = 'row 1200 refuses'; END IF; RETURN NEW; END $$; "
        "CREATE TRIGGER refuse_1200 BEFORE UPDATE ON large_table "
        "FOR EACH ROW EXECUTE FUNCTION refuse_1200()",
    )
    before = schema_dump(dbname)
    run_id = admit(name)

    outcome = execute(load_settings(), run_id, name)  # no sender: the slices run here
    assert outcome.state == "rolled_back", outcome.error
    run = run_record(name, run_id)
    assert steps(run, (EXPAND, BACKFILL)) == [
        *in_order("failed"),
        ("downgrade", BACKFILL, "succeeded"),
        ("downgrade", EXPAND, "succeeded"),
    ]
    (bf,) = backfills_of(name, run_id)
    assert f"backfill {bf.id} of {BACKFILL}" in run["error"] and "errored" in run["error"]
    assert "row 1200 refuses" in run["error"]
    assert bf.state == "cancelled"  # its revision went down: nothing left to resume
    assert schema_dump(dbname) == before  # new_column dropped again
    assert query(dbname, "SELECT version_num FROM alembic_version") == [(BEFORE,)]


# -- declarations, plan ------------------------------------------------------------------------


def test_plan_lists_the_declared_backfill_and_the_contracts_requirement(
    config: Config, databases: Databases, tmp_path: Path
) -> None:
    name, dbname, _ = reference_target(config, databases, tmp_path)
    query(dbname, "ANALYZE large_table")  # the estimate is the planner's
    result = runbook_cli("plan", "--target", name, "--json")
    assert result.returncode == 0, result.stderr
    plan = {r["id"]: r for r in json.loads(result.stdout)["revisions"]}
    assert plan[BACKFILL]["backfills"] == [
        {
            "table": "large_table",
            "set": "new_column = 'default_value'",
            "where": "new_column IS NULL",
            "key": "id",
            "batch_size": 1000,
            "slices": 1,
            "estimated_rows": ROWS,
        }
    ]
    # The SQL is what runbook runs: no inline loop; the backfill's table is still listed.
    assert "DO $$" not in plan[BACKFILL]["sql"] and plan[BACKFILL]["outside_transaction"] is False
    assert [t["name"] for t in plan[BACKFILL]["tables"]] == ["large_table"]
    assert plan[CONTRACT]["requires_backfills"] == [BACKFILL]
    assert all(r["backfills"] == [] for i, r in plan.items() if i != BACKFILL and "sql" in r)
    human = runbook_cli("plan", "--target", name)
    assert f"{BACKFILL}  backfill  large_table SET new_column = 'default_value'" in human.stdout


@pytest.mark.parametrize(
    ("file", "old", "new", "message"),
    [
        (
            BACKFILL_FILE,
            '"set": "new_column = \'default_value\'"',
            '"set": "new_column = pg_sleep(1)::text"',
            f"revision {BACKFILL} declares a bad backfill (backfills[0]): set calls pg_sleep()",
        ),
        (
            CONTRACT_FILE,
            'requires_backfills = ["d2e3f4g5h6i7"]',
            'requires_backfills = ["c1d2e3f4g5h6"]',
            f"revision {CONTRACT} requires the backfills of 'c1d2e3f4g5h6', which declares no backfills",
        ),
    ],
)
def test_a_bad_declaration_is_refused_by_plan_and_apply_before_anything_changes(
    worker: Worker,
    config: Config,
    databases: Databases,
    tmp_path: Path,
    file: str,
    old: str,
    new: str,
    message: str,
) -> None:
    name, dbname, versions = reference_target(config, databases, tmp_path, rows=200)
    source = versions / file
    assert old in source.read_text()
    source.write_text(source.read_text().replace(old, new))
    before = schema_dump(dbname)

    plan = runbook_cli("plan", "--target", name, "--json")
    assert plan.returncode == 2 and message in plan.stderr
    assert len(plan.stderr.strip().splitlines()) == 1

    # Refused when enqueued: one line, exit 2, and no run recorded (the ledger may not even
    # exist yet).
    apply = runbook_cli("apply", "--target", name, "--wait", "--json")
    assert apply.returncode == 2, apply.stdout + apply.stderr
    assert apply.stderr == f"runbook: error: {message}\n" or (
        apply.stderr.startswith("runbook: error: ")
        and message in apply.stderr
        and apply.stderr.count("\n") == 1
    ), apply.stderr
    assert apply.stdout == ""
    ledger = query(dbname, "SELECT to_regclass('runbook.runs')::text")[0][0]
    if ledger is not None:
        assert query(dbname, "SELECT count(*) FROM runbook.runs") == [(0,)]
    assert schema_dump(dbname) == before


# -- through a real worker ---------------------------------------------------------------------


def test_apply_runs_the_declared_backfill_between_expand_and_contract(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    name, dbname, _ = reference_target(config, databases, tmp_path)
    # A declared backfill takes its target's replica bounds (a revision declares none).
    config.targets[name].update(max_replica_lag="7s", max_throttle="45min")
    config.write()
    result = runbook_cli("apply", "--target", name, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "succeeded", run["error"]
    assert steps(run, (EXPAND, BACKFILL, CONTRACT)) == [
        *in_order(),
        ("verify", BACKFILL, "succeeded"),
        ("upgrade", CONTRACT, "succeeded"),
        ("verify", CONTRACT, "succeeded"),
    ]
    (bf,) = backfills_of(name, run["id"])
    assert (bf.run_id, bf.revision, bf.state, bf.rows_done) == (
        run["id"],
        BACKFILL,
        "succeeded",
        ROWS,
    )
    assert (bf.max_replica_lag_ms, bf.max_throttle_ms) == (7000, 45 * 60_000)
    step = next(s for s in run["steps"] if s["kind"] == "backfill")
    assert step["detail"]["backfills"] == [bf.id]
    # The slices ran as their own tasks; the last one sent the run on (a second delivery).
    assert run["deliveries"] >= 2
    assert query(dbname, NULLS) == [(0,)]
    assert query(dbname, "SELECT count(*) FROM large_table WHERE new_column = 'default_value'") == [
        (ROWS,)
    ]


def test_the_slices_run_as_worker_tasks_and_the_last_one_sends_the_run_on(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    from worker.tasks import slice_sender

    name, dbname, _ = reference_target(config, databases, tmp_path, at=BEFORE)
    run_id = admit(name)
    settings = load_settings()
    # The first delivery here; its slices go to the worker by the worker's own sender once it
    # has returned (sent at once, a backfill of 2,500 rows could end before the delivery looks
    # again, and the delivery would carry the run on itself).
    held: list[Any] = []
    first = execute(settings, run_id, name, send_slice=held.append)
    assert first.state == "running" and first.waiting_for is not None and held
    for message in held:
        slice_sender(settings.queue)(message)
    run = api.wait(run_id, name, timeout_s=120)
    assert run["state"] == "succeeded", run["error"]
    assert run["deliveries"] >= 2  # the worker's delivery, sent by the backfill's last slice
    assert steps(run, (EXPAND, BACKFILL, CONTRACT))[3:5] == [
        ("backfill", BACKFILL, "succeeded"),
        ("verify", BACKFILL, "succeeded"),
    ]
    assert query(dbname, NULLS) == [(0,)]


def test_the_contract_refuses_while_rows_still_match_the_backfills_where(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    name, dbname, _ = reference_target(config, databases, tmp_path)
    expand = api.enqueue(name, BACKFILL)
    assert expand and api.wait(expand, name, timeout_s=120)["state"] == "succeeded"
    # The application, not yet writing new_column, inserts rows behind the backfill.
    query(
        dbname, "INSERT INTO large_table (payload) SELECT 'late-' || g FROM generate_series(1, 5) g"
    )
    before = schema_dump(dbname)

    result = runbook_cli("apply", "--target", name, "--wait", "--json")
    assert result.returncode == 1
    run = json.loads(result.stdout)
    assert run["state"] == "rolled_back"
    assert run["error"].startswith(
        f"{CONTRACT} requires the backfill of {BACKFILL} (large_table SET new_column = "
        "'default_value' WHERE new_column IS NULL) to have finished, but rows of large_table "
        "still match new_column IS NULL; run it again (runbook backfill --target "
    )
    assert [(s["kind"], s["revision"], s["state"]) for s in run["steps"]] == [
        ("preflight", None, "succeeded"),
        ("upgrade", CONTRACT, "failed"),
    ]
    assert schema_dump(dbname) == before and query(dbname, NULLS) == [(5,)]
    assert query(dbname, "SELECT version_num FROM alembic_version") == [(BACKFILL,)]

    # Filled, the contract goes through.
    query(dbname, "UPDATE large_table SET new_column = 'default_value' WHERE new_column IS NULL")
    again = runbook_cli("apply", "--target", name, "--wait", "--json")
    assert again.returncode == 0, again.stdout


def test_rehearse_really_runs_the_declared_backfill_on_its_scratch_copy(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    name, dbname, _ = reference_target(config, databases, tmp_path, at=BEFORE)
    before = schema_dump(dbname)
    result = runbook_cli("rehearse", "--target", name, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    detail = next(s for s in run["steps"] if s["kind"] == "rehearse")["detail"]
    assert detail["complete"] is True
    revisions = {r["revision"]: r for r in detail["revisions"]}
    (done,) = revisions[BACKFILL]["backfills"]  # the second upgrade found nothing left to fill
    assert (done["table"], done["state"], done["rows"]) == ("large_table", "succeeded", ROWS)
    assert revisions[CONTRACT]["up_error"] is None  # the contract met filled rows
    assert schema_dump(dbname) == before  # the target was never touched
