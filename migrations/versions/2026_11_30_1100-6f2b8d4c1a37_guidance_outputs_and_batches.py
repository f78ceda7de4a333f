"""guidance scales, output formats and loop, every output's key, batches

Revision ID: 6f2b8d4c1a37
Revises: 4e7a9b2c6d13
Create Date: 2026-11-30 11:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "6f2b8d4c1a37"
down_revision: str | None = "4e7a9b2c6d13"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision; existing jobs keep the pipeline's guidance and an MP4 alone."""
    op.create_table(
        "batches",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("min_guidance_scale", sa.Float(), nullable=False, server_default="1.0")
        )
        batch_op.add_column(
            sa.Column("max_guidance_scale", sa.Float(), nullable=False, server_default="3.0")
        )
        batch_op.add_column(
            sa.Column("output_formats", sa.String(length=64), nullable=False, server_default="mp4")
        )
        batch_op.add_column(
            sa.Column("loop", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("output_keys", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("batch_id", sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column("batch_index", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_batch_id"), ["batch_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_batch_id_batches"),
            "batches",
            ["batch_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_jobs_batch_id_batches"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_jobs_batch_id"))
        batch_op.drop_column("batch_index")
        batch_op.drop_column("batch_id")
        batch_op.drop_column("output_keys")
        batch_op.drop_column("loop")
        batch_op.drop_column("output_formats")
        batch_op.drop_column("max_guidance_scale")
        batch_op.drop_column("min_guidance_scale")
    op.drop_table("batches")
