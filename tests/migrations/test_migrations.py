"""Migrations: one head, upgrade -> downgrade -> upgrade, and models that match them."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from svdfarm.db import alembic_config, downgrade, include_object, upgrade
from svdfarm.models import Base
from tests.conftest import DATABASES

TABLES = {
    "jobs",
    "attempts",
    "job_events",
    "workers",
    "batches",
    "metric_counts",
    "users",
    "api_keys",
    "webhook_secrets",
    "webhook_endpoints",
    "webhook_deliveries",
    "alembic_version",
}


def test_single_head() -> None:
    """The migration history has exactly one head."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    """Every revision applies, reverts to an empty database, and applies again."""
    engine = create_engine(database_url)
    try:
        upgrade(database_url)
        assert set(inspect(engine).get_table_names()) == TABLES
        downgrade(database_url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(database_url)
        assert set(inspect(engine).get_table_names()) == TABLES
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
# SQLite cannot reflect an index on an expression (the job list's order); PostgreSQL compares it.
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based")
def test_models_match_migrations(database_url: str) -> None:
    """Autogenerate finds nothing to do after upgrading: models and migrations agree."""
    upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            opts = {"compare_type": True, "include_object": include_object}
            context = MigrationContext.configure(conn, opts=opts)
            diff = compare_metadata(context, Base.metadata)
        assert diff == []
        command.check(alembic_config(database_url))
    finally:
        engine.dispose()
