"""Running a job from its id, in process: attempts, progress, failure records, idempotency."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from svdfarm import lifecycle
from svdfarm.db import Database
from svdfarm.lifecycle import By
from svdfarm.models import Attempt, Job
from svdfarm.settings import Settings
from svdfarm.states import Actor, AttemptOutcome, ErrorClass, JobState, RunOutcome
from svdfarm.storage import FileStore, Store
from tests.conftest import DATABASES
from tests.factories import png_bytes
from tests.media import probe_video
from tests.rows import job_with_attempts, submit_small_job
from worker.execute import run_job

_submit = submit_small_job
_job = job_with_attempts


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_success_records_one_attempt_and_the_outputs(db: Database, settings: Settings) -> None:
    """A job succeeds with one attempt, its MP4 and poster stored, progress full."""
    job_id = _submit(db, settings)
    assert run_job(db, settings, str(job_id), "w1@test") == "succeeded"
    job = _job(db, job_id)
    assert job.state is JobState.SUCCEEDED
    assert job.progress == 1.0 and job.phase == "done"
    assert job.started_at is not None and job.finished_at is not None
    assert job.finished_at >= job.started_at
    [attempt] = job.attempts
    assert attempt.outcome is AttemptOutcome.SUCCEEDED
    assert attempt.worker == "w1@test"
    assert attempt.plan_name and attempt.plan["device"] == "cpu"
    assert attempt.duration_s is not None and attempt.duration_s > 0
    assert attempt.peak_memory_bytes is not None and attempt.peak_memory_bytes > 10 * 2**20
    storage = FileStore(settings.storage_dir)
    assert probe_video(storage.path(job.video_key or ""))["frames"] == 4
    assert storage.exists(job.poster_key)
    # Stored under the claim's names, and nothing else: the temporary render stays local.
    token = (job.video_key or "").split(".")[1]
    assert storage.list_keys(f"{job_id}/") == [
        job.input_key,
        Store.key(job_id, f"poster.{token}.png"),
        Store.key(job_id, f"video.{token}.mp4"),
    ]
    assert job.poster_key == Store.key(job_id, f"poster.{token}.png")


def test_a_finished_job_is_not_run_again(db: Database, settings: Settings) -> None:
    """A redelivered id of a succeeded job adds no attempt and keeps the video as it is."""
    job_id = _submit(db, settings)
    run_job(db, settings, str(job_id), "w1@test")
    video = FileStore(settings.storage_dir).path(_job(db, job_id).video_key or "")
    before = (video.stat().st_mtime_ns, video.read_bytes())
    assert run_job(db, settings, str(job_id), "w2@test") is RunOutcome.FINISHED
    assert len(_job(db, job_id).attempts) == 1
    assert (video.stat().st_mtime_ns, video.read_bytes()) == before


def test_an_unknown_job_id_is_ignored(db: Database, settings: Settings) -> None:
    """An id the database does not know is logged and dropped."""
    assert run_job(db, settings, str(uuid.uuid4()), "w1@test") == "missing"


def test_a_missing_model_fails_the_job_with_a_clear_message(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """The attempt records the class, type and traceback; the job says what to do."""
    broken = settings.with_overrides(model=str(tmp_path / "no-such-model"))
    job_id = _submit(db, broken)  # a job of that model (the worker renders the job's model)
    assert run_job(db, broken, str(job_id), "w1@test") == "failed"
    job = _job(db, job_id)
    assert job.state is JobState.FAILED
    assert job.error and "SVDFARM_MODEL" in job.error and "not found" in job.error
    [attempt] = job.attempts
    assert attempt.outcome is AttemptOutcome.FAILED
    assert attempt.error_class is ErrorClass.MODEL_UNAVAILABLE
    assert attempt.error_type and attempt.error_type.endswith("ModelUnavailable")
    assert attempt.traceback and "Traceback" in attempt.traceback
    assert attempt.finished_at is not None


def test_an_unexpected_error_is_recorded_with_its_traceback(
    db: Database, settings: Settings
) -> None:
    """A lost input file fails the job as 'other', with the exception and traceback kept."""
    job_id = _submit(db, settings)
    FileStore(settings.storage_dir).path(_job(db, job_id).input_key).unlink()
    assert run_job(db, settings, str(job_id), "w1@test") == "failed"
    job = _job(db, job_id)
    [attempt] = job.attempts
    assert attempt.error_class is ErrorClass.OTHER
    assert attempt.error_type == "builtins.FileNotFoundError"
    assert "FileNotFoundError" in (attempt.traceback or "")
    assert job.error and "FileNotFoundError" in job.error


def test_a_canceled_queued_job_is_skipped(db: Database, settings: Settings) -> None:
    """A job canceled while queued is never started."""
    job_id = _submit(db, settings)
    with db.begin() as session:
        lifecycle.cancel(session, job_id, by=By(Actor.API))
    assert run_job(db, settings, str(job_id), "w1@test") is RunOutcome.FINISHED
    assert _job(db, job_id).attempts == []


def test_cancel_stops_a_running_job_at_the_next_step(db: Database, settings: Settings) -> None:
    """Asking to cancel mid-render stops it; the attempt and the job say canceled."""
    job_id = _submit(db, settings, num_inference_steps="40", num_frames="8")
    outcome: list[str] = []
    runner = threading.Thread(
        target=lambda: outcome.append(run_job(db, settings, str(job_id), "w1@test"))
    )
    runner.start()
    deadline = time.monotonic() + 120
    while _job(db, job_id).phase != "denoising" or _job(db, job_id).step < 1:
        assert time.monotonic() < deadline and runner.is_alive(), "the render never started"
        time.sleep(0.05)
    with db.begin() as session:
        session.get(Job, job_id).state = JobState.CANCEL_REQUESTED  # type: ignore[union-attr]
    runner.join(timeout=120)
    assert outcome == ["canceled"]
    job = _job(db, job_id)
    assert job.state is JobState.CANCELED
    assert job.step < 40
    [attempt] = job.attempts
    assert attempt.outcome is AttemptOutcome.CANCELED
    assert FileStore(settings.storage_dir).list_keys(f"{job_id}/") == [job.input_key]


def test_progress_is_written_while_denoising(db: Database, settings: Settings) -> None:
    """The job row shows the phase and a rising progress while the worker runs."""
    job_id = _submit(db, settings, num_inference_steps="12")
    runner = threading.Thread(target=run_job, args=(db, settings, str(job_id), "w1@test"))
    runner.start()
    seen: list[tuple[str, float]] = []
    while runner.is_alive():
        job = _job(db, job_id)
        seen.append((job.phase, job.progress))
        time.sleep(0.05)
    runner.join()
    phases = [phase for phase, _ in seen]
    assert "denoising" in phases
    progress = [p for _, p in seen]
    assert progress == sorted(progress)
    assert any(0 < p < 1 for p in progress)


def test_a_redelivered_running_job_closes_the_lost_attempt(
    db: Database, settings: Settings
) -> None:
    """A job left running by a dead worker is run again; the lost attempt is closed."""
    job_id = _submit(db, settings)
    with db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = JobState.RUNNING
        session.add(Attempt(job_id=job_id, number=1, worker="dead@test", plan_name="x", plan={}))
    assert run_job(db, settings, str(job_id), "w2@test") == "succeeded"
    with db.session() as session:
        attempts = session.scalars(
            select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)
        ).all()
    assert [(a.number, a.outcome) for a in attempts] == [
        (1, AttemptOutcome.FAILED),
        (2, AttemptOutcome.SUCCEEDED),
    ]
    assert "lost" in (attempts[0].message or "")


def test_render_input_bytes_are_what_was_uploaded(db: Database, settings: Settings) -> None:
    """The stored input is byte for byte the upload (the worker reads that file)."""
    job_id = _submit(db, settings)
    stored = FileStore(settings.storage_dir).path(_job(db, job_id).input_key).read_bytes()
    assert stored == png_bytes()


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_casts_off_bf16_vae_fails_then_succeeds_in_fp32(db: Database, settings: Settings) -> None:
    """The seed's error, for real: a bf16 VAE without casts fails, the ladder finishes in fp32."""
    job_id = _submit(db, settings)
    with db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.casts, job.dtypes = False, {"vae": "bf16"}
    assert run_job(db, settings, str(job_id), "w1@test") == "succeeded"
    job = _job(db, job_id)
    assert job.state is JobState.SUCCEEDED
    first, second = job.attempts
    assert first.outcome is AttemptOutcome.FAILED
    assert first.error_class is ErrorClass.DTYPE_MISMATCH
    assert first.message == "Input type (float) and bias type (c10::BFloat16) should be the same"
    assert "bf16 vae" in first.plan_name and "no casts" in first.plan_name
    assert first.traceback and "decode" in first.traceback
    assert second.outcome is AttemptOutcome.SUCCEEDED
    assert second.plan["vae"] == "fp32" and second.plan["casts"] is False
    assert second.plan["reason"] == "dtype mismatch in vae: vae to fp32"
    assert all(a.duration_s and a.peak_memory_bytes for a in (first, second))
    print(
        f"\ntwo-attempt recovery: attempt 1 ({first.plan_name}) {first.duration_s:.2f} s, "
        f"attempt 2 ({second.plan_name}) {second.duration_s:.2f} s"
    )


def test_a_failure_that_is_not_retried_makes_one_attempt(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """An error outside the ladder's classes fails the job after one attempt."""
    job_id = _submit(db, settings)
    broken = settings.with_overrides(model=str(tmp_path / "missing"))
    run_job(db, broken, str(job_id), "w1@test")
    assert len(_job(db, job_id).attempts) == 1
