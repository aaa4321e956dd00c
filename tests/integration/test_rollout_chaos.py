"""Rollouts under faults and odd groups, through the installed `runbook` command and
`runbook worker` processes: a worker SIGKILLed mid-rollout with Redis restarted empty (the
rollout finishes by itself, every member run exactly once), a catalog group whose rows are
its members, a group with one broken member URL (that member fails with one line, the
others go on within the failure budget, and its password is nowhere), and a member whose
PostgreSQL restarts under its run."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from tests.integration.chaos_support import ChaosPostgres, PrivateRedis, free_port, wait_for
from tests.integration.conftest import (
    SESSION,
    Config,
    Databases,
    Worker,
    db_url,
    query,
    runbook_cli,
)
from tests.integration.fleet_support import (
    FLEET_HISTORY,
    Fleet,
    add_catalog_row,
    make_catalog_fleet,
    make_fleet,
)
from tests.projects import Rev

pytestmark = pytest.mark.integration

LEASE_S = 5  # RUNBOOK_LEASE_S of the chaos test's workers
DEADLINE_S = 150  # for the rollout to settle after the faults (a busy 2-core machine)
SETTLED = ("succeeded", "failed", "halted", "cancelled", "paused", "rolled_back")
# f1 holds its transaction a while, so that a rollout of a dozen members is mid-way long
# enough for the faults to land in it.
SLOW_HISTORY = [
    Rev(
        "f1",
        "op.execute('ALTER TABLE items ADD COLUMN note text')\nop.execute('SELECT pg_sleep(1)')",
        "op.execute('ALTER TABLE items DROP COLUMN note')",
    ),
    *FLEET_HISTORY[1:],
]


def control_rows(control: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(db_url(control))
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def tagged_runs(dbname: str, rollout_id: str) -> list[tuple[Any, ...]]:
    """The member's apply runs tagged with the rollout: (id, state)."""
    return query(
        dbname,
        "SELECT id, state FROM runbook.runs WHERE kind = 'apply' "
        f"AND options->>'rollout' = '{rollout_id}' ORDER BY created_at",
    )


def check_exactly_once(fleet: Fleet, found: dict[str, Any]) -> None:
    """Each member: one apply run tagged with the rollout, succeeded, the member row's run,
    and the member at head."""
    members = {m["target"]: m for m in found["members"]}
    for name, dbname in fleet.members.items():
        runs = tagged_runs(dbname, found["id"])
        assert runs == [(members[name]["run_id"], "succeeded")], (name, runs, members[name])
        assert fleet.revision(name) == "f3", name


# -- a worker SIGKILLed mid-rollout, Redis restarted empty -----------------------------------


