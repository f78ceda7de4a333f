"""A full disk loses nothing: a worker that meets ENOSPC (while rendering, or while storing the
video) records the attempt as a ``storage`` failure, says what to do, keeps the input, and the
reaper queues the job again after the delay, a few times in a row at most."""

from __future__ import annotations

import errno
import uuid
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import update

from svdfarm import lifecycle
from svdfarm.db import Database
from svdfarm.jobs import submit_job, validate_submission
from svdfarm.lifecycle import By
from svdfarm.models import Job, utcnow
from svdfarm.reaper import reap
from svdfarm.settings import Settings
from svdfarm.space import STORAGE_RETRY_DELAY_S
from svdfarm.states import Actor, ErrorClass, EventType, JobState, RunOutcome
from svdfarm.storage import FileStore, open_store
from tests.factories import png_bytes
from worker.errors import classify, user_message
from worker.execute import run_job
from worker.ladder import next_plan
from worker.plans import Plan


def _full(*_: Any, **__: Any) -> None:
    """What a write on a full disk does."""
    raise OSError(errno.ENOSPC, "No space left on device")


def _submit(db: Database, settings: Settings) -> uuid.UUID:
    """Record and enqueue a small job as the API does; returns its id."""
    from svdfarm.celery_app import create_celery

    raw = {"num_frames": "2", "num_inference_steps": "1", "seed": "1"}
    submission = validate_submission(settings, raw, png_bytes(), "in.png")
    celery: Celery = create_celery(settings)
    with db.session() as session:
        return submit_job(
            session, celery, settings, submission, by=By(Actor.API), owner="addr:127.0.0.1"
        ).id


def _ended_long_ago(db: Database, job_id: uuid.UUID) -> None:
    """Move the job's end back past the retry delay (a fast clock, not a sleep)."""
    past = utcnow() - timedelta(seconds=2 * STORAGE_RETRY_DELAY_S)
    with db.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(finished_at=past))


def test_enospc_is_a_storage_error_the_ladder_does_not_retry() -> None:
    """ENOSPC, a quota or ffmpeg's words for them are ``storage``; the ladder stops (another
    dtype cannot help) and the message says the job is kept and what operators do."""
    full = OSError(errno.ENOSPC, "No space left on device")
    assert classify(full) is ErrorClass.STORAGE
    assert classify(OSError(errno.EDQUOT, "Disk quota exceeded")) is ErrorClass.STORAGE
    assert classify(RuntimeError("ffmpeg: av_interleaved_write_frame(): No space left on device"))
    assert classify(FileNotFoundError(errno.ENOENT, "gone")) is ErrorClass.OTHER
    plan = Plan("cuda", "fp16", "fp16", "fp32")
    assert next_plan(plan, ErrorClass.STORAGE, None, [plan]) is None
    message = user_message(ErrorClass.STORAGE, full)
    assert "No space left on device" in message and "goes back to the queue" in message
    assert "svdfarm cleanup" in message


@pytest.mark.parametrize("where", ["render", "store"])
def test_a_full_disk_keeps_the_job_and_queues_it_again(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """ENOSPC while writing the video (``render``) or while the store takes it (``store``):
    the job fails as a storage failure with its input kept; the reaper's pass after the delay
    queues it again (a new life in its story); after SVDFARM_MAX_DELIVERIES such lives in a row
    it stays failed."""
    if where == "render":
        monkeypatch.setattr("worker.runner.render_to_files", _full)
    else:
        monkeypatch.setattr(FileStore, "put_file", _full)
    job_id = _submit(db, settings)
    outcomes, retried = [], []
    for _ in range(settings.max_deliveries):
        outcomes.append(run_job(db, settings, str(job_id), "w1@test"))
        with db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.state is JobState.FAILED
            assert open_store(settings).exists(job.input_key)
            [failed] = [e for e in lifecycle.events_of(session, job_id)][-1:]
        assert failed.type is EventType.FAILED
        assert failed.details["error_class"] == ErrorClass.STORAGE.value
        assert not reap(db, settings).storage_retried  # not before the delay
        _ended_long_ago(db, job_id)
        retried.append(reap(db, settings).storage_retried == [str(job_id)])
    assert outcomes == [RunOutcome.FAILED] * settings.max_deliveries
    assert retried == [True] * (settings.max_deliveries - 1) + [False]
    with db.session() as session:
        types = [e.type for e in lifecycle.events_of(session, job_id)]
        job = session.get(Job, job_id)
        assert job is not None and job.state is JobState.FAILED
    assert types.count(EventType.STORAGE_RETRIED) == settings.max_deliveries - 1
    if where == "render":
        assert job.error is not None and "disk is full" in job.error
        assert job.attempts[-1].error_class is ErrorClass.STORAGE
