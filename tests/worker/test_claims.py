"""Claiming a redelivered RUNNING job: refused while the worker running it still beats, taken
over (closing the lost attempt) once that worker missed three heartbeats.

Real rows on real databases; the takeover renders with the tiny model (2 frames, 1 step).
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from celery import Celery
from sqlalchemy import select

from svdfarm.db import Database
from svdfarm.deliveries import lost_message
from svdfarm.jobs import submit_job, validate_submission
from svdfarm.lifecycle import By
from svdfarm.models import Attempt, Job, Worker, utcnow
from svdfarm.settings import Settings
from svdfarm.states import Actor, AttemptOutcome, ErrorClass, JobState, RunOutcome, WorkerState
from svdfarm.storage import FileStore
from tests.conftest import DATABASES
from tests.factories import png_bytes
from tests.rows import add_worker
from worker.execute import run_job

ME = "w2@test"
OWNER = "w1@gone"


@pytest.fixture
def beats(settings: Settings) -> Settings:
    """Settings with a 10 s heartbeat: a worker is offline after 30 s without one."""
    result = settings.with_overrides(heartbeat_interval_s=10.0)
    assert result.offline_after_s == 30.0
    return result


def submit(db: Database, settings: Settings) -> uuid.UUID:
    """Record and enqueue a small job as the web does; returns its id."""
    from svdfarm.celery_app import create_celery

    raw = {"num_frames": "2", "num_inference_steps": "1", "seed": "3", "decode_chunk_size": "2"}
    submission = validate_submission(settings, raw, png_bytes(), "in.png")
    celery: Celery = create_celery(settings)
    with db.session() as session:
        return submit_job(
            session, celery, settings, submission, by=By(Actor.API), owner="addr:127.0.0.1"
        ).id


def mark_running(db: Database, job_id: uuid.UUID, *owners: str) -> None:
    """Make the job RUNNING with one running attempt per owner, as a first delivery leaves it."""
    started = utcnow() - timedelta(minutes=2)
    with db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.phase, job.progress, job.step = JobState.RUNNING, "denoising", 0.5, 1
        job.started_at = started
        for number, owner in enumerate(owners, start=1):
            session.add(
                Attempt(
                    job_id=job_id,
                    number=number,
                    worker=owner,
                    plan_name="cpu fp32",
                    plan={"device": "cpu"},
                    outcome=AttemptOutcome.RUNNING,
                    started_at=started,
                )
            )


def running_elsewhere(
    db: Database, settings: Settings, owner_heartbeat_age_s: float | None
) -> uuid.UUID:
    """A job RUNNING on ``OWNER`` (whose row has this heartbeat age; None: no row), and an
    idle row for this worker; returns the job id."""
    job_id = submit(db, settings)
    mark_running(db, job_id, OWNER)
    if owner_heartbeat_age_s is not None:
        add_worker(
            db,
            OWNER,
            heartbeat_age_s=owner_heartbeat_age_s,
            state=WorkerState.BUSY,
            current_job_id=job_id,
        )
    add_worker(db, ME, heartbeat_age_s=0)
    return job_id


def load(db: Database, job_id: uuid.UUID) -> Job:
    """The job row with its attempts."""
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.attempts  # noqa: B018 - load them before the session closes
        return job


def worker_row(db: Database, hostname: str) -> Worker:
    """A worker row."""
    with db.session() as session:
        worker = session.get(Worker, hostname)
        assert worker is not None
        return worker


def assert_untouched(db: Database, job_id: uuid.UUID, owners: list[str]) -> None:
    """The job is still RUNNING as its owner left it: same attempts, nothing stored, this
    worker not made busy."""
    job = load(db, job_id)
    assert job.state is JobState.RUNNING
    assert (job.phase, job.progress, job.step) == ("denoising", 0.5, 1)
    assert [(a.worker, a.outcome) for a in job.attempts] == [
        (o, AttemptOutcome.RUNNING) for o in owners
    ]
    assert all(a.finished_at is None for a in job.attempts)
    assert job.video_key is None
    me = worker_row(db, ME)
    assert me.state is WorkerState.IDLE and me.current_job_id is None


def assert_taken_over(db: Database, settings: Settings, job_id: uuid.UUID, lost: str) -> None:
    """The job succeeded here; the attempt ``lost`` left running is closed as lost."""
    job = load(db, job_id)
    assert job.state is JobState.SUCCEEDED
    first, second = job.attempts
    assert (first.number, first.worker) == (1, lost)
    assert first.outcome is AttemptOutcome.FAILED
    assert first.error_class is ErrorClass.WORKER_LOST
    assert first.message == lost_message(lost)
    assert first.finished_at is not None and first.finished_at >= first.started_at
    assert (second.number, second.worker) == (2, ME)
    assert second.outcome is AttemptOutcome.SUCCEEDED
    assert FileStore(settings.storage_dir).exists(job.video_key)
    me = worker_row(db, ME)
    assert me.state is WorkerState.IDLE and me.current_job_id is None


# ---- the owner still beats: not claimed ----------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_running_on_a_live_worker_is_not_claimed(db: Database, beats: Settings) -> None:
    """A duplicate delivery while the owner beats returns "running elsewhere", adds nothing."""
    job_id = running_elsewhere(db, beats, owner_heartbeat_age_s=1)
    assert run_job(db, beats, str(job_id), ME) == RunOutcome.RUNNING_ELSEWHERE
    assert_untouched(db, job_id, [OWNER])
    owner = worker_row(db, OWNER)
    assert owner.state is WorkerState.BUSY and owner.current_job_id == job_id


def test_two_missed_beats_are_not_yet_lost(db: Database, beats: Settings) -> None:
    """An owner 25 s quiet at a 10 s interval (under three beats) still holds the job."""
    job_id = running_elsewhere(db, beats, owner_heartbeat_age_s=25)
    assert run_job(db, beats, str(job_id), ME) == RunOutcome.RUNNING_ELSEWHERE
    assert_untouched(db, job_id, [OWNER])


def test_a_draining_owner_still_holds_its_job(db: Database, beats: Settings) -> None:
    """A worker stopping gracefully finishes its running job: not claimed from under it."""
    job_id = submit(db, beats)
    mark_running(db, job_id, OWNER)
    add_worker(db, OWNER, heartbeat_age_s=2, state=WorkerState.DRAINING, current_job_id=job_id)
    add_worker(db, ME, heartbeat_age_s=0)
    assert run_job(db, beats, str(job_id), ME) == RunOutcome.RUNNING_ELSEWHERE
    assert_untouched(db, job_id, [OWNER])


def test_one_live_owner_among_dead_ones_holds_the_job(db: Database, beats: Settings) -> None:
    """Two running attempts, one of a dead worker and one of a live one: not claimed."""
    job_id = submit(db, beats)
    mark_running(db, job_id, OWNER, "w3@alive")
    add_worker(db, OWNER, heartbeat_age_s=300, state=WorkerState.BUSY)
    add_worker(db, "w3@alive", heartbeat_age_s=1, state=WorkerState.BUSY, current_job_id=job_id)
    add_worker(db, ME, heartbeat_age_s=0)
    assert run_job(db, beats, str(job_id), ME) == RunOutcome.RUNNING_ELSEWHERE
    assert_untouched(db, job_id, [OWNER, "w3@alive"])


# ---- the owner is gone: claimed, the lost attempt closed -----------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_of_an_offline_worker_is_taken_over(db: Database, beats: Settings) -> None:
    """Owner silent for more than three beats: the job runs here, the lost attempt closed."""
    job_id = running_elsewhere(db, beats, owner_heartbeat_age_s=31)
    assert run_job(db, beats, str(job_id), ME) == "succeeded"
    assert_taken_over(db, beats, job_id, OWNER)


def test_the_heartbeat_interval_decides(db: Database, beats: Settings) -> None:
    """The same 25 s-old heartbeat is lost at a 5 s interval: the job is taken over."""
    job_id = running_elsewhere(db, beats, owner_heartbeat_age_s=25)
    faster = beats.with_overrides(heartbeat_interval_s=5.0)
    assert run_job(db, faster, str(job_id), ME) == "succeeded"
    assert_taken_over(db, beats, job_id, OWNER)


def test_a_worker_that_shut_down_loses_its_job(db: Database, beats: Settings) -> None:
    """An owner that marked itself offline (fresh heartbeat, state offline) holds nothing."""
    job_id = submit(db, beats)
    mark_running(db, job_id, OWNER)
    add_worker(db, OWNER, heartbeat_age_s=1, state=WorkerState.OFFLINE)
    add_worker(db, ME, heartbeat_age_s=0)
    assert run_job(db, beats, str(job_id), ME) == "succeeded"
    assert_taken_over(db, beats, job_id, OWNER)


def test_an_owner_without_a_row_holds_nothing(db: Database, beats: Settings) -> None:
    """An attempt of a worker the registry does not know (never registered) is lost."""
    job_id = running_elsewhere(db, beats, owner_heartbeat_age_s=None)
    assert run_job(db, beats, str(job_id), ME) == "succeeded"
    assert_taken_over(db, beats, job_id, OWNER)


def test_a_restarted_worker_takes_its_own_job_back(db: Database, beats: Settings) -> None:
    """Redelivered to the same hostname (it restarted): claimed, its old attempt closed."""
    job_id = submit(db, beats)
    mark_running(db, job_id, ME)
    add_worker(db, ME, heartbeat_age_s=0)
    assert run_job(db, beats, str(job_id), ME) == "succeeded"
    job = load(db, job_id)
    first, second = job.attempts
    assert (first.worker, first.outcome) == (ME, AttemptOutcome.FAILED)
    assert first.message == lost_message(ME)
    assert (second.worker, second.outcome) == (ME, AttemptOutcome.SUCCEEDED)


def test_a_live_owner_whose_render_died_releases_the_job(db: Database, beats: Settings) -> None:
    """The owner still beats but no longer runs the job (its pool process died): claimed."""
    job_id = submit(db, beats)
    mark_running(db, job_id, OWNER)
    add_worker(db, OWNER, heartbeat_age_s=1, state=WorkerState.IDLE, current_job_id=None)
    add_worker(db, ME, heartbeat_age_s=0)
    assert run_job(db, beats, str(job_id), ME) == "succeeded"
    attempts = load(db, job_id).attempts
    assert [(a.worker, a.outcome) for a in attempts] == [
        (OWNER, AttemptOutcome.FAILED),
        (ME, AttemptOutcome.SUCCEEDED),
    ]


def test_a_duplicate_delivery_waits_for_the_owners_first_beat(
    db: Database, beats: Settings
) -> None:
    """A job requeued once can be delivered to two workers at the same moment. The second
    must not take it while the first has not beaten since its attempt began (its row cannot
    name the job yet); once a beat after the attempt shows the job is not there, it may."""
    job_id = submit(db, beats)
    mark_running(db, job_id, OWNER)
    add_worker(db, OWNER, heartbeat_age_s=0, state=WorkerState.IDLE, current_job_id=None)
    add_worker(db, ME, heartbeat_age_s=0)
    with db.begin() as session:
        owner = session.get(Worker, OWNER)
        attempt = session.scalars(select(Attempt).where(Attempt.job_id == job_id)).one()
        assert owner is not None
        began = owner.last_heartbeat + timedelta(milliseconds=200)
        attempt.started_at = began
    assert run_job(db, beats, str(job_id), ME) == RunOutcome.RUNNING_ELSEWHERE
    assert_untouched(db, job_id, [OWNER])
    with db.begin() as session:  # the owner's next beat: alive, not running the job
        owner = session.get(Worker, OWNER)
        assert owner is not None
        owner.last_heartbeat = began + timedelta(seconds=1)
    assert run_job(db, beats, str(job_id), ME) == "succeeded"
    assert [(a.worker, a.outcome) for a in load(db, job_id).attempts] == [
        (OWNER, AttemptOutcome.FAILED),
        (ME, AttemptOutcome.SUCCEEDED),
    ]
