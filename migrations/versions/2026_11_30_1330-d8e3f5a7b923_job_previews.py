"""job previews: the key of a running job's latest preview (worker.previews)

Revision ID: d8e3f5a7b923
Revises: c7d2e4f6a812
Create Date: 2026-11-30 13:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d8e3f5a7b923"
down_revision: str | None = "c7d2e4f6a812"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.add_column("jobs", sa.Column("preview_key", sa.String(length=200)))


def downgrade() -> None:
    """Revert this revision (plain ALTER TABLE: SQLite 3.35+ drops columns)."""
    op.execute("ALTER TABLE jobs DROP COLUMN preview_key")
