"""per-job casts and dtypes overrides

Revision ID: 227bec40737f
Revises: d45c372cfb79
Create Date: 2026-11-26 13:53:01.625580
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "227bec40737f"
down_revision: str | None = "d45c372cfb79"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("casts", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("dtypes", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("dtypes")
        batch_op.drop_column("casts")
