"""owners and dispatch: users, API keys, each job's owner and priority, dispatch time

Revision ID: ad1e4f7b9c20
Revises: 9c5e7a1f4d60
Create Date: 2026-11-30 13:00:00

Jobs recorded before owners existed belong to the anonymous owner of the address that sent
them (``addr:<client>``), as open mode names API clients without a key. Every such job was
already published at submit, so ``published_at`` is its last update for the queued ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import svdfarm.models

revision: str = "ad1e4f7b9c20"
down_revision: str | None = "9c5e7a1f4d60"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WAITING = "state = 'queued' AND published_at IS NULL"


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=True),
        sa.Column("created_at", svdfarm.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", svdfarm.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("max_queued", sa.Integer(), nullable=True),
        sa.Column("max_running", sa.Integer(), nullable=True),
        sa.Column("max_priority", sa.Integer(), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=100), nullable=False),
        sa.Column("created_at", svdfarm.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", svdfarm.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", svdfarm.models.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_api_keys_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    op.create_index(op.f("ix_api_keys_user_id"), "api_keys", ["user_id"], unique=False)
    op.add_column("jobs", sa.Column("owner", sa.String(80), nullable=False, server_default=""))
    op.add_column("jobs", sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
    op.add_column(
        "jobs", sa.Column("published_at", svdfarm.models.UTCDateTime(timezone=True), nullable=True)
    )
    op.execute(
        "UPDATE jobs SET owner = 'addr:' || COALESCE(client, ''), "
        "published_at = CASE WHEN state = 'queued' THEN updated_at END"
    )
    op.create_index("ix_jobs_owner_created", "jobs", ["owner", "created_at", "id"], unique=False)
    op.create_index(
        "ix_jobs_waiting",
        "jobs",
        ["queue", "owner", "priority", "created_at"],
        unique=False,
        postgresql_where=sa.text(WAITING),
        sqlite_where=sa.text(WAITING),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_jobs_waiting", table_name="jobs")
    op.drop_index("ix_jobs_owner_created", table_name="jobs")
    # Plain ALTER TABLE (SQLite 3.35+ drops columns): a batch copy would have to reflect the
    # list-order indexes, which are on expressions SQLite cannot reflect.
    for column in ("published_at", "priority", "owner"):
        op.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    op.drop_index(op.f("ix_api_keys_user_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("users")