@dataclass
class ChaosFleet:
    """A fleet of its own: a private Redis, runbook.toml, control database and workers with
    a short lease and the reconciler on, which the test may kill."""

    tmp: Path
    redis: PrivateRedis
    config: Config
    control: str
    queue: str = field(default_factory=lambda: f"runbook-rollout-chaos-{uuid.uuid4().hex[:6]}")
    workers: list[Worker] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            "RUNBOOK_CONFIG": str(self.config.path),
            "CELERY_BROKER_URL": self.redis.url,
            "CELERY_RESULT_BACKEND": self.redis.url,
            "RUNBOOK_QUEUE": self.queue,
        }

    def start_workers(self, count: int, concurrency: int = 2) -> list[Worker]:
        made = [
            Worker(self.config, self.tmp / f"worker-{len(self.workers) + i + 1}.log")
            for i in range(count)
        ]
        self.workers += made
        knobs = {"RUNBOOK_LEASE_S": str(LEASE_S), "RUNBOOK_RECONCILE_S": "1"}
        with ThreadPoolExecutor(count) as pool:
            for f in [pool.submit(w.start, concurrency, **self.env, **knobs) for w in made]:
                f.result()
        return made

    def kill(self, worker: Worker) -> None:
        """SIGKILL to the whole process group: supervisor, Celery and its pool."""
        assert worker.proc is not None and worker.proc.poll() is None
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(10)
        worker.proc = None

    def cli(self, *args: str) -> Any:
        return runbook_cli(*args, env=self.env, timeout=120)

    def counts(self, rollout_id: str) -> dict[str, int]:
        rows = control_rows(
            self.control,
            "SELECT state, count(*) FROM runbook_control.members WHERE rollout_id = %s "
            "GROUP BY state",
            rollout_id,
        )
        return {str(s): int(n) for s, n in rows}

    def settled(self, rollout_id: str) -> str | None:
        """The rollout's state once it settled, else None."""
        rows = control_rows(
            self.control,
            "SELECT state FROM runbook_control.rollouts WHERE id = %s AND settled_at IS NOT NULL",
            rollout_id,
        )
        return str(rows[0][0]) if rows else None

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.log_text()[-3000:]}" for w in self.workers)

    def close(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                os.killpg(w.proc.pid, signal.SIGKILL)
                w.proc.wait(10)
        self.redis.stop()


@pytest.fixture
def chaos(databases: Databases, tmp_path: Path) -> Iterator[ChaosFleet]:
    # A control database of its own: this fleet's reconciler must not pass other tests'
    # rollouts (whose groups its runbook.toml does not have).
    control = databases.create()
    config = Config(tmp_path / "runbook.toml")
    config.control = {"url": db_url(control)}
    made = ChaosFleet(tmp_path, PrivateRedis(tmp_path), config, control)
    try:
        yield made
    finally:
        made.close()


def test_worker_killed_and_redis_lost_mid_rollout_every_member_once(
    chaos: ChaosFleet, databases: Databases, tmp_path: Path
) -> None:
    fleet = make_fleet(chaos.config, databases, tmp_path, 12, revisions=SLOW_HISTORY)
    chaos.start_workers(2)
    started = chaos.cli("rollout", "--group", fleet.group, "--parallel", "4")
    assert started.returncode == 0, started.stderr
    rollout_id = started.stdout.strip()

    def mid_way() -> tuple[dict[str, int], Worker, str, str] | None:
        """Members done and still to start, and a worker whose pool holds a member's run:
        (counts, that worker, the member, the holder's host:pid)."""
        now = chaos.counts(rollout_id)
        assert now.get("succeeded", 0) < 12, f"the rollout ended before the faults: {now}"
        if now.get("succeeded", 0) < 2 or not now.get("pending"):
            return None
        for name, holder in holders(fleet, rollout_id).items():
            for w in chaos.workers:
                # Looking over a dozen members takes a while on a busy machine: the run must
                # be early in f1's one-second transaction now, or the kill could land after
                # the run ended (f2 and f3 take a few tens of milliseconds: a fresh-clone CI
                # run killed a pool whose run had just finished, delivered once).
                carries = w.proc is not None and holder.rsplit(":", 1)[1] in w.pool_pids()
                if carries and early_in_f1(fleet.db(name), rollout_id):
                    return now, w, name, holder
        return None

    at_kill, victim, interrupted, holder = wait_for("the rollout mid-way", mid_way, 90, chaos.logs)
    chaos.kill(victim)
    chaos.redis.kill()  # everything queued and unacknowledged is gone
    chaos.redis.start()  # empty
    chaos.start_workers(1)  # the killed worker's host comes back, as a user's would

    state = wait_for(
        "the rollout to settle", lambda: chaos.settled(rollout_id), DEADLINE_S, chaos.logs
    )
    shown = chaos.cli("status", rollout_id, "--json")
    assert shown.returncode == 0, shown.stderr
    found = json.loads(shown.stdout)
    assert (state, found["state"]) == ("succeeded", "succeeded"), (found, chaos.logs())
    assert found["counts"] == {"succeeded": 12}, found
    check_exactly_once(fleet, found)
    # The run the killed pool held was delivered again (the one run, not a second one).
    [(deliveries,)] = query(
        fleet.db(interrupted),
        f"SELECT deliveries FROM runbook.runs WHERE options->>'rollout' = '{rollout_id}'",
    )
    assert deliveries >= 2, (interrupted, holder, at_kill, deliveries)


def in_f1(rollout_id: str) -> str:
    """FROM and WHERE of a member's rollout run in f1's upgrade (its slow transaction)."""
    return (
        "FROM runbook.runs r JOIN runbook.steps s ON s.run_id = r.id "
        f"WHERE r.options->>'rollout' = '{rollout_id}' AND r.finished_at IS NULL "
        "AND s.kind = 'upgrade' AND s.revision = 'f1' AND s.state = 'running'"
    )


def early_in_f1(dbname: str, rollout_id: str, within_s: float = 0.7) -> bool:
    """Whether the member's rollout run is in f1's upgrade, begun less than ``within_s`` ago
    (the rest of its one-second sleep is time for the kill to land in it)."""
    begun = f"clock_timestamp() - s.started_at < interval '{within_s} seconds'"
    return bool(query(dbname, f"SELECT 1 {in_f1(rollout_id)} AND {begun}"))


def holders(fleet: Fleet, rollout_id: str) -> dict[str, str]:
    """The members whose rollout run is in f1's upgrade (its slow transaction, so a kill
    now lands in it): member -> heartbeat_by (host:pid of the pool process carrying it)."""
    found = {}
    for name, dbname in fleet.members.items():
        if query(dbname, "SELECT to_regclass('runbook.runs')") == [(None,)]:
            continue  # not started yet
        rows = query(
            dbname, f"SELECT r.heartbeat_by {in_f1(rollout_id)} AND r.heartbeat_by IS NOT NULL"
        )
        if rows:
            found[name] = str(rows[0][0])
    return found


# -- a catalog group ---------------------------------------------------------------------------


pytest_control = pytest.mark.usefixtures("control_db")


@pytest_control
def test_a_catalog_group_lists_its_active_rows_and_rolls_them_out(
    config: Config, databases: Databases, worker: Worker, tmp_path: Path
) -> None:
    fleet = make_catalog_fleet(config, databases, tmp_path, 4, inactive=1)
    names = sorted(fleet.members)

    mix = runbook_cli("targets", "--group", fleet.group, "--json")
    assert mix.returncode == 0, mix.stderr
    listed = json.loads(mix.stdout)
    assert [m["name"] for m in listed["members"]] == names  # the inactive row is not one
    assert all(m["ok"] and m["current_revision"] is None for m in listed["members"]), listed
    assert listed["revisions"] == {"base": 4}

    out = runbook_cli("rollout", "--group", fleet.group, "--wait", "--json", timeout=300)
    assert out.returncode == 0, out.stderr + out.stdout + worker.log_text()[-3000:]
    found = json.loads(out.stdout)
    assert found["state"] == "succeeded" and found["counts"] == {"succeeded": 4}, found
    assert [m["target"] for m in found["members"]] == names
    check_exactly_once(fleet, found)
    [inactive_db] = fleet.inactive.values()
    assert query(inactive_db, "SELECT to_regclass('alembic_version')") == [(None,)]

    after = json.loads(runbook_cli("targets", "--group", fleet.group, "--json").stdout)
    assert after["revisions"] == {"f3": 4}
    # A member's run, though its target is in no [targets] table: found by the control index.
    member = found["members"][1]
    shown = runbook_cli("status", member["run_id"], "--json")
    assert shown.returncode == 0, shown.stderr
    run = json.loads(shown.stdout)
    assert (run["target"], run["state"]) == (member["target"], "succeeded")


# -- a broken member URL -------------------------------------------------------------------------


SECRET = f"s3cret-{SESSION}"


def broken_fleet(config: Config, databases: Databases, tmp_path: Path, name: str) -> Fleet:
    """Four good members and ``<group>_<name>``, whose URL (with a password) names a
    database that does not exist."""
    fleet = make_fleet(config, databases, tmp_path, 4)
    config.add(
        f"{fleet.group}_{name}",
        url=db_url(f"rb_{SESSION}_missing_{uuid.uuid4().hex[:6]}", password=SECRET),
        alembic_ini=str(fleet.ini),
        backup=False,
        backup_dir=str(tmp_path / "backups"),
    )
    return fleet


def check_no_secret(rollout_id: str, control: str, worker: Worker, *outputs: Any) -> None:
    """The password is in no CLI output, control database row or worker log line."""
    for done in outputs:
        assert SECRET not in done.stdout + done.stderr
    rows = control_rows(
        control,
        "SELECT coalesce(error, '') FROM runbook_control.rollouts WHERE id = %s UNION ALL "
        "SELECT coalesce(error, '') FROM runbook_control.members WHERE rollout_id = %s",
        rollout_id,
        rollout_id,
    )
    assert rows and not [r for r in rows if SECRET in r[0]], rows
    assert SECRET not in worker.log_text()


def broken_member(found: dict[str, Any], name: str) -> dict[str, Any]:
    """The broken member's row: failed, with one line naming it and what is wrong."""
    [member] = [m for m in found["members"] if m["target"] == name]
    assert member["state"] == "failed", member
    error = member["error"]
    assert error and "\n" not in error and "Traceback" not in error, error
    assert name in error and "does not exist" in error, error
    return member


def waited_rollout(group: str, *options: str) -> tuple[Any, dict[str, Any]]:
    """`rollout --group G ... --wait --json` that did not succeed (exit 1): (the finished
    process, the rollout's status)."""
    out = runbook_cli("rollout", "--group", group, *options, "--wait", "--json", timeout=300)
    assert out.returncode == 1, out.stderr + out.stdout
    return out, json.loads(out.stdout)


@pytest_control
def test_a_broken_member_fails_alone_within_the_budget(
    config: Config, databases: Databases, worker: Worker, control_db: str, tmp_path: Path
) -> None:
    fleet = broken_fleet(config, databases, tmp_path, "99")
    bad = f"{fleet.group}_99"
    out, found = waited_rollout(fleet.group, "--max-failures", "1")
    # Some members failed within the budget: the rollout ends failed, not halted.
    assert found["state"] == "failed", found
    assert found["counts"] == {"succeeded": 4, "failed": 1}, found
    broken_member(found, bad)
    assert bad in (found["error"] or ""), found["error"]
    check_exactly_once(fleet, found)
    shown = runbook_cli("status", found["id"])
    listed = runbook_cli("rollouts", "--group", fleet.group)
    check_no_secret(found["id"], control_db, worker, out, shown, listed)


@pytest_control
def test_a_broken_member_halts_the_rollout_with_no_failures_allowed(
    config: Config, databases: Databases, worker: Worker, control_db: str, tmp_path: Path
) -> None:
    # Second in order (after the canary _01): the others have not started when it fails.
    fleet = broken_fleet(config, databases, tmp_path, "01b")
    bad = f"{fleet.group}_01b"
    out, found = waited_rollout(fleet.group, "--parallel", "1")
    assert found["state"] == "halted", found
    assert found["counts"] == {"succeeded": 1, "failed": 1, "pending": 3}, found
    assert bad in (found["error"] or "") and "max-failures 0" in found["error"], found["error"]
    broken_member(found, bad)
    assert fleet.revision(f"{fleet.group}_01") == "f3"
    for name in sorted(fleet.members)[1:]:  # never started: untouched
        untouched = "SELECT to_regclass('alembic_version'), to_regclass('runbook.runs')"
        assert query(fleet.db(name), untouched) == [(None, None)], name
    shown = runbook_cli("status", found["id"], "--json")
    check_no_secret(found["id"], control_db, worker, out, shown)


@pytest_control
def test_a_catalog_row_with_a_bad_url_fails_that_member_alone(
    config: Config, databases: Databases, worker: Worker, control_db: str, tmp_path: Path
) -> None:
    fleet = make_catalog_fleet(config, databases, tmp_path, 2, inactive=0)
    # Not a PostgreSQL URL at all; and one whose role and database do not exist.
    malformed, missing = f"{fleet.group}_x1", f"{fleet.group}_x2"
    add_catalog_row(fleet, malformed, f"mysql://nobody:{SECRET}@127.0.0.1/db")
    add_catalog_row(
        fleet, missing, f"postgresql://nobody:{SECRET}@127.0.0.1:5432/rb_{SESSION}_missing"
    )
    mix = runbook_cli("targets", "--group", fleet.group, "--json")
    assert mix.returncode == 1, mix.stderr  # as `targets` does when a target is unusable
    assert json.loads(mix.stdout)["revisions"] == {"base": 2, "unknown": 2}

    out, found = waited_rollout(fleet.group, "--max-failures", "2")
    assert found["state"] == "failed", found
    assert found["counts"] == {"succeeded": 2, "failed": 2}, found
    [bad_url] = [m for m in found["members"] if m["target"] == malformed]
    assert bad_url["state"] == "failed" and "not a PostgreSQL URL" in bad_url["error"], bad_url
    assert malformed in bad_url["error"] and "\n" not in bad_url["error"]
    [no_role] = [m for m in found["members"] if m["target"] == missing]
    assert no_role["state"] == "failed" and "nobody" in no_role["error"], no_role
    assert missing in no_role["error"] and "\n" not in no_role["error"]
    check_exactly_once(fleet, found)
    shown = runbook_cli("status", found["id"])
    check_no_secret(found["id"], control_db, worker, mix, out, shown)


def test_a_members_postgres_restarted_mid_run_and_the_rollout_goes_on(
    chaos: ChaosFleet, databases: Databases, tmp_path: Path
) -> None:
    """One member lives on a PostgreSQL of the test's own, restarted (every session ended,
    its run's transaction aborted) while its run's upgrade is in flight: the run does the
    revision again, the passes that could not read that member meanwhile read it later, and
    the rollout finishes by itself."""
    pg = ChaosPostgres(free_port())
    try:
        url, app = pg.app_database()
        member = psycopg2.connect(url)
        with member, member.cursor() as cur:
            cur.execute(
                "CREATE TABLE items (id int PRIMARY KEY, sku text NOT NULL); "
                "INSERT INTO items SELECT g, 'sku-' || g FROM generate_series(1, 200) g"
            )
        member.close()
        fleet = make_fleet(chaos.config, databases, tmp_path, 3, revisions=SLOW_HISTORY)
        own = f"{fleet.group}_99"  # last in order: it starts once the canary is through
        chaos.config.add(
            own,
            url=url,
            alembic_ini=str(fleet.ini),
            backup=False,
            backup_dir=str(tmp_path / "backups"),
        )
        chaos.start_workers(2)
        out = chaos.cli("rollout", "--group", fleet.group, "--parallel", "4", "--json")
        assert out.returncode == 0, out.stderr
        rollout_id = json.loads(out.stdout)["id"]

        def in_its_upgrade() -> bool:
            with pg.connect(app) as conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = 'app' "
                    "AND query LIKE '%pg_sleep(1)%' AND pid <> pg_backend_pid()"
                )
                return cur.fetchone() is not None

        wait_for("the member's f1 in flight", in_its_upgrade, 90, chaos.logs)
        pg.restart()

        def settled() -> dict[str, Any] | None:
            shown = chaos.cli("status", rollout_id, "--json")
            found = json.loads(shown.stdout) if shown.stdout.strip() else {}
            return found if found.get("settled_at") else None

        found = wait_for("the rollout settled", settled, DEADLINE_S, chaos.logs)
        assert found["state"] == "succeeded", (found, chaos.logs())
        assert found["counts"] == {"succeeded": 4}
        with pg.connect(app) as conn, conn.cursor() as cur:
            cur.execute("SELECT version_num FROM alembic_version")
            assert cur.fetchall() == [("f3",)]
            cur.execute(
                "SELECT count(*), min(state) FROM runbook.runs WHERE options->>'rollout' = %s",
                (rollout_id,),
            )
            assert cur.fetchone() == (1, "succeeded")  # one run, which did f1 again:
            cur.execute(
                "SELECT s.attempts FROM runbook.steps s JOIN runbook.runs r ON r.id = s.run_id "
                "WHERE r.options->>'rollout' = %s AND s.kind = 'upgrade' AND s.revision = 'f1'",
                (rollout_id,),
            )
            assert cur.fetchone()[0] >= 2  # the restart did land in it
        assert url.split(":")[2].split("@")[0] not in json.dumps(found)  # its password
    finally:
        pg.stop()


