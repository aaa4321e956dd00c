"""Drift: models against the live schema (``alembic check``), and applied revisions edited since.

Each project here has a models.py next to its env.py that hands its MetaData to Alembic as
``target_metadata``, the way the reference application (and most real ones) do.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config

from jobs.config import Target, normalize_url
from jobs.errors import RunbookError
from jobs.insight import drift
from jobs.ledger import runs, schema
from jobs.pg import db
from jobs.project.runtime import Project
from tests.integration.conftest import REPO, Databases, db_url, schema_dump
from tests.integration.test_bad_input import upgrade
from tests.projects import ENV_PY, Rev, write_project

pytestmark = pytest.mark.integration

# ENV_PY of tests/projects.py, plus target_metadata from models.py (loaded by path, under a
# name of its own: several projects share this process) and every schema compared.
ENV_WITH_MODELS = """
import importlib.util
import pathlib

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

config = context.config
models_py = pathlib.Path(__file__).resolve().parent / "models.py"
spec = importlib.util.spec_from_file_location(f"_models_{abs(hash(str(models_py)))}", models_py)
models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(models)
target_metadata = models.metadata


def run(connection):
    context.configure(connection=connection, target_metadata=target_metadata,
                      include_schemas=True, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True,
                      target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    run(config.attributes["connection"])
else:
    url = config.get_main_option("sqlalchemy.url")
    with create_engine(url, poolclass=NullPool).connect() as connection:
        run(connection)
        connection.commit()
"""

MODELS = """
import sqlalchemy as sa

metadata = sa.MetaData()
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.Text, nullable=False),
{extra}
)
"""

REVS = [
    Rev(
        "a1",
        """
        op.create_table('accounts', sa.Column('id', sa.Integer, primary_key=True),
                        sa.Column('email', sa.Text, nullable=False))
        """,
        "op.drop_table('accounts')",
    ),
    Rev("a2", "op.create_index('ix_accounts_email', 'accounts', ['email'])"),
]


def make(
    tmp_path: Path,
    databases: Databases,
    at: str,
    *,
    env_py: str = ENV_WITH_MODELS,
    extra_columns: str = "",
) -> tuple[Target, Path]:
    """A project with models.py, a database at ``at``, and the target for it."""
    dbname = databases.create()
    ini = write_project(tmp_path / "project", REVS, env_py=env_py)
    write_models(ini, extra_columns)
    upgrade(ini, dbname, at)
    target = Target(
        name="t", url=normalize_url(db_url(dbname)), alembic_ini=ini, backup_dir=tmp_path / "b"
    )
    return target, ini


def write_models(ini: Path, extra_columns: str) -> None:
    indexed = '    sa.Index("ix_accounts_email", "email"),\n'
    body = textwrap.indent(textwrap.dedent(extra_columns).strip(), "    ")
    text = MODELS.format(extra=indexed + body)
    (ini.parent / "migrations" / "models.py").write_text(text)


def check(target: Target) -> dict[str, Any]:
    """drift.check, making sure it changed nothing (ledger included)."""
    before = schema_dump(target.url.database or "", with_ledger=True)
    result = drift.check(target, Project(target))
    assert schema_dump(target.url.database or "", with_ledger=True) == before
    return result


def test_a_database_matching_its_models_has_no_drift(tmp_path: Path, databases: Databases) -> None:
    target, _ = make(tmp_path, databases, "head")
    with db.connect(target) as conn:
        schema.ensure(conn)  # another schema the models know nothing of: not drift
    assert check(target) == {"schema": [], "edited": [], "pending": [], "drift": False}


def test_a_model_column_the_database_lacks_is_drift(tmp_path: Path, databases: Databases) -> None:
    target, ini = make(tmp_path, databases, "head")
    write_models(ini, 'sa.Column("plan", sa.Text, nullable=True),')
    result = check(target)
    assert result["schema"] == [
        "table accounts: column 'plan' is in the models but not in the database"
    ]
    assert result["drift"] is True


def test_columns_changed_by_hand_are_drift(tmp_path: Path, databases: Databases) -> None:
    target, _ = make(tmp_path, databases, "head")
    psql(
        target,
        "ALTER TABLE accounts ALTER COLUMN email DROP NOT NULL; "
        "ALTER TABLE accounts ADD COLUMN legacy int; CREATE TABLE scratch (id int)",
    )
    assert sorted(check(target)["schema"]) == [
        "table accounts: column 'email' is nullable in the database but NOT NULL in the models",
        "table accounts: column 'legacy' is in the database but not in the models",
        "table scratch is in the database but not in the models",
    ]


def test_a_database_behind_head_lists_its_pending_revisions(
    tmp_path: Path, databases: Databases
) -> None:
    target, _ = make(tmp_path, databases, "a1")
    result = check(target)
    assert result["pending"] == ["a2"]
    assert result["schema"] == [
        "table accounts: index ix_accounts_email (email) is in the models but not in the database"
    ]


def test_an_env_py_without_target_metadata_is_one_clear_error(
    tmp_path: Path, databases: Databases
) -> None:
    target, _ = make(tmp_path, databases, "head", env_py=ENV_PY)
    with pytest.raises(RunbookError) as info:
        drift.check(target, Project(target))
    assert str(info.value).endswith(
        "the project's env.py gives no target_metadata; drift cannot be checked (pass "
        "target_metadata=<your MetaData> to context.configure)"
    )


def record_applied(target: Target, revisions: list[str]) -> str:
    """A ledger run that applied ``revisions`` with their files' current hashes."""
    project = Project(target)
    with db.connect(target) as conn:
        schema.ensure(conn)
        run_id = runs.admit(
            conn, target="t", kind="apply", from_revision=None, to_revision=None, options={}
        )
        run = runs.get_run(conn, run_id)
        for rev in revisions:
            step = runs.start_step(conn, run, "upgrade", rev)
            runs.finish_step(conn, step, "succeeded", file_sha256=project.revision(rev).sha256)
    return run_id


