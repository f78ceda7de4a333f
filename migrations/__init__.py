"""Alembic migrations for svdfarm's database (run with ``svdfarm db upgrade``)."""