# -- a revision that declares a backfill ------------------------------------------------------

BACKFILL_ROWS = 3000
# k1 declares a backfill of every row, 2 ms a row (about 6 s a member: longer than the
# workers' 5 s lease, so that a member run waiting for its backfill outlives its lease).
BACKFILLED_HISTORY = [
    Rev(
        "k1",
        "op.execute('ALTER TABLE items ADD COLUMN n int NOT NULL DEFAULT 0')\n"
        'op.execute("CREATE FUNCTION slow_one() RETURNS int LANGUAGE sql '
        "AS 'SELECT 1 FROM pg_sleep(0.002)'\")",
        "op.execute('DROP FUNCTION slow_one()')\nop.execute('ALTER TABLE items DROP COLUMN n')",
        extra="backfills = [{'table': 'items', 'set': 'n = n + slow_one()', 'key': 'id', "
        "'batch_size': 50}]",
    ),
    Rev(
        "k2", "op.execute('CREATE INDEX items_n ON items (n)')", "op.execute('DROP INDEX items_n')"
    ),
]


def backfilled(dbname: str) -> tuple[Any, ...]:
    """(rows, rows whose n is not 1, backfills) of a member."""
    [(rows, wrong)] = query(dbname, "SELECT count(*), count(*) FILTER (WHERE n <> 1) FROM items")
    [(backfills,)] = query(dbname, "SELECT count(*) FROM runbook.backfills")
    return rows, wrong, backfills


