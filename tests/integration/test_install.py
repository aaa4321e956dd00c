"""The project as `pip install .` leaves it (not editable, as the compose image installs it),
used from outside the repository: `runbook --help`, `runbook worker` and a small apply."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import pytest
import redis as redis_lib

from tests.integration.conftest import REDIS_URL, REPO, Databases, db_url, query
from tests.projects import Rev, write_project

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding runbook installed non-editable; its bin/. The dependencies come
    from this test run's environment (a path entry, not an install), so only runbook's own
    packaging is under test and no registry is asked."""
    venv = tmp_path_factory.mktemp("install") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A plain path entry: the editable-install hook in this environment is not run there.
    Path(site, "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # The wheel `pip install .` builds, installed there. Built from a copy: setuptools writes
    # build/ and *.egg-info next to the sources.
    source = venv.parent / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=_not_shipped,
    )
    wheels = venv.parent / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"]
        + ["-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
        cwd=venv.parent,
    )
    (wheel,) = wheels.glob("runbook-*.whl")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        cwd=venv.parent,
    )
    return venv / "bin"


_LEFT_OUT = shutil.ignore_patterns(
    ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache"
)


def _not_shipped(folder: str, names: list[str]) -> set[str]:
    """What the copy leaves out: caches, builds, and the checkout's own backups/ (not the
    jobs/backups package)."""
    left_out = set(_LEFT_OUT(folder, names))
    return left_out | ({"backups"} if Path(folder) == REPO else set())


def test_a_non_editable_install_runs_help_a_worker_and_an_apply_outside_the_repo(
    installed: Path, databases: Databases, tmp_path: Path
) -> None:
    where = subprocess.run(
        [
            str(installed / "python"),
            "-c",
            "import jobs, worker; print(jobs.__file__, worker.__file__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(REPO) not in where and "site-packages" in where, where

    runbook = str(installed / "runbook")
    env = {k: v for k, v in os.environ.items() if k not in {"RUNBOOK_CONFIG", "DATABASE_URL"}}
    helped = subprocess.run(
        [runbook, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "apply" in helped.stdout and "worker" in helped.stdout

    dbname = databases.create()
    ini = write_project(
        tmp_path / "app",
        [
            Rev(
                "i1",
                "op.execute('CREATE TABLE installed (id int)')",
                "op.execute('DROP TABLE installed')",
            )
        ],
    )
    queue = f"install-{uuid.uuid4().hex[:8]}"
    (tmp_path / "runbook.toml").write_text(
        f'[targets.app]\nurl = "{db_url(dbname)}"\nalembic_ini = "{ini}"\n'
        f'backup_dir = "{tmp_path / "backups"}"\n'
    )
    env.update(CELERY_BROKER_URL=REDIS_URL, CELERY_RESULT_BACKEND=REDIS_URL, RUNBOOK_QUEUE=queue)
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [runbook, "worker", "-c", "1"],
        cwd=tmp_path,  # ./runbook.toml, as a user keeps it
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        applied = subprocess.run(
            [runbook, "apply", "--wait", "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert applied.returncode == 0, applied.stderr + (tmp_path / "worker.log").read_text()
        run = json.loads(applied.stdout)
        assert run["state"] == "succeeded" and run["current_revision"] == "i1", run
        assert [s["kind"] for s in run["steps"]][:2] == ["preflight", "backup"], run["steps"]
        assert query(dbname, "SELECT to_regclass('installed')::text") == [("installed",)]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        redis_lib.Redis.from_url(REDIS_URL).delete(queue)
