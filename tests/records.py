"""Reading the database from tests: a job row, how many there are."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable

from flask import Flask
from sqlalchemy import func, select

from svdfarm.db import Database
from svdfarm.models import Job, Worker


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


#: The render parameters of a small job, for rows inserted directly.
SMALL_JOB = {
    "model": "tiny",
    "num_frames": 4,
    "num_inference_steps": 2,
    "fps": 7,
    "motion_bucket_id": 127,
    "noise_aug_strength": 0.02,
    "seed": 1,
    "decode_chunk_size": 8,
    "width": 64,
    "height": 64,
    "precision": "auto",
    "memory_estimate_bytes": 6_000_000_000,
}


def job_row(job_id: uuid.UUID, **fields: object) -> Job:
    """A job row with a small job's parameters; ``fields`` set or replace any column."""
    values: dict[str, object] = {**SMALL_JOB, "input_key": f"{job_id}/input.png", **fields}
    return Job(id=job_id, **values)


def wait_for_worker(
    db: Database,
    hostname: str,
    process: subprocess.Popen[bytes],
    log: Callable[[], str],
    timeout_s: float = 120,
) -> None:
    """Block until the worker process has registered itself; fail with its log if it died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"worker {hostname} exited early:\n{log()}"
        with db.session() as session:
            if session.get(Worker, hostname) is not None:
                return
        time.sleep(0.2)
    raise AssertionError(f"worker {hostname} did not register in {timeout_s:g} s:\n{log()}")
