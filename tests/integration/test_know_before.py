"""plan, apply --strict, check and doctor through the real CLI on the reference history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import (
    Config,
    Databases,
    Worker,
    db_url,
    reference_copy,
    runbook_cli,
    seeded_reference_db,
)

pytestmark = pytest.mark.integration


def reference_target(
    config: Config, databases: Databases, tmp_path: Path, **options: object
) -> tuple[str, str, Path]:
    ini = reference_copy(tmp_path)
    dbname = seeded_reference_db(databases, ini, large_rows=500)
    name = f"t_{dbname}"
    config.add(
        name, url=db_url(dbname), alembic_ini=str(ini), backup_dir=str(tmp_path / "b"), **options
    )
    return name, dbname, ini.parent


def test_plan_matches_what_apply_then_does_and_check_and_doctor_agree(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    name, dbname, root = reference_target(config, databases, tmp_path)
    planned = runbook_cli("plan", "--target", name, "--json")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    pending = [r["id"] for r in plan["revisions"] if r["status"] == "pending"]
    assert plan["current"] == "w5x6y7z8a9b0" and len(pending) == 8
    enum = next(r for r in plan["revisions"] if r["id"] == "x6y7z8a9b0c1")
    assert enum["outside_transaction"] and enum["irreversible"]
    assert "ban-add-enum-value" in {f["rule"] for f in enum["lint"]}
    human = runbook_cli("plan", "--target", name)
    assert human.returncode == 0 and "x6y7z8a9b0c1" in human.stdout
    assert "no rehearsal of these revisions yet" in human.stdout

    behind = runbook_cli("doctor", "--target", name, "--json")
    assert behind.returncode == 1
    assert [f["code"] for f in json.loads(behind.stdout)] == ["behind"]

    applied = runbook_cli("apply", "--target", name, "--strict", "--wait", "--json")
    assert applied.returncode == 0, applied.stderr
    run = json.loads(applied.stdout)
    assert [s["revision"] for s in run["steps"] if s["kind"] == "upgrade"] == pending

    healthy = runbook_cli("doctor", "--target", name)
    assert healthy.returncode == 0 and "no problems found" in healthy.stdout
    clean = runbook_cli("check", "--target", name)
    assert clean.returncode == 0 and "no drift" in clean.stdout

    # A revision edited after it ran is drift.
    edited = root / "migrations" / "versions" / "z8a9b0c1d2e3_add_push_subscriptions_table.py"
    edited.write_text(edited.read_text() + "\n# changed after it ran\n")
    drift = runbook_cli("check", "--target", name, "--json")
    assert drift.returncode == 1
    assert [e["revision"] for e in json.loads(drift.stdout)["edited"]] == ["z8a9b0c1d2e3"]


def test_strict_apply_refuses_lint_errors_unless_allowed(
    worker: Worker, config: Config, databases: Databases, tmp_path: Path
) -> None:
    from tests.projects import Rev, write_project

    revisions = [
        Rev(
            "n1",
            "op.execute('CREATE TABLE people (id int PRIMARY KEY, email text)')",
            "op.execute('DROP TABLE people')",
        ),
        Rev(
            "n2",
            "op.execute('CREATE INDEX people_email ON people (email)')",
            "op.execute('DROP INDEX people_email')",
        ),
    ]
    dbname = databases.create()
    name = f"t_{dbname}"
    ini = write_project(tmp_path / "p", revisions)
    config.add(name, url=db_url(dbname), alembic_ini=str(ini), backup=False)
    first = runbook_cli("apply", "--target", name, "--to", "n1", "--wait")
    assert first.returncode == 0, first.stderr
    refused = runbook_cli("apply", "--target", name, "--strict")
    assert refused.returncode == 2
    assert "--strict: n2: require-concurrent-index-creation" in refused.stderr
    assert refused.stderr.count("\n") == 1
    config.add(
        name,
        url=db_url(dbname),
        alembic_ini=str(ini),
        backup=False,
        lint_allow=["require-concurrent-index-creation"],
    )
    allowed = runbook_cli("apply", "--target", name, "--strict", "--wait")
    assert allowed.returncode == 0, allowed.stderr
