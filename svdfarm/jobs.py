"""Submitting jobs: validate, record, store the input, then enqueue; in that order.

Nothing is written or enqueued for a refused request. A job row is committed before its id
goes on the queue, so a worker never receives an id the database does not know.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from svdfarm.celery_app import enqueue_render
from svdfarm.images import ImageError, ImageInfo, inspect_image
from svdfarm.models import Job, utcnow
from svdfarm.params import ParamError, RenderParams, parse_params
from svdfarm.queues import Route, Unroutable, route
from svdfarm.registry import online_queues
from svdfarm.settings import Settings
from svdfarm.states import JobState
from svdfarm.storage import Storage

log = logging.getLogger(__name__)


class QueueUnavailable(RuntimeError):
    """The job was recorded but its id could not be put on the queue."""


@dataclass(frozen=True)
class Submission:
    """A request that passed validation, ready to be recorded."""

    params: RenderParams
    image: ImageInfo
    data: bytes
    filename: str


def validate_submission(
    settings: Settings, fields: Mapping[str, Any], data: bytes | None, filename: str
) -> Submission:
    """Check the image and every field; raise ParamError (field -> message) with all problems."""
    errors: dict[str, str] = {}
    status = 400
    info: ImageInfo | None = None
    if data is None:
        errors["image"] = "Choose an image to animate (PNG, JPEG or WebP)."
    else:
        try:
            info = inspect_image(data, settings.max_upload_bytes, settings.max_image_pixels)
        except ImageError as exc:
            errors["image"], status = str(exc), exc.status
    size = (info.width, info.height) if info else (1, 1)
    try:
        params = parse_params(fields, size, settings.model)
    except ParamError as exc:
        errors.update(exc.errors)
    else:
        try:
            _route(settings, params, ())
        except Unroutable as exc:
            errors["job"] = str(exc)
    if errors or info is None or data is None:
        raise ParamError(errors, status)
    return Submission(params=params, image=info, data=data, filename=filename[:255])


def _route(settings: Settings, params: RenderParams, online: Iterable[str]) -> Route:
    """The queue a job goes to (raises Unroutable when no worker class could run it)."""
    return route(
        params.num_frames,
        params.width,
        params.height,
        params.decode_chunk_size,
        params.precision,
        allow_cpu=settings.allow_cpu,
        online_queues=online,
    )


def submit_job(session: Session, celery: Celery, settings: Settings, submission: Submission) -> Job:
    """Record a validated submission, store its image, commit, and enqueue its id."""
    storage = Storage(settings.storage_dir)
    job_id = uuid.uuid4()
    routed = _route(settings, submission.params, online_queues(session, settings))
    input_key = Storage.key(job_id, f"input.{submission.image.extension}")
    job = Job(
        id=job_id,
        state=JobState.QUEUED,
        model=settings.model,
        input_key=input_key,
        input_filename=submission.filename,
        queue=routed.queue,
        memory_estimate_bytes=routed.memory_bytes,
        **submission.params.as_dict(),
    )
    session.add(job)
    try:
        session.flush()
        storage.write_bytes(input_key, submission.data)
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete_job(job_id)
        raise
    try:
        enqueue_render(celery, str(job_id), routed.queue)
    except Exception as exc:
        log.exception("could not enqueue job %s", job_id)
        job.state = JobState.FAILED
        job.error = f"The job could not be queued ({type(exc).__name__}: {exc}). Try again later."
        job.finished_at = utcnow()
        session.commit()
        raise QueueUnavailable(job.error) from exc
    return job
