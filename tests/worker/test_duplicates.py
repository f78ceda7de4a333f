"""A job delivered twice never yields two outputs nor overwrites a succeeded job: the claim
token decides who may finish, and outputs are moved in only by the holder. Real rows, the
tiny model, both databases."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from celery import Celery

from svdfarm.db import Database
from svdfarm.jobs import submit_job, validate_submission
from svdfarm.lifecycle import By
from svdfarm.models import Job, Worker, utcnow
from svdfarm.settings import Settings
from svdfarm.states import Actor, AttemptOutcome, ClaimOutcome, ErrorClass, JobState, RunOutcome
from svdfarm.storage import Storage
from tests.conftest import DATABASES
from tests.factories import png_bytes
from worker.execute import Claimed, _claim, _End, _finish, run_job


def submit(db: Database, settings: Settings) -> uuid.UUID:
    """Record and enqueue a small job as the web does."""
    from svdfarm.celery_app import create_celery

    raw = {"num_frames": "2", "num_inference_steps": "1", "seed": "5", "decode_chunk_size": "2"}
    submission = validate_submission(settings, raw, png_bytes(), "in.png")
    celery: Celery = create_celery(settings)
    with db.session() as session:
        return submit_job(session, celery, settings, submission, by=By(Actor.API)).id


def load(db: Database, job_id: uuid.UUID) -> Job:
    """The job with its attempts."""
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.attempts  # noqa: B018 - loaded before the session closes
        return job


def outputs(settings: Settings, job_id: uuid.UUID) -> list[str]:
    """Names of the job's video files on disk."""
    return sorted(p.name for p in Storage(settings.storage_dir).path(str(job_id)).glob("*.mp4"))


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_second_delivery_after_success_changes_nothing(db: Database, settings: Settings) -> None:
    """The duplicate finds the job succeeded: no attempt, the video untouched."""
    job_id = submit(db, settings)
    assert run_job(db, settings, str(job_id), "w1@test") == "succeeded"
    video = Storage(settings.storage_dir).path(load(db, job_id).video_key or "")
    before = (video.read_bytes(), video.stat().st_mtime_ns)
    assert run_job(db, settings, str(job_id), "w2@test") is RunOutcome.FINISHED
    assert (video.read_bytes(), video.stat().st_mtime_ns) == before
    assert len(load(db, job_id).attempts) == 1
    assert outputs(settings, job_id) == ["video.mp4"]


def claimed_long_ago(db: Database, job_id: uuid.UUID) -> None:
    """Date the job's claim a minute back: its claimer had all the time it needed to write
    its first attempt, so a job without one is a lost delivery."""
    with db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.started_at = utcnow() - timedelta(minutes=1)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_stale_claim_cannot_finish_or_overwrite(db: Database, settings: Settings) -> None:
    """Worker A claims, is taken for lost, worker B renders the job to success; when A then
    finishes, its output is dropped and B's video and records stay as they are."""
    job_id = submit(db, settings)
    with db.begin() as session:  # A's heartbeats stopped a minute ago
        session.add(
            Worker(
                hostname="a@test",
                capabilities={"device": "cpu"},
                queues=[],
                last_heartbeat=utcnow() - timedelta(minutes=1),
            )
        )
    stale = _claim(db, settings, job_id, "a@test")
    assert isinstance(stale, Claimed)
    claimed_long_ago(db, job_id)
    # A is offline, so nothing live holds the job: B's delivery takes it over.
    assert run_job(db, settings, str(job_id), "b@test") == "succeeded"
    job = load(db, job_id)
    assert job.state is JobState.SUCCEEDED and job.claim_token != stale.token
    storage = Storage(settings.storage_dir)
    video = storage.path(job.video_key or "")
    good = video.read_bytes()

    rendered = storage.path(Storage.key(job_id, f"video.{stale.token}.mp4"))
    rendered.write_bytes(b"stale render")
    won = _finish(
        db,
        settings,
        stale,
        job_id=job_id,
        hostname="a@test",
        end=_End(RunOutcome.SUCCEEDED, values={"video_key": Storage.key(job_id, "video.mp4")}),
        outputs={rendered: video},
    )
    assert won is False
    assert video.read_bytes() == good and not rendered.exists()
    assert outputs(settings, job_id) == ["video.mp4"]
    after = load(db, job_id)
    assert [(a.worker, a.outcome, a.error_class) for a in after.attempts] == [
        ("a@test", AttemptOutcome.FAILED, ErrorClass.WORKER_LOST),
        ("b@test", AttemptOutcome.SUCCEEDED, None),
    ]
    assert after.finished_at == job.finished_at


def test_a_stale_claim_cannot_fail_a_job_either(db: Database, settings: Settings) -> None:
    """A's late failure report does not touch the job B now holds."""
    job_id = submit(db, settings)
    stale = _claim(db, settings, job_id, "a@test")
    assert _claim(db, settings, job_id, "b@test") is ClaimOutcome.RUNNING_ELSEWHERE, "A claimed it"
    claimed_long_ago(db, job_id)
    fresh = _claim(db, settings, job_id, "b@test")
    assert isinstance(stale, Claimed) and isinstance(fresh, Claimed)
    failed = _End(RunOutcome.FAILED, error="boom")
    assert not _finish(db, settings, stale, job_id=job_id, hostname="a@test", end=failed)
    assert load(db, job_id).state is JobState.RUNNING
    assert _finish(db, settings, fresh, job_id=job_id, hostname="b@test", end=failed)
    assert load(db, job_id).state is JobState.FAILED
