"""Finding a job from the id in a URL, and describing it for the API and the pages."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from flask import abort, current_app, url_for
from sqlalchemy.orm import Session

from svdfarm.models import Attempt, Job
from svdfarm.registry import waiting_reason
from svdfarm.states import JobState

PHASE_LABELS = {
    "queued": "Waiting in the queue",
    "loading": "Loading the model",
    "denoising": "Denoising",
    "decoding": "Decoding frames",
    "encoding": "Encoding the MP4",
    "done": "Done",
}


def describe_job(session: Session, job: Job) -> dict[str, Any]:
    """:func:`job_json` with the waiting reason read from the worker registry."""
    settings = current_app.config["SVDFARM_SETTINGS"]
    return job_json(job, waiting_reason(session, settings, job))


def find_job(session: Session, job_id: str) -> Job:
    """The job with this id, or a 404 that says so."""
    try:
        key = uuid.UUID(job_id)
    except ValueError:
        abort(404, description=f"No job with id {job_id[:64]!r}: job ids are UUIDs.")
    job = session.get(Job, key)
    if job is None:
        abort(404, description=f"No job with id {job_id}.")
    return job


def _iso(value: datetime | None) -> str | None:
    """A timestamp as ISO 8601, or None."""
    return value.isoformat() if value else None


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    """One attempt as the public API shows it (no traceback: that is for the admin)."""
    return {
        "number": attempt.number,
        "worker": attempt.worker,
        "plan_name": attempt.plan_name,
        "plan": attempt.plan,
        "outcome": attempt.outcome.value,
        "error_class": attempt.error_class.value if attempt.error_class else None,
        "error_type": attempt.error_type,
        "message": attempt.message,
        "started_at": _iso(attempt.started_at),
        "finished_at": _iso(attempt.finished_at),
        "duration_s": attempt.duration_s,
        "peak_memory_bytes": attempt.peak_memory_bytes,
    }


def phase_text(job: Job) -> str:
    """The job's phase as a person reads it, with the step while denoising."""
    label = PHASE_LABELS.get(job.phase, job.phase)
    if job.phase == "denoising":
        label += f" (step {job.step}/{job.num_inference_steps})"
    return label


def job_json(job: Job, waiting: str | None = None) -> dict[str, Any]:
    """The job as ``GET /api/v1/jobs/<id>`` answers it (``waiting``: why a queued job waits)."""
    done = job.state is JobState.SUCCEEDED and job.video_key
    return {
        "id": str(job.id),
        "state": job.state.value,
        "phase": job.phase,
        "phase_text": waiting or phase_text(job),
        "waiting": waiting,
        "queue": job.queue,
        "memory_estimate_bytes": job.memory_estimate_bytes,
        "progress": round(job.progress, 4),
        "step": job.step,
        "model": job.model,
        "params": job.params(),
        "input_filename": job.input_filename,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "attempts": [attempt_json(a) for a in job.attempts],
        "video_url": url_for("pages.video", job_id=job.id, _external=True) if done else None,
        "poster_url": (
            url_for("pages.poster", job_id=job.id, _external=True) if job.poster_key else None
        ),
        "error": job.error,
        "status_url": url_for("api.get_job", job_id=job.id, _external=True),
        "page_url": url_for("pages.job", job_id=job.id, _external=True),
    }
