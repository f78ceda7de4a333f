"""list indexes: the admin's job list, its filters and retention's pass read an index range

Revision ID: 7a3c5e9d2b48
Revises: 6f2b8d4c1a37
Create Date: 2026-11-30 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7a3c5e9d2b48"
down_revision: str | None = "6f2b8d4c1a37"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _list_order() -> sa.ColumnElement[object]:
    """The list's sort expression, as svdfarm.models.list_order writes it."""
    return sa.func.coalesce(sa.column("finished_at"), sa.column("created_at"))


def upgrade() -> None:
    """Apply this revision."""
    op.create_index("ix_jobs_list_order", "jobs", [_list_order(), sa.column("id")])
    op.create_index(
        "ix_jobs_state_list_order", "jobs", [sa.column("state"), _list_order(), sa.column("id")]
    )
    op.create_index("ix_jobs_model", "jobs", ["model"])
    op.create_index("ix_attempts_worker", "attempts", ["worker"])
    # svdfarm.models.storage_failure_event, as each dialect reads a JSON field.
    details = sa.column("details", sa.JSON)
    storage_failed = sa.and_(
        sa.column("type") == "failed", details["error_class"].as_string() == "storage"
    )
    op.create_index(
        "ix_job_events_storage_failed",
        "job_events",
        ["job_id"],
        postgresql_where=storage_failed,
        sqlite_where=storage_failed,
    )
    ended = sa.func.coalesce(sa.column("finished_at"), sa.column("started_at"))
    op.create_index("ix_attempts_outcome_ended", "attempts", [sa.column("outcome"), ended])
    for name, column in (
        ("ix_jobs_outputs_kept", "expired_at"),
        ("ix_jobs_input_kept", "input_expired_at"),
    ):
        kept = sa.column(column).is_(None)
        op.create_index(
            name, "jobs", ["finished_at", "id"], postgresql_where=kept, sqlite_where=kept
        )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_jobs_input_kept", table_name="jobs")
    op.drop_index("ix_jobs_outputs_kept", table_name="jobs")
    op.drop_index("ix_attempts_outcome_ended", table_name="attempts")
    op.drop_index("ix_job_events_storage_failed", table_name="job_events")
    op.drop_index("ix_attempts_worker", table_name="attempts")
    op.drop_index("ix_jobs_model", table_name="jobs")
    op.drop_index("ix_jobs_state_list_order", table_name="jobs")
    op.drop_index("ix_jobs_list_order", table_name="jobs")
