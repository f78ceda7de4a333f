"""job queue and memory estimate

Revision ID: 3941c9df2541
Revises: 227bec40737f
Create Date: 2026-11-26 14:05:15.577941
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3941c9df2541"
down_revision: str | None = "227bec40737f"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision; jobs queued before it keep an empty queue name."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("queue", sa.String(length=100), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("memory_estimate_bytes", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.create_index(batch_op.f("ix_jobs_queue"), ["queue"], unique=False)


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_queue"))
        batch_op.drop_column("memory_estimate_bytes")
        batch_op.drop_column("queue")
