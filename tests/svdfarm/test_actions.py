"""Requeueing and deleting jobs on real databases, with the filesystem broker's messages read back.

Rows are inserted directly: failed jobs with attempts, their input files in storage.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery import Celery

from svdfarm.actions import FP32_DTYPES, delete_job, requeue_jobs
from svdfarm.celery_app import create_celery
from svdfarm.db import Database
from svdfarm.lifecycle import By, events_of
from svdfarm.models import Attempt, Job, Worker, utcnow
from svdfarm.queues import parse_queue
from svdfarm.settings import Settings
from svdfarm.states import Actor, EventType, JobState, WorkerState
from tests.conftest import DATABASES
from tests.rows import QUEUE, add_job, add_worker, broker_messages, read_job

ADMIN = By(Actor.ADMIN, "admin")


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
        changes = requeue_jobs(session, celery, settings, [str(job_id)], by=ADMIN)
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
        changes = requeue_jobs(session, celery, settings, ids, by=ADMIN)
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
        [change] = requeue_jobs(session, celery, settings, [job_id], by=ADMIN, force_fp32=True)
    assert change.done and "fp32" in change.message
    job = read_job(db, job_id)
    assert job is not None
    assert job.dtypes == FP32_DTYPES and job.precision == "auto"
    assert parse_queue(job.queue).precision == "fp32"
    assert broker_messages(settings) == [(job.queue, str(job_id))]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_casts_off_and_a_forced_queue(db: Database, settings: Settings, celery: Celery) -> None:
    """Casts off is stored on the job; a forced queue wins over routing, even with fp32; a
    class's bare name means that class's queue of the job's model."""
    first, second = add_job(db, settings), add_job(db, settings)
    bare = "svd.cuda.fp32.80g"
    forced = f"{bare}.tiny"
    with db.session() as session:
        changes = requeue_jobs(
            session,
            celery,
            settings,
            [first, second],
            queue=bare,
            casts_off=True,
            force_fp32=True,
            by=ADMIN,
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
        requeue_jobs(session, celery, settings, [job_id], by=ADMIN, queue="fast-gpus")
    job = read_job(db, job_id)
    assert job is not None and job.state is JobState.FAILED
    assert broker_messages(settings) == []


def test_enqueue_failure_leaves_the_job_queued_for_the_reaper(
    db: Database, settings: Settings, celery: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the broker refuses the message the job stays queued, as at submit, and says so."""

    def refuse(*_: object) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr("svdfarm.dispatch.enqueue_render", refuse)
    job_id = add_job(db, settings)
    with db.session() as session:
        [change] = requeue_jobs(session, celery, settings, [job_id], by=ADMIN)
    assert change.done and "sent once it is back" in change.message
    job = read_job(db, job_id)
    assert job is not None and job.state is JobState.QUEUED and job.error is None
    with db.session() as session:
        types = [e.type for e in events_of(session, job.id)]
    assert types[-3:] == [EventType.REQUEUED, EventType.PUBLISHED, EventType.PUBLISH_FAILED]


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


def test_a_job_whose_input_expired_is_not_requeued(
    db: Database, settings: Settings, celery: Celery
) -> None:
    """Requeueing a job whose input retention deleted its image is refused, saying why;
    the job stays failed and nothing is sent."""
    job_id = add_job(db, settings)
    with db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.input_expired_at = utcnow()
    with db.session() as session:
        [change] = requeue_jobs(session, celery, settings, [job_id], by=ADMIN)
    assert not change.done and "SVDFARM_INPUT_RETENTION" in change.message
    job = read_job(db, job_id)
    assert job is not None and job.state is JobState.FAILED
    assert broker_messages(settings) == []
