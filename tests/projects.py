"""Small Alembic projects written on the fly, for tests and benchmarks.

Each revision is given as the body of its upgrade() and downgrade() plus optional extra
module-level lines (``verify = ...``, ``irreversible = ...``).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

ENV_PY = """
from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

config = context.config


def run(connection):
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    run(config.attributes["connection"])
else:
    url = config.get_main_option("sqlalchemy.url")
    url = url.replace("postgresql://", "postgresql+psycopg2://", 1)
    with create_engine(url, poolclass=NullPool).connect() as connection:
        run(connection)
        connection.commit()
"""

REVISION = '''"""{message}"""
from alembic import op
import sqlalchemy as sa

revision = {rev!r}
down_revision = {down!r}
branch_labels = None
depends_on = None
{extra}

def upgrade():
{upgrade}


def downgrade():
{downgrade}
'''


@dataclass
class Rev:
    id: str
    upgrade: str
    downgrade: str = "pass"
    extra: str = ""
    message: str = ""
    down: str | None | object = ...  # default: the previous revision in the list


# An env.py that ignores a handed-over connection and builds its own engine from
# sqlalchemy.url, as many projects' env.py files do.
ENV_PY_OWN_ENGINE = """
from alembic import context
from sqlalchemy import engine_from_config
from sqlalchemy.pool import NullPool

config = context.config
engine = engine_from_config(config.get_section(config.config_ini_section), poolclass=NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
"""


def write_project(root: Path, revisions: list[Rev], url: str = "", env_py: str = ENV_PY) -> Path:
    """Write alembic.ini, env.py and one file per revision under ``root``; the ini's path."""
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (root / "migrations" / "env.py").write_text(env_py)
    ini = root / "alembic.ini"
    ini.write_text(
        "[alembic]\nscript_location = %(here)s/migrations\n"
        f"sqlalchemy.url = {url.replace('%', '%%')}\n"
    )
    previous: str | None = None
    for r in revisions:
        down = previous if r.down is ... else r.down
        body = REVISION.format(
            message=r.message or r.id,
            rev=r.id,
            down=down,
            extra=textwrap.dedent(r.extra),
            upgrade=textwrap.indent(textwrap.dedent(r.upgrade).strip() or "pass", "    "),
            downgrade=textwrap.indent(textwrap.dedent(r.downgrade).strip() or "pass", "    "),
        )
        (versions / f"{r.id}.py").write_text(body)
        previous = r.id
    return ini


def trivial_history(count: int) -> list[Rev]:
    """``count`` revisions that each add and drop-on-downgrade one small table."""
    return [
        Rev(
            id=f"r{i:04d}",
            upgrade=f"op.execute('CREATE TABLE t{i:04d} (id int PRIMARY KEY)')",
            downgrade=f"op.execute('DROP TABLE t{i:04d}')",
        )
        for i in range(1, count + 1)
    ]