def test_an_applied_revision_edited_since_is_reported(tmp_path: Path, databases: Databases) -> None:
    target, ini = make(tmp_path, databases, "head")
    run_id = record_applied(target, ["a1", "a2"])
    assert check(target)["edited"] == []
    path = ini.parent / "migrations" / "versions" / "a1.py"
    recorded = Project(target).revision("a1").sha256
    path.write_text(path.read_text() + "\n# edited after it was applied\n")
    result = check(target)
    assert result["edited"] == [
        {
            "revision": "a1",
            "path": str(path),
            "recorded_sha256": recorded,
            "current_sha256": Project(target).revision("a1").sha256,
            "run_id": run_id,
        }
    ]
    assert result["schema"] == [] and result["drift"] is True


def test_an_applied_revision_whose_file_is_gone_is_reported(
    tmp_path: Path, databases: Databases
) -> None:
    target, ini = make(tmp_path, databases, "head")
    run_id = record_applied(target, ["a1", "a2"])
    (ini.parent / "migrations" / "versions" / "a2.py").unlink()
    result = check(target)
    assert [
        (e["revision"], e["path"], e["current_sha256"], e["run_id"]) for e in result["edited"]
    ] == [("a2", None, None, run_id)]


def test_a_revision_no_longer_applied_is_not_edited(tmp_path: Path, databases: Databases) -> None:
    target, ini = make(tmp_path, databases, "head")
    record_applied(target, ["a1", "a2"])
    cfg_url = db_url(target.url.database or "").replace("postgresql://", "postgresql+psycopg2://")
    cfg = Config(str(ini))
    cfg.set_main_option("sqlalchemy.url", cfg_url)
    command.downgrade(cfg, "a1")
    path = ini.parent / "migrations" / "versions" / "a2.py"
    path.write_text(path.read_text() + "\n# reworked before being applied again\n")
    assert check(target)["edited"] == []


def psql(target: Target, statement: str) -> None:
    subprocess.run(
        ["psql", "-v", "ON_ERROR_STOP=1", "-d", db_url(target.url.database or ""), "-c", statement],
        check=True,
        capture_output=True,
    )


def test_the_reference_migrations_add_up_to_its_models(databases: Databases) -> None:
    dbname = databases.create()
    ini = REPO / "alembic.ini"
    upgrade(ini, dbname, "head")
    target = Target(
        name="ref", url=normalize_url(db_url(dbname)), alembic_ini=ini, backup_dir=Path("/tmp")
    )
    result = check(target)
    assert result["schema"] == [] and result["pending"] == []
