"""Alembic environment: our models' metadata, the URL from the config or the settings."""

from __future__ import annotations

from alembic import context

from svdfarm.db import include_object, make_engine
from svdfarm.models import Base
from svdfarm.settings import load_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    """The URL handed in by ``svdfarm db upgrade``, else ``SVDFARM_DATABASE_URL``."""
    return config.get_main_option("sqlalchemy.url") or load_settings().database_url


def run_migrations_offline() -> None:
    """Emit SQL without a connection (``alembic upgrade --sql``)."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
        include_object=include_object,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations over a real connection."""
    engine = make_engine(_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            include_object=include_object,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
