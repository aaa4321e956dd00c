"""Alembic environment of the reference application.

Three ways in, one configuration:

* runbook hands over a SQLAlchemy ``Connection`` in ``config.attributes["connection"]``.
  It is used as is: runbook owns it (and its ``lock_timeout``), so nothing here begins or
  commits a transaction on it; Alembic does that per revision (``transaction_per_migration``),
  which is also what lets ``autocommit_block()`` commit and step outside a transaction.
  Hand it over outside a transaction (commit after ``SET lock_timeout``): Alembic treats a
  connection already in a transaction as the caller's, and cannot commit in between.
  An ``Engine`` is accepted too; a connection is then taken from it for the run.
* the plain ``alembic`` CLI online: the URL comes from ``sqlalchemy.url`` or ``DATABASE_URL``.
* ``alembic upgrade --sql`` (offline): SQL is rendered with literal values, no database.
"""

import importlib.util
import os
from logging.config import fileConfig
from pathlib import Path

from alembic import context
from sqlalchemy import Connection, Engine, create_engine, pool

config = context.config
HERE = Path(__file__).resolve().parent


def _load_models():
    # Loaded by path, not as ``migrations.models``: a runbook worker may run several Alembic
    # projects in one process, each with its own ``migrations`` directory.
    spec = importlib.util.spec_from_file_location("_runbook_reference_models", HERE / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


target_metadata = _load_models().metadata

# runbook passes a connection and configures logging itself; fileConfig would reset the
# worker's loggers. The plain CLI gets alembic.ini's logging as usual.
handed_over = config.attributes.get("connection")
if (
    config.config_file_name is not None
    and handed_over is None
    and config.attributes.get("configure_logger", True)
):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str | None:
    """The configured URL with a plain ``postgresql://`` scheme pinned to psycopg2.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which the project does not
    install; users and PaaS consoles (and the runbook's ``psql $DATABASE_URL``) write it bare.
    """
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL")
    if not url:
        return None
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg2://" + url[len(scheme) :]
    return url


def configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # One transaction per revision: a failure rolls back only that revision, the ones
        # before it stay applied and recorded, and autocommit_block() can commit in between.
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        # Rendering SQL needs only a dialect: without a URL assume PostgreSQL, our only target.
        dialect_name="postgresql",
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    if isinstance(handed_over, Connection):
        configure_and_run(handed_over)
        return
    if isinstance(handed_over, Engine):
        with handed_over.connect() as connection:
            configure_and_run(connection)
        return

    url = database_url()
    if not url:
        raise RuntimeError(
            "No database URL: set DATABASE_URL (or sqlalchemy.url), "
            "e.g. DATABASE_URL=postgresql://postgres@127.0.0.1:5432/app"
        )
    # NullPool: a migration run is one short-lived connection, never pooled.
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            configure_and_run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
