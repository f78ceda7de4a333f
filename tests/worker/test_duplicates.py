"""A job delivered twice never yields two outputs nor overwrites a succeeded job: the claim
token decides who may finish, outputs are stored under the claim's names and the job points at
the holder's only; a lost claim's outputs are swept. Real rows, the tiny model, both
databases."""

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
from svdfarm.storage import FileStore, Store
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
        return submit_job(
            session, celery, settings, submission, by=By(Actor.API), owner="addr:127.0.0.1"
        ).id


def load(db: Database, job_id: uuid.UUID) -> Job:
    """The job with its attempts."""
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.attempts  # noqa: B018 - loaded before the session closes
        return job


def outputs(settings: Settings, job_id: uuid.UUID) -> list[str]:
    """Names of the job's stored videos and posters."""
    keys = FileStore(settings.storage_dir).list_keys(f"{job_id}/")
    return [k.split("/")[1] for k in keys if not k.split("/")[1].startswith("input.")]


def token_of(job: Job) -> str:
    """The token of the claim the job finished under, read from its video's key."""
    return (job.video_key or "").split("/")[1].split(".")[1]


def token_names(job: Job) -> list[str]:
    """The names of the video and poster of the claim the job finished under."""
    token = token_of(job)
    assert job.poster_key == f"{job.id}/poster.{token}.png"
    return [f"poster.{token}.png", f"video.{token}.mp4"]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_second_delivery_after_success_changes_nothing(db: Database, settings: Settings) -> None:
    """The duplicate finds the job succeeded: no attempt, the video untouched."""
    job_id = submit(db, settings)
    assert run_job(db, settings, str(job_id), "w1@test") == "succeeded"
    video = FileStore(settings.storage_dir).path(load(db, job_id).video_key or "")
    before = (video.read_bytes(), video.stat().st_mtime_ns)
    assert run_job(db, settings, str(job_id), "w2@test") is RunOutcome.FINISHED
    assert (video.read_bytes(), video.stat().st_mtime_ns) == before
    job = load(db, job_id)
    assert len(job.attempts) == 1
    assert outputs(settings, job_id) == token_names(job)


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
    assert job.state is JobState.SUCCEEDED and token_of(job) != stale.token
    storage = FileStore(settings.storage_dir)
    video = storage.path(job.video_key or "")
    good = video.read_bytes()

    stale_key = Store.key(job_id, f"video.{stale.token}.mp4")
    storage.write_bytes(stale_key, b"stale render")
    won = _finish(
        db,
        settings,
        stale,
        job_id=job_id,
        hostname="a@test",
        end=_End(RunOutcome.SUCCEEDED, values={"video_key": stale_key}),
        store=storage,
        outputs=(stale_key,),
    )
    assert won is False
    assert video.read_bytes() == good and not storage.exists(stale_key)
    assert outputs(settings, job_id) == token_names(job)
    assert load(db, job_id).video_key == job.video_key
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


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_winner_sweeps_a_lost_claims_outputs(db: Database, settings: Settings) -> None:
    """A claim taken for lost had stored its video and poster; when the next claim succeeds,
    they are deleted, so exactly the job's own pair is kept."""
    job_id = submit(db, settings)
    lost = _claim(db, settings, job_id, "a@test")
    assert isinstance(lost, Claimed)
    storage = FileStore(settings.storage_dir)
    for name in (f"video.{lost.token}.mp4", f"poster.{lost.token}.png"):
        storage.write_bytes(Store.key(job_id, name), b"lost claim's output")
    claimed_long_ago(db, job_id)
    assert run_job(db, settings, str(job_id), "b@test") == "succeeded"
    job = load(db, job_id)
    assert token_of(job) != lost.token
    assert outputs(settings, job_id) == token_names(job)
