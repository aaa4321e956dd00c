"""Rehearsal on a scratch copy, require_rehearsal, and stamp (real Postgres, Redis, worker)."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg2
import pytest

from jobs import api
from jobs.backups.leftovers import database_tag
from tests.integration.conftest import (
    Config,
    Databases,
    Worker,
    db_url,
    project_target,
    query,
    reference_copy,
    runbook_cli,
    schema_dump,
    seeded_reference_db,
)

pytestmark = pytest.mark.integration


def scratch_databases(prefix: str) -> list[str]:
    """The databases on the server whose names start with ``prefix``."""
    rows = query(
        "postgres", f"SELECT datname FROM pg_database WHERE starts_with(datname, '{prefix}')"
    )
    return [str(r[0]) for r in rows]


def test_rehearsal_reports_the_enum_downgrade_and_leaves_the_target_untouched(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    ini = reference_copy(tmp_path)
    root = ini.parent
    dbname = seeded_reference_db(databases, ini, large_rows=1000)
    name = f"t_{dbname}"
    config.add(
        name,
        url=db_url(dbname),
        alembic_ini=str(root / "alembic.ini"),
        backup_dir=str(tmp_path / "b"),
        require_rehearsal=True,
    )
    before = schema_dump(dbname)

    refused = runbook_cli("apply", "--target", name)
    assert refused.returncode == 2 and "requires a rehearsal" in refused.stderr

    result = runbook_cli("rehearse", "--target", name, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "succeeded", run["error"]
    step = next(s for s in run["steps"] if s["kind"] == "rehearse")
    detail = step["detail"]
    assert detail["complete"] is True
    assert list(detail["irreversible"]) == ["x6y7z8a9b0c1"]
    assert "NotImplementedError" in detail["irreversible"]["x6y7z8a9b0c1"]
    revisions = {r["revision"]: r for r in detail["revisions"]}
    assert len(revisions) == 8 and revisions["z8a9b0c1d2e3"]["reversible"] is True
    for rev, entry in revisions.items():  # up, down and up again, each done and timed
        assert entry["up_error"] is None and entry["up_s"] > 0, (rev, entry)
        assert entry["down_s"] > 0, (rev, entry)
        if rev == "x6y7z8a9b0c1":  # its downgrade raises: it stays up, not upgraded again
            assert entry["reversible"] is False and "again_s" not in entry, entry
            continue
        assert entry["down_error"] is None and entry["reversible"] is True, (rev, entry)
        assert entry["again_error"] is None and entry["again_s"] > 0, (rev, entry)
        assert entry["same_after_again"] is True, (rev, entry)
    assert schema_dump(dbname) == before  # the target was never touched
    # The rehearsal's scratch database (and the trial restore's of the backup it took) was
    # named for this database and this run, and is gone; other tests' are not ours to count.
    ours = f"runbook_scratch_{database_tag(dbname)}_"
    assert detail["scratch_database"].startswith(f"{ours}{run['id']}_d"), detail
    assert scratch_databases(ours) == []

    # Now apply may run; an edited revision file invalidates the rehearsal.
    edited = (
        root
        / "migrations"
        / "versions"
        / "b0c1d2e3f4g5_add_threshold_fields_to_notification_preferences.py"
    )
    edited.write_text(edited.read_text() + "\n# edited after the rehearsal\n")
    stale = runbook_cli("apply", "--target", name)
    assert stale.returncode == 2 and "changed since rehearsal" in stale.stderr
    edited.write_text(edited.read_text().replace("\n# edited after the rehearsal\n", ""))
    ok = runbook_cli("apply", "--target", name, "--wait", "--json")
    assert ok.returncode == 0, ok.stderr


def test_stamp_fixes_a_version_table_holding_an_unknown_revision(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    from tests.projects import Rev

    revisions = [Rev("s1", "op.execute('CREATE TABLE s (id int)')", "op.execute('DROP TABLE s')")]
    name, dbname = project_target(
        config,
        databases,
        tmp_path,
        revisions,
        backup=False,
    )
    run_id = api.enqueue(name)
    assert run_id and api.wait(run_id, name, timeout_s=60)["state"] == "succeeded"
    conn = psycopg2.connect(db_url(dbname))
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE alembic_version SET version_num = 'deadbeef0000'")
    conn.close()
    broken = runbook_cli("apply", "--target", name)
    assert (
        broken.returncode == 2 and "'deadbeef0000', which the scripts do not know" in broken.stderr
    )

    result = runbook_cli("stamp", "s1", "--target", name, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["kind"] == "stamp" and run["state"] == "succeeded"
    assert run["steps"][0]["detail"] == {"before": ["deadbeef0000"], "after": ["s1"]}
    again = runbook_cli("apply", "--target", name)
    assert again.returncode == 0 and "nothing to do" in again.stderr
