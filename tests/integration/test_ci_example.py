"""examples/github-actions.yml: its structure, and every `runbook …` line it runs, run as it is
written (target `production`, the URL from DATABASE_URL) against a real database, with a real
worker, giving the exit codes the workflow's gates rely on."""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.integration.conftest import (
    REDIS_URL,
    REPO,
    Config,
    Databases,
    Worker,
    db_url,
    query,
    reference_copy,
    runbook_cli,
)

pytestmark = pytest.mark.integration

EXAMPLE = REPO / "examples" / "github-actions.yml"
PASSWORD = "ci-secret-pw"  # the shared server trusts local logins and ignores it

# A revision the reference history could get in a pull request: a plain CREATE INDEX on a
# live table, which blocks writes while it builds (squawk: an error under runbook).
BLOCKING_INDEX = '''"""index large_table.payload, blocking writes"""
from alembic import op

revision = "f9f9f9f9f9f9"
down_revision = "e3f4g5h6i7j8"


def upgrade():
    op.execute("CREATE INDEX ix_large_table_payload ON large_table (payload)")


def downgrade():
    op.execute("DROP INDEX ix_large_table_payload")
'''


def workflow() -> dict[Any, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert isinstance(doc, dict)
    return doc


def triggers(doc: dict[Any, Any]) -> dict[str, Any]:
    # YAML 1.1 (PyYAML) reads the key `on` as the boolean true.
    found = doc.get("on", doc.get(True))
    assert isinstance(found, dict)
    return found


def runbook_lines(job: dict[str, Any]) -> list[str]:
    """Every `runbook …` command in the job's run: steps, as the shell would be given it."""
    lines = []
    for step in job["steps"]:
        for line in str(step.get("run", "")).splitlines():
            if line.strip().startswith("runbook "):
                lines.append(line.strip())
    return lines


def as_argv(line: str) -> tuple[list[str], str | None]:
    """A workflow line as argv (without `runbook`) and the file its stdout goes to."""
    words = shlex.split(line)
    assert words[0] == "runbook"
    if ">" in words:
        at = words.index(">")
        return words[1:at], words[at + 1]
    return words[1:], None


def test_the_workflow_plans_on_pull_requests_and_applies_on_push_to_main() -> None:
    doc = workflow()
    on = triggers(doc)
    assert set(on) == {"pull_request", "push"} and on["push"]["branches"] == ["main"]
    assert set(doc["jobs"]) == {"plan", "deploy"}
    plan, deploy = doc["jobs"]["plan"], doc["jobs"]["deploy"]
    assert plan["if"] == "github.event_name == 'pull_request'"
    assert "github.event_name == 'push'" in deploy["if"]
    assert "refs/heads/main" in deploy["if"]
    assert plan["permissions"]["pull-requests"] == "write"
    for job in (plan, deploy):
        assert job["steps"][0]["uses"].startswith("actions/checkout@")
        assert job["env"]["DATABASE_URL"] == "${{ secrets.DATABASE_URL }}"
        assert any("pip install runbook" in str(s.get("run", "")) for s in job["steps"])
    assert [as_argv(line) for line in runbook_lines(plan)] == [
        (["plan", "--format", "markdown", "--strict", "--target", "production"], "plan.md")
    ]
    assert [as_argv(line) for line in runbook_lines(deploy)] == [
        (["apply", "--strict", "--wait", "--target", "production"], None)
    ]
    comment = next(s for s in plan["steps"] if "sticky-pull-request-comment" in s.get("uses", ""))
    assert comment["with"]["path"] == "plan.md"
    gate = plan["steps"][-1]
    assert gate["if"] == "steps.plan.outputs.exit_code != '0'" and "exit 1" in gate["run"]
    # Secrets reach runbook through the environment only: no step prints one.
    text = EXAMPLE.read_text()
    assert "echo $DATABASE_URL" not in text and "echo ${{ secrets" not in text


class Deployment:
    """What the workflow's jobs run against: a runbook.toml as the example's comment shows it
    (target production, url_env DATABASE_URL), a database and a worker on a queue of its own."""

    def __init__(self, root: Path, dbname: str, ini: Path) -> None:
        self.dbname = dbname
        self.queue = f"runbook-ci-{uuid.uuid4().hex[:8]}"
        self.env = {
            "RUNBOOK_CONFIG": str(root / "runbook.toml"),
            "DATABASE_URL": db_url(dbname, password=PASSWORD),
            "RUNBOOK_QUEUE": self.queue,
        }
        self.config = Config(root / "runbook.toml")
        self.config.add(
            "production",
            url_env="DATABASE_URL",
            alembic_ini=str(ini),
            backup_dir=str(root / "backups"),
            statement_timeout="15min",
        )
        self.worker = Worker(self.config, root / "worker.log")

    def run(self, line: str) -> tuple[int, str, str]:
        """The workflow's line through the installed CLI; (exit code, stdout, stderr), stdout
        also written where the line redirects it."""
        argv, into = as_argv(line)
        done = runbook_cli(*argv, env=self.env, timeout=300)
        if into:
            (Path(self.env["RUNBOOK_CONFIG"]).parent / into).write_text(done.stdout)
        assert PASSWORD not in done.stdout + done.stderr
        return done.returncode, done.stdout, done.stderr


@pytest.fixture
def deployment(databases: Databases, tmp_path: Path) -> Iterator[Deployment]:
    dbname = databases.create()
    ini = reference_copy(tmp_path, BLOCKING_INDEX)
    where = Deployment(tmp_path, dbname, ini)
    where.worker.start(concurrency=1, **where.env)
    yield where
    where.worker.stop()
    redis.Redis.from_url(REDIS_URL).delete(where.queue)


def test_the_workflows_commands_give_the_exit_codes_its_gates_rely_on(
    deployment: Deployment, tmp_path: Path
) -> None:
    doc = workflow()
    (plan_line,) = runbook_lines(doc["jobs"]["plan"])
    (apply_line,) = runbook_lines(doc["jobs"]["deploy"])
    dbname = deployment.dbname

    # A pull request adding a blocking CREATE INDEX: the comment is still written, with the
    # error in it, and the exit code (1) fails the plan job; apply --strict refuses it (2)
    # before anything changes.
    code, md, err = deployment.run(plan_line)
    assert code == 1, err
    assert (tmp_path / "plan.md").read_text() == md
    assert "| `f9f9f9f9f9f9` | require-concurrent-index-creation | **error** |" in md
    assert (
        err.count("\n") == 1 and "--strict: f9f9f9f9f9f9: require-concurrent-index-creation" in err
    )
    code, _, err = deployment.run(apply_line)
    assert code == 2 and "--strict: f9f9f9f9f9f9" in err
    assert query(dbname, "SELECT to_regclass('public.alembic_version')") == [(None,)]

    # The pull request fixed (the revision dropped): plan passes (0), deploy applies the whole
    # history (0), and a second deploy with nothing pending passes too (0).
    (tmp_path / "app" / "migrations" / "versions" / "extra_revision.py").unlink()
    code, md, err = deployment.run(plan_line)
    assert code == 0, err
    assert "**9 pending revisions**" in md and "require-statement-timeout" not in md
    code, out, err = deployment.run(apply_line)
    assert code == 0, err + out + deployment.worker.log_text()[-3000:]
    assert query(dbname, "SELECT version_num FROM alembic_version") == [("e3f4g5h6i7j8",)]
    code, _, err = deployment.run(apply_line)
    assert code == 0 and "nothing to do" in err

    # An unreachable or misnamed target is exit 2, for plan as for apply.
    broken = dict(deployment.env, DATABASE_URL=db_url("no_such_db_" + dbname, password=PASSWORD))
    gone = runbook_cli(*as_argv(plan_line)[0], env=broken)
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1
    assert PASSWORD not in gone.stderr