def test_a_rollout_whose_revision_declares_a_backfill_walks_it_once_per_member(
    chaos: ChaosFleet, databases: Databases, tmp_path: Path
) -> None:
    fleet = make_fleet(
        chaos.config, databases, tmp_path, 2, revisions=BACKFILLED_HISTORY, rows=BACKFILL_ROWS
    )
    # Four slots for two walking slices, the passes and the runs sent on: a task that waited
    # past the 5 s lease for a slot on a loaded machine would be taken for lost, rightly.
    chaos.start_workers(1, concurrency=4)
    out = chaos.cli(
        "rollout", "--group", fleet.group, "--canary", "0", "--parallel", "2", "--wait", "--json"
    )
    assert out.returncode == 0, out.stderr + out.stdout + chaos.logs()
    found = json.loads(out.stdout)
    assert found["counts"] == {"succeeded": 2}, found
    for name, dbname in fleet.members.items():
        assert fleet.revision(name) == "k2", name
        assert backfilled(dbname) == (BACKFILL_ROWS, 0, 1), name
    # A member run waiting for its backfill past its lease was taken for dead and sent again,
    # which took the walking slice over (a warning and a fenced task every lease).
    logs = "\n".join(w.log_text() for w in chaos.workers)
    assert "no live lease" not in logs and "fenced" not in logs, chaos.logs()


