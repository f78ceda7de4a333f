"""live feed: NOTIFY the web's listeners of new job events and of progress (svdfarm.feed)

PostgreSQL only: SQLite has no NOTIFY, and the feed reads new events there instead. The
payload names the schema (``e:<event id>@<schema>``, ``p:<job id>@<schema>``): the channel is
the database's, and two farms in two schemas of one database must not hear each other.

Revision ID: f0a5b7c9d145
Revises: d8e3f5a7b923
Create Date: 2026-11-30 13:35:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "f0a5b7c9d145"
down_revision: str | None = "d8e3f5a7b923"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: svdfarm.feed.CHANNEL, as it was when this revision was written.
CHANNEL = "svdfarm_feed"
#: The job columns whose change is progress a watcher sees.
PROGRESS_COLUMNS = ("phase", "step", "preview_key")


def upgrade() -> None:
    """Apply this revision: two trigger functions and their triggers (PostgreSQL)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    changed = " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in PROGRESS_COLUMNS)
    for kind, key in (("event", "e"), ("progress", "p")):
        op.execute(
            f"""CREATE FUNCTION svdfarm_feed_{kind}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', '{key}:' || NEW.id::text || '@' || TG_TABLE_SCHEMA);
  RETURN NULL;
END $$"""
        )
    op.execute(
        "CREATE TRIGGER job_events_feed AFTER INSERT ON job_events "
        "FOR EACH ROW EXECUTE FUNCTION svdfarm_feed_event()"
    )
    op.execute(
        f"CREATE TRIGGER jobs_feed_progress AFTER UPDATE OF {', '.join(PROGRESS_COLUMNS)} "
        f"ON jobs FOR EACH ROW WHEN ({changed}) EXECUTE FUNCTION svdfarm_feed_progress()"
    )


def downgrade() -> None:
    """Revert this revision."""
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS job_events_feed ON job_events")
    op.execute("DROP TRIGGER IF EXISTS jobs_feed_progress ON jobs")
    op.execute("DROP FUNCTION IF EXISTS svdfarm_feed_event()")
    op.execute("DROP FUNCTION IF EXISTS svdfarm_feed_progress()")
