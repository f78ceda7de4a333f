"""search indexes: the admin's search finds text through trigram indexes on PostgreSQL

Revision ID: 9c5e7a1f4d60
Revises: 8b4d6f0e3c59
Create Date: 2026-11-30 12:20:00

The admin's search matches anywhere in a job's error, its file name and its attempts'
messages (``ILIKE '%text%'``), which no B-tree helps: over a long history it read every row
(0.97 s at 1,000,000 jobs). ``pg_trgm``'s GIN indexes answer it from the index. The extension
goes into the ``public`` schema; where it cannot be created (no such extension, or no right to
create it) the indexes are left out and the search still works, reading every row. SQLite has
none of this (the embedded setup is small). The indexes are not in the models (SQLite could
not have them): ``svdfarm.db.include_object`` keeps autogenerate from dropping them.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import exc, text

revision: str = "9c5e7a1f4d60"
down_revision: str | None = "8b4d6f0e3c59"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (index, table, column), as ``svdfarm.db.TRIGRAM_INDEXES`` names them.
INDEXES = (
    ("ix_jobs_error_trgm", "jobs", "error"),
    ("ix_jobs_input_filename_trgm", "jobs", "input_filename"),
    ("ix_attempts_message_trgm", "attempts", "message"),
)


def upgrade() -> None:
    """Apply this revision (PostgreSQL with pg_trgm only)."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    try:
        with bind.begin_nested():
            bind.execute(text("CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public"))
    except exc.DBAPIError:
        return  # not installed, or not ours to create: the search reads every row
    for name, table, column in INDEXES:
        op.execute(
            f"CREATE INDEX IF NOT EXISTS {name} ON {table} USING gin ({column} public.gin_trgm_ops)"
        )


def downgrade() -> None:
    """Revert this revision (the extension stays: other schemas may use it)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, _table, _column in INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
