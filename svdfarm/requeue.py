"""Requeueing and deleting jobs: what the admin pages (and any script) do to failed jobs.

Every change is a conditional UPDATE or DELETE on the job's state, so a worker changing the
same row at the same time either wins cleanly or loses cleanly. A job is committed before its
id goes back on the queue, as at submit. Attempts are kept as the job's history; a worker
numbers the next ones after them and starts a fresh retry ladder. No torch, no Flask.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from svdfarm.celery_app import enqueue_render
from svdfarm.models import Job, utcnow
from svdfarm.queues import Unroutable, parse_queue, route
from svdfarm.registry import online_queues
from svdfarm.settings import Settings
from svdfarm.states import JobState
from svdfarm.storage import Storage

log = logging.getLogger(__name__)

#: The per-component dtypes of "force fp32": the ladder's last resort, chosen up front.
FP32_DTYPES = {"image_encoder": "fp32", "unet": "fp32", "vae": "fp32"}
#: States a job may be requeued from: it ended without a video and nothing runs it.
REQUEUEABLE = (JobState.FAILED, JobState.CANCELED)
#: States in which a worker may still be rendering the job.
RUNNING_STATES = (JobState.RUNNING, JobState.CANCEL_REQUESTED)


@dataclass(frozen=True)
class JobChange:
    """What happened to one job of a request: done, or skipped and why."""

    job_id: str
    done: bool
    message: str


def parse_job_id(value: uuid.UUID | str) -> uuid.UUID | None:
    """The UUID in ``value``, or None when it is not one."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value).strip())
    except ValueError:
        return None


def check_queue(queue: str | None) -> str | None:
    """A forced queue name, validated; blank means none. ValueError says what is expected."""
    name = (queue or "").strip()
    if not name:
        return None
    parse_queue(name)  # raises ValueError with the scheme in its message
    return name


def _load(session: Session, raw: uuid.UUID | str) -> tuple[uuid.UUID | None, Job | None, str]:
    """The id and row of ``raw``, with the reason when either is missing."""
    key = parse_job_id(raw)
    if key is None:
        return None, None, f"{str(raw)[:64]!r} is not a job id (job ids are UUIDs)."
    job = session.get(Job, key)
    if job is None:
        return key, None, f"No job with id {key}."
    return key, job, ""


def _overrides(
    session: Session,
    settings: Settings,
    job: Job,
    force_fp32: bool,
    queue: str | None,
    casts_off: bool,
) -> dict[str, Any]:
    """The column values the overrides set; raises Unroutable when fp32 cannot be routed."""
    values: dict[str, Any] = {}
    if force_fp32:
        values["dtypes"] = dict(FP32_DTYPES)
        values["precision"] = "fp32"
        if queue is None:
            # fp32 needs more memory and an fp32 queue: route again as submit would.
            routed = route(
                job.num_frames,
                job.width,
                job.height,
                job.decode_chunk_size,
                "fp32",
                allow_cpu=settings.allow_cpu,
                online_queues=online_queues(session, settings),
            )
            values["queue"] = routed.queue
            values["memory_estimate_bytes"] = routed.memory_bytes
    if casts_off:
        values["casts"] = False
    if queue is not None:
        values["queue"] = queue
    return values


def describe_overrides(force_fp32: bool, queue: str | None, casts_off: bool) -> str:
    """The overrides as a person reads them, e.g. ``fp32, casts off``; empty for none."""
    parts = [
        "fp32" if force_fp32 else "",
        f"queue {queue}" if queue else "",
        "casts off" if casts_off else "",
    ]
    return ", ".join(p for p in parts if p)


def requeue_jobs(
    session: Session,
    celery: Celery,
    settings: Settings,
    job_ids: Iterable[uuid.UUID | str],
    *,
    force_fp32: bool = False,
    queue: str | None = None,
    casts_off: bool = False,
) -> list[JobChange]:
    """Put failed or canceled jobs back in the queue, with optional overrides; commits.

    ``force_fp32`` sets every component to fp32 (and the precision to fp32, routed again
    unless ``queue`` is given); ``queue`` forces a queue (checked against the naming scheme:
    ValueError before anything changes); ``casts_off`` turns boundary casts off. Jobs in other
    states are skipped with the reason. Returns one :class:`JobChange` per id, in order.
    """
    forced = check_queue(queue)
    return [
        _requeue_one(session, celery, settings, raw, force_fp32, forced, casts_off)
        for raw in job_ids
    ]


def _requeue_one(
    session: Session,
    celery: Celery,
    settings: Settings,
    raw: uuid.UUID | str,
    force_fp32: bool,
    queue: str | None,
    casts_off: bool,
) -> JobChange:
    """Requeue one job; see :func:`requeue_jobs`."""
    key, job, problem = _load(session, raw)
    if key is None or job is None:
        return JobChange(str(raw), False, problem)
    if job.state not in REQUEUEABLE:
        return JobChange(
            str(key),
            False,
            f"Job {key} is {job.state.label}: only failed or canceled jobs can be requeued.",
        )
    try:
        values = _overrides(session, settings, job, force_fp32, queue, casts_off)
    except Unroutable as exc:
        return JobChange(str(key), False, f"Job {key} was not requeued: {exc}")
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == key, Job.state.in_(REQUEUEABLE))
        .values(
            state=JobState.QUEUED,
            error=None,
            progress=0.0,
            phase="queued",
            step=0,
            started_at=None,
            finished_at=None,
            updated_at=now,
            **values,
        )
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return JobChange(str(key), False, f"Job {key} changed state meanwhile; not requeued.")
    session.commit()
    session.refresh(job)
    try:
        enqueue_render(celery, str(key), job.queue)
    except Exception as exc:
        log.exception("could not enqueue job %s again", key)
        error = f"The job could not be queued ({type(exc).__name__}: {exc}). Try again later."
        session.execute(
            update(Job)
            .where(Job.id == key, Job.state == JobState.QUEUED)
            .values(state=JobState.FAILED, error=error, finished_at=utcnow(), updated_at=utcnow())
        )
        session.commit()
        session.refresh(job)
        return JobChange(str(key), False, f"Job {key}: {error}")
    extra = describe_overrides(force_fp32, queue, casts_off)
    return JobChange(
        str(key), True, f"Job {key} requeued on {job.queue}" + (f" ({extra})." if extra else ".")
    )


def delete_job(session: Session, settings: Settings, job_id: uuid.UUID | str) -> JobChange:
    """Delete a job that no worker is running: its row, its attempts (cascade), its files.

    A running job (or one whose cancel is pending) is refused: cancel it first. Commits
    before removing the files, so a failed commit never leaves a row without its input.
    """
    key, job, problem = _load(session, job_id)
    if key is None or job is None:
        return JobChange(str(job_id), False, problem)
    if job.state in RUNNING_STATES:
        return JobChange(
            str(key),
            False,
            f"Job {key} is {job.state.label}: cancel it and delete it once it has stopped.",
        )
    result = session.execute(
        delete(Job)
        .where(Job.id == key, Job.state.not_in(RUNNING_STATES))
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return JobChange(str(key), False, f"Job {key} started running meanwhile; not deleted.")
    session.commit()
    session.expunge(job)
    Storage(settings.storage_dir).delete_job(key)
    return JobChange(str(key), True, f"Job {key} deleted with its files.")
