"""Requeueing and deleting jobs on real databases, with the filesystem broker's messages read back.

Rows are inserted directly: failed jobs with attempts, their input files in storage.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from celery import Celery

from svdfarm.celery_app import create_celery
from svdfarm.db import Database
from svdfarm.models import Attempt, Job, Worker, utcnow
from svdfarm.queues import parse_queue
from svdfarm.requeue import FP32_DTYPES, delete_job, requeue_jobs
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, ErrorClass, JobState, WorkerState
from svdfarm.storage import Storage
from tests.conftest import DATABASES
from tests.records import job_row

QUEUE = "svd.cuda.fp16.16g"


def add_job(
    db: Database,
    settings: Settings,
    state: JobState = JobState.FAILED,
    *,
    error_class: ErrorClass | None = ErrorClass.OUT_OF_MEMORY,
    worker: str = "gpu1@farm",
    model: str = "tiny",
    filename: str = "cat.png",
    error: str | None = "CUDA out of memory. Tried to allocate 2.00 GiB",
    finished_at: datetime | None = None,
    duration_s: float = 42.0,
    traceback: str = 'Traceback (most recent call last):\n  File "render.py"\nOutOfMemoryError',
) -> uuid.UUID:
    """Insert a job in ``state`` with one attempt (failed when ``error_class``) and its input."""
    job_id = uuid.uuid4()
    finished = finished_at or utcnow()
    started = finished - timedelta(seconds=duration_s)
    ended = state in (JobState.FAILED, JobState.SUCCEEDED, JobState.CANCELED)
    storage = Storage(settings.storage_dir)
    storage.write_bytes(Storage.key(job_id, "input.png"), b"not really a png")
    with db.begin() as session:
        session.add(
            job_row(
                job_id,
                state=state,
                created_at=started - timedelta(seconds=5),
                started_at=started if state is not JobState.QUEUED else None,
                finished_at=finished if ended else None,
                model=model,
                queue=QUEUE,
                input_key=Storage.key(job_id, "input.png"),
                input_filename=filename,
                phase="done" if ended else "denoising",
                progress=0.5,
                step=1,
                error=error if state is JobState.FAILED else None,
            )
        )
        if state is not JobState.QUEUED:
            failed = error_class is not None and state is JobState.FAILED
            session.add(
                Attempt(
                    job_id=job_id,
                    number=1,
                    worker=worker,
                    plan_name="fp16 unet+enc, fp32 vae, chunk 8 on cuda",
                    plan={"name": "fp16", "reason": "the card has no bf16"},
                    started_at=started,
                    finished_at=finished if ended else None,
                    outcome=AttemptOutcome.FAILED if failed else AttemptOutcome.SUCCEEDED,
                    error_class=error_class if failed else None,
                    error_type="torch.OutOfMemoryError" if failed else None,
                    message=error if failed else None,
                    traceback=traceback if failed else None,
                    duration_s=duration_s,
                    peak_memory_bytes=15_300_000_000,
                )
            )
    return job_id


def add_worker(
    db: Database, hostname: str, queues: list[str], heartbeat_age_s: float = 1.0, **fields: object
) -> None:
    """Insert a worker row whose last heartbeat was ``heartbeat_age_s`` seconds ago."""
    now = utcnow()
    with db.begin() as session:
        session.add(
            Worker(
                hostname=hostname,
                queues=queues,
                started_at=now - timedelta(hours=1),
                last_heartbeat=now - timedelta(seconds=heartbeat_age_s),
                **fields,
            )
        )


def broker_messages(settings: Settings) -> list[tuple[str, str]]:
    """``(queue, job id)`` of every message in the filesystem broker, oldest first."""
    folder = settings.broker_dir / "queue"
    found = []
    for path in sorted(folder.iterdir()) if folder.exists() else []:
        queue = path.name.split(".", 1)[1].removesuffix(".msg")  # <n>_<uuid>.<queue>.msg
        body = json.loads(base64.b64decode(json.loads(path.read_bytes())["body"]))
        found.append((queue, body[0][0]))
    return found


def read_job(db: Database, job_id: uuid.UUID) -> Job | None:
    """The job row in a fresh session (None when it is gone)."""
    with db.session() as session:
        return session.get(Job, job_id)


@pytest.fixture
def celery(settings: Settings) -> Iterator[Celery]:
    """A Celery app on the test's filesystem broker."""
    app = create_celery(settings)
    yield app
    app.close()


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_requeue_failed_job_clears_it_keeps_attempts_and_enqueues(
    db: Database, settings: Settings, celery: Celery
) -> None:
    """A failed job goes back to queued, progress and error cleared, on its own queue."""
    job_id = add_job(db, settings)
    with db.session() as session:
        changes = requeue_jobs(session, celery, settings, [str(job_id)])
    assert [c.done for c in changes] == [True]
    assert QUEUE in changes[0].message
    job = read_job(db, job_id)
    assert job is not None
    assert job.state is JobState.QUEUED
    assert (job.error, job.progress, job.phase, job.step) == (None, 0.0, "queued", 0)
    assert job.started_at is None and job.finished_at is None
    assert job.dtypes is None and job.casts is None and job.queue == QUEUE
    assert [a.number for a in job.attempts] == [1]
    assert broker_messages(settings) == [(QUEUE, str(job_id))]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_requeue_skips_jobs_that_did_not_fail_and_says_why(
    db: Database, settings: Settings, celery: Celery
) -> None:
    """Queued, running and succeeded jobs are left alone; canceled ones are requeued."""
    queued = add_job(db, settings, JobState.QUEUED)
    running = add_job(db, settings, JobState.RUNNING)
    done = add_job(db, settings, JobState.SUCCEEDED, error_class=None)
    canceled = add_job(db, settings, JobState.CANCELED)
    ids = [queued, running, done, canceled, "not-a-uuid", uuid.uuid4()]
    with db.session() as session:
        changes = requeue_jobs(session, celery, settings, ids)
    assert [c.done for c in changes] == [False, False, False, True, False, False]
    assert "is queued: only failed or canceled jobs can be requeued" in changes[0].message
    assert "is running" in changes[1].message
    assert "is succeeded" in changes[2].message
    assert "is not a job id" in changes[4].message
    assert changes[5].message.startswith("No job with id")
    for job_id, state in ((queued, JobState.QUEUED), (running, JobState.RUNNING)):
        job = read_job(db, job_id)
        assert job is not None and job.state is state
    assert broker_messages(settings) == [(QUEUE, str(canceled))]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_force_fp32_sets_every_dtype_and_routes_to_an_fp32_queue(
    db: Database, settings: Settings, celery: Celery
) -> None:
    """fp32 on every component, precision fp32, and a queue of the fp32 class."""
    job_id = add_job(db, settings)
    with db.session() as session:
        [change] = requeue_jobs(session, celery, settings, [job_id], force_fp32=True)
    assert change.done and "fp32" in change.message
    job = read_job(db, job_id)
    assert job is not None
    assert job.dtypes == FP32_DTYPES and job.precision == "fp32"
    assert parse_queue(job.queue).precision == "fp32"
    assert broker_messages(settings) == [(job.queue, str(job_id))]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_casts_off_and_a_forced_queue(db: Database, settings: Settings, celery: Celery) -> None:
    """Casts off is stored on the job; a forced queue wins over routing, even with fp32."""
    first, second = add_job(db, settings), add_job(db, settings)
    forced = "svd.cuda.fp32.80g"
    with db.session() as session:
        changes = requeue_jobs(
            session,
            celery,
            settings,
            [first, second],
            queue=forced,
            casts_off=True,
            force_fp32=True,
        )
    assert all(c.done for c in changes)
    for job_id in (first, second):
        job = read_job(db, job_id)
        assert job is not None
        assert (job.casts, job.queue, job.dtypes) == (False, forced, FP32_DTYPES)
    assert broker_messages(settings) == [(forced, str(first)), (forced, str(second))]


