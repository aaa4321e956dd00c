"""The URL and session settings a project's own env.py engine gets (no database)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from jobs.config import Target, normalize_url
from jobs.errors import ProjectError
from jobs.project import envpy


def target(url: str = "postgresql://app:s3cret@db.internal:6432/prod?sslmode=require") -> Target:
    return Target(
        name="prod",
        url=normalize_url(url),
        alembic_ini=Path("/nowhere/alembic.ini"),
        backup_dir=Path("/nowhere"),
        lock_timeout_ms=1500,
        statement_timeout_ms=60000,
    )


@pytest.mark.parametrize(
    ("ini_url", "driver"),
    [
        ("postgresql+asyncpg://dev:pw@localhost/devdb", "asyncpg"),
        ("postgresql+psycopg_async://dev@localhost/devdb", "psycopg_async"),
        ("postgresql+psycopg://dev@localhost/devdb", "psycopg"),
        ("postgresql://dev@localhost/devdb", "psycopg2"),  # bare: psycopg2, as targets mean
        ("driver://user:pass@localhost/dbname", "psycopg2"),  # the templates' placeholder
        ("postgresql+pg8000://dev@localhost/devdb", "psycopg2"),  # no way to set our settings
        ("sqlite:///dev.db", "psycopg2"),
        ("", "psycopg2"),
        (None, "psycopg2"),
    ],
)
def test_the_project_keeps_its_driver(ini_url: str | None, driver: str) -> None:
    assert envpy.project_driver(ini_url) == driver


def test_the_project_url_is_the_target_with_the_projects_driver() -> None:
    url = envpy.project_url(target(), "asyncpg")
    assert url.drivername == "postgresql+asyncpg"
    assert (url.host, url.port, url.database, url.username, url.password) == (
        "db.internal",
        6432,
        "prod",
        "app",
        "s3cret",
    )
    assert dict(url.query) == {"ssl": "require"}  # asyncpg's name for sslmode
    assert dict(envpy.project_url(target(), "psycopg2").query) == {"sslmode": "require"}


def cparams_for(url: str, **connect_args: Any) -> tuple[Any, dict[str, Any]]:
    """What SQLAlchemy would pass to the driver's connect() for ``url``."""
    engine = create_engine(make_url(url), connect_args=connect_args)
    _, cparams = engine.dialect.create_connect_args(engine.url)
    return engine.dialect, {**cparams, **connect_args}


def test_settings_go_into_libpq_options_and_asyncpg_server_settings() -> None:
    t = target()
    with envpy.rules(t):
        dialect, cparams = cparams_for(
            "postgresql+psycopg2://app@db.internal:6432/prod", options="-c search_path=app"
        )
        envpy.on_connect(dialect, None, [], cparams)
        assert cparams["options"] == (
            "-c search_path=app -c lock_timeout=1500 -c statement_timeout=60000"
        )
        assert cparams["application_name"] == "runbook:prod"
    with envpy.rules(t, read_only=True):
        dialect, cparams = cparams_for("postgresql+asyncpg://app@db.internal:6432/prod")
        envpy.on_connect(dialect, None, [], cparams)
        assert cparams["server_settings"] == {
            "lock_timeout": "1500",
            "statement_timeout": "60000",
            "default_transaction_read_only": "on",
            "application_name": "runbook:prod",
        }


def test_outside_env_py_and_for_runbooks_own_engines_nothing_changes() -> None:
    dialect, cparams = cparams_for("postgresql+psycopg2://app@elsewhere/other")
    before = dict(cparams)
    envpy.on_connect(dialect, None, [], cparams)  # no env.py running
    with envpy.rules(target()):
        own = {**cparams, "application_name": "runbook:prod"}
        envpy.on_connect(dialect, None, [], own)  # jobs/pg/db.py's engine, to anywhere
        assert own == {**before, "application_name": "runbook:prod"}
    assert cparams == before


@pytest.mark.parametrize(
    ("url", "same"),
    [
        ("postgresql+asyncpg://app@db.internal:6432/prod", True),
        ("postgresql+asyncpg://other_role@DB.internal:6432/prod", True),  # another role: same db
        ("postgresql+asyncpg://app@db.internal:6432/staging", False),
        ("postgresql+asyncpg://app@db.internal/prod", False),  # 5432, not 6432
        ("postgresql+asyncpg://app@replica.internal:6432/prod", False),
    ],
)
def test_a_connection_elsewhere_is_refused_before_it_is_made(url: str, same: bool) -> None:
    with envpy.rules(target()) as refused:
        dialect, cparams = cparams_for(url)
        if same:
            envpy.on_connect(dialect, None, [], cparams)
            assert refused == []
        else:
            with pytest.raises(ProjectError, match="not to the target's db.internal:6432/prod"):
                envpy.on_connect(dialect, None, [], cparams)
            assert len(refused) == 1 and "s3cret" not in refused[0]


def test_loopback_names_are_one_host() -> None:
    local = target("postgresql://postgres@127.0.0.1:5432/app")
    with envpy.rules(local) as refused:
        dialect, cparams = cparams_for("postgresql+psycopg2://postgres@localhost/app")
        envpy.on_connect(dialect, None, [], cparams)
        assert refused == []


def test_a_driver_runbook_cannot_set_settings_on_is_refused() -> None:
    from sqlalchemy.dialects.postgresql.pg8000 import PGDialect_pg8000

    with envpy.rules(target()) as refused:
        cparams = {"host": "db.internal", "port": 6432, "database": "prod", "user": "app"}
        with pytest.raises(ProjectError, match="driver 'pg8000', on which runbook cannot set"):
            envpy.on_connect(PGDialect_pg8000(), None, [], cparams)
        assert len(refused) == 1
