"""Reading the database from tests: a job row, how many there are."""

from __future__ import annotations

import uuid

from flask import Flask
from sqlalchemy import func, select

from svdfarm.models import Job


def load_job(app: Flask, job_id: str) -> Job:
    """The job row, read in a session of its own."""
    with app.extensions["svdfarm.db"].session() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


def job_count(app: Flask) -> int:
    """How many job rows the database holds."""
    with app.extensions["svdfarm.db"].session() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0
