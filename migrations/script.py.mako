"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""
## Import sqlalchemy only when the body uses it, so an empty revision stays ruff-clean.
<% uses_sa = "sa." in (upgrades or "") + (downgrades or "") %>
from collections.abc import Sequence

% if uses_sa:
import sqlalchemy as sa
% endif
from alembic import op
${imports if imports else ""}
# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}

# runbook runs this after the upgrade and requires it to return true. Write a check that
# proves this revision's effect, e.g. a column exists or no NULL remains:
# verify = "SELECT ..."

# Uncomment when downgrade() cannot undo upgrade() (runbook then restores the backup):
# irreversible = "why the downgrade is impossible"


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
