"""webhook redeliveries: how often and when an admin asked for a delivery again, and the
indexes of the admin's delivery log (by state, by endpoint, newest first)

Revision ID: e9f4a6b8c034
Revises: f0a5b7c9d145
Create Date: 2026-11-30 14:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import svdfarm.models

revision: str = "e9f4a6b8c034"
down_revision: str | None = "f0a5b7c9d145"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.add_column(
        "webhook_deliveries",
        sa.Column("redeliveries", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column(
        "webhook_deliveries",
        sa.Column("redelivered_at", svdfarm.models.UTCDateTime(timezone=True), nullable=True),
    )
    op.drop_index("ix_webhook_deliveries_endpoint_id", table_name="webhook_deliveries")
    op.create_index(
        "ix_webhook_deliveries_endpoint_id_id", "webhook_deliveries", ["endpoint_id", "id"]
    )
    op.create_index("ix_webhook_deliveries_state_id", "webhook_deliveries", ["state", "id"])


def downgrade() -> None:
    """Revert this revision (plain ALTER TABLE: SQLite 3.35+ drops columns)."""
    op.drop_index("ix_webhook_deliveries_state_id", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_endpoint_id_id", table_name="webhook_deliveries")
    op.create_index("ix_webhook_deliveries_endpoint_id", "webhook_deliveries", ["endpoint_id"])
    op.execute("ALTER TABLE webhook_deliveries DROP COLUMN redelivered_at")
    op.execute("ALTER TABLE webhook_deliveries DROP COLUMN redeliveries")
