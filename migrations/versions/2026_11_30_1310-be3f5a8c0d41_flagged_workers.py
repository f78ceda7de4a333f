"""flagged workers: a worker that failed jobs in a row with the same error takes no more

Revision ID: be3f5a8c0d41
Revises: ad1e4f7b9c20
Create Date: 2026-11-30 13:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import svdfarm.models

revision: str = "be3f5a8c0d41"
down_revision: str | None = "ad1e4f7b9c20"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.add_column("workers", sa.Column("flagged_at", svdfarm.models.UTCDateTime(timezone=True)))
    op.add_column("workers", sa.Column("flagged_reason", sa.Text()))


def downgrade() -> None:
    """Revert this revision (plain ALTER TABLE: SQLite 3.35+ drops columns)."""
    for column in ("flagged_reason", "flagged_at"):
        op.execute(f"ALTER TABLE workers DROP COLUMN {column}")
