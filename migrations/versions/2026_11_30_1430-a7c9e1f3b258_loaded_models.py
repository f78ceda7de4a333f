"""loaded models: the model each worker holds loaded, and the worker a job was sent to on
its own queue (the dispatcher sends a model's jobs to a worker that has it loaded)

Revision ID: a7c9e1f3b258
Revises: e9f4a6b8c034
Create Date: 2026-11-30 14:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a7c9e1f3b258"
down_revision: str | None = "e9f4a6b8c034"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The rows of ix_jobs_sent_to: queued jobs sent to one worker's own queue.
SENT_TO = "state = 'queued' AND sent_to IS NOT NULL"


def upgrade() -> None:
    """Apply this revision."""
    op.add_column("workers", sa.Column("loaded_model", sa.String(length=100), nullable=True))
    op.add_column("jobs", sa.Column("sent_to", sa.String(length=255), nullable=True))
    op.create_index(
        "ix_jobs_sent_to",
        "jobs",
        ["sent_to"],
        unique=False,
        postgresql_where=sa.text(SENT_TO),
        sqlite_where=sa.text(SENT_TO),
    )


def downgrade() -> None:
    """Revert this revision (plain ALTER TABLE: SQLite 3.35+ drops columns)."""
    op.drop_index("ix_jobs_sent_to", table_name="jobs")
    op.execute("ALTER TABLE jobs DROP COLUMN sent_to")
    op.execute("ALTER TABLE workers DROP COLUMN loaded_model")