def test_invalid_queue_is_refused_before_anything_changes(
    db: Database, settings: Settings, celery: Celery
) -> None:
    """A queue outside the naming scheme raises ValueError naming the scheme; nothing moves."""
    job_id = add_job(db, settings)
    with db.session() as session, pytest.raises(ValueError, match="is not an svdfarm queue"):
        requeue_jobs(session, celery, settings, [job_id], queue="fast-gpus")
    job = read_job(db, job_id)
    assert job is not None and job.state is JobState.FAILED
    assert broker_messages(settings) == []


def test_enqueue_failure_fails_the_job_again_with_the_reason(
    db: Database, settings: Settings, celery: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the broker refuses the message the job is failed again, saying so."""

    def refuse(*_: object) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr("svdfarm.requeue.enqueue_render", refuse)
    job_id = add_job(db, settings)
    with db.session() as session:
        [change] = requeue_jobs(session, celery, settings, [job_id])
    assert (
        not change.done and "could not be queued (ConnectionError: broker down)" in change.message
    )
    job = read_job(db, job_id)
    assert job is not None and job.state is JobState.FAILED
    assert job.error and "broker down" in job.error


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_delete_removes_row_attempts_and_files(db: Database, settings: Settings) -> None:
    """The job, its attempts and its folder are gone; a worker pointing at it is cleared."""
    job_id = add_job(db, settings)
    add_worker(db, "gpu1@farm", [QUEUE], current_job_id=job_id, state=WorkerState.BUSY)
    folder = settings.storage_dir / str(job_id)
    assert folder.is_dir()
    with db.session() as session:
        change = delete_job(session, settings, str(job_id))
    assert change.done and "deleted" in change.message
    assert read_job(db, job_id) is None
    assert not folder.exists()
    with db.session() as session:
        assert session.query(Attempt).filter_by(job_id=job_id).count() == 0
        worker = session.get(Worker, "gpu1@farm")
        assert worker is not None and worker.current_job_id is None


@pytest.mark.parametrize("state", [JobState.RUNNING, JobState.CANCEL_REQUESTED])
def test_delete_refuses_a_job_a_worker_may_be_running(
    db: Database, settings: Settings, state: JobState
) -> None:
    """Running (or still stopping) jobs keep their row and files."""
    job_id = add_job(db, settings, state)
    with db.session() as session:
        change = delete_job(session, settings, job_id)
    assert not change.done and "cancel it and delete it once it has stopped" in change.message
    assert read_job(db, job_id) is not None
    assert (settings.storage_dir / str(job_id)).is_dir()


def test_delete_unknown_job(db: Database, settings: Settings) -> None:
    """An unknown or malformed id is reported, not raised."""
    with db.session() as session:
        assert delete_job(session, settings, uuid.uuid4()).message.startswith("No job with id")
        assert "is not a job id" in delete_job(session, settings, "nope").message