def test_a_catalog_members_backfill_lost_with_redis_finishes_by_itself(
    chaos: ChaosFleet, databases: Databases, tmp_path: Path
) -> None:
    # A catalog's members are in no [targets]: the reconciler finds their lost slices through
    # the rollout's members in flight, in the control database.
    fleet = make_catalog_fleet(
        chaos.config,
        databases,
        tmp_path,
        2,
        inactive=0,
        rows=BACKFILL_ROWS,
        revisions=BACKFILLED_HISTORY,
    )
    chaos.start_workers(1)
    started = chaos.cli("rollout", "--group", fleet.group, "--canary", "0", "--parallel", "2")
    assert started.returncode == 0, started.stderr
    rollout_id = started.stdout.strip()
    first = f"{fleet.group}_01"

    def walking() -> int | None:
        if query(fleet.db(first), "SELECT to_regclass('runbook.backfills')") == [(None,)]:
            return None
        rows = query(
            fleet.db(first),
            "SELECT s.rows_done FROM runbook.backfills b JOIN runbook.backfill_slices s "
            "ON s.backfill_id = b.id WHERE b.state = 'running' AND s.rows_done > 300",
        )
        return int(rows[0][0]) if rows else None

    wait_for("the first member's backfill walking", walking, 60, chaos.logs)
    chaos.kill(chaos.workers[0])
    chaos.redis.kill()  # the slice's message (and its continuation) gone with it
    chaos.redis.start()
    chaos.start_workers(1)

    state = wait_for(
        "the rollout to settle", lambda: chaos.settled(rollout_id), DEADLINE_S, chaos.logs
    )
    assert state == "succeeded", chaos.logs()
    for name, dbname in fleet.members.items():
        assert fleet.revision(name) == "k2", name
        assert backfilled(dbname) == (BACKFILL_ROWS, 0, 1), name
    logs = chaos.workers[-1].log_text()
    assert f"on {first} has no live lease: sending it again" in logs, chaos.logs()
    # Its backfill is found by its id alone, as a [targets] member's is (runbook.toml names
    # no catalog member: the control database's index does).
    [(backfill_id,)] = query(fleet.db(first), "SELECT id FROM runbook.backfills")
    shown = chaos.cli("status", backfill_id, "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert json.loads(shown.stdout)["target"] == first
