"""The database's sessions: a pooled PostgreSQL connection the server closed is replaced at
checkout (no round trip to check it), and read sessions run outside a transaction."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from svdfarm.db import Database
from svdfarm.settings import Settings
from tests.conftest import DATABASES


@pytest.mark.parametrize("database_url", DATABASES[1:], indirect=True)
def test_a_connection_the_server_closed_is_replaced(settings: Settings) -> None:
    """Its backend terminated (as a restart does to all of them), the pooled connection is
    dropped at checkout and the next session works on a new one."""
    db = Database(settings.database_url)
    other = Database(settings.database_url)
    try:
        with db.session() as session:
            pid = session.scalar(text("SELECT pg_backend_pid()"))
        with other.begin() as session:
            assert session.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            # wait until the backend has gone, so its goodbye has reached the socket
            for _ in range(200):
                alive = session.scalar(
                    text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
                )
                if not alive:
                    break
                session.execute(text("SELECT pg_sleep(0.01)"))
        with db.session() as session:
            assert session.scalar(text("SELECT pg_backend_pid()")) != pid
        with db.read_session() as session:
            assert session.scalar(text("SELECT 1")) == 1
    finally:
        db.dispose()
        other.dispose()


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_read_sessions_run_outside_a_transaction(settings: Settings) -> None:
    """A read session's statements commit on their own; a plain session's are in one
    transaction until it commits."""
    db = Database(settings.database_url)
    try:
        with db.read_session() as session:
            options = session.connection().get_execution_options()
            assert options.get("isolation_level") == "AUTOCOMMIT"
        with db.session() as session:
            assert "isolation_level" not in session.connection().get_execution_options()
    finally:
        db.dispose()
