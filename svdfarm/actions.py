"""What people do to jobs: cancel, requeue with overrides, delete, list and show.

The admin pages, the API, the status page and ``svdfarm jobs`` all call these. Each returns
a :class:`JobChange` saying what happened and why, in words for the page or the terminal;
the moves themselves are :mod:`svdfarm.lifecycle`'s (conditional, each with its event). A
requeued job is committed before its id goes back on the queue and, as at submit, stays
queued for the reaper when the broker refuses it. Attempts are kept as the job's history; a
worker numbers the next ones after them and starts a fresh retry ladder. No torch, no Flask.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from svdfarm import lifecycle
from svdfarm.catalog import model_shape, queue_key
from svdfarm.jobs import dispatch_after_submit
from svdfarm.lifecycle import By
from svdfarm.models import Job, JobEvent
from svdfarm.queues import Unroutable, parse_queue, queue_model, route, with_model
from svdfarm.registry import online_queues
from svdfarm.settings import Settings
from svdfarm.states import EventType, JobState
from svdfarm.storage import open_store

log = logging.getLogger(__name__)

#: The per-component dtypes of "force fp32": the ladder's last resort, chosen up front.
FP32_DTYPES = {"image_encoder": "fp32", "unet": "fp32", "vae": "fp32"}
#: States a job may be requeued from: it ended without a video and nothing runs it.
REQUEUEABLE = lifecycle.sources("requeue")


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


@dataclass(frozen=True)
class Overrides:
    """What an operator changes when requeueing: fp32 everywhere, a queue, casts off."""

    force_fp32: bool = False
    queue: str | None = None
    casts_off: bool = False

    def describe(self) -> str:
        """The overrides as a person reads them, e.g. ``fp32, casts off``; empty for none."""
        parts = [
            "fp32" if self.force_fp32 else "",
            f"queue {self.queue}" if self.queue else "",
            "casts off" if self.casts_off else "",
        ]
        return ", ".join(p for p in parts if p)

    def columns(self, session: Session, settings: Settings, job: Job) -> dict[str, Any]:
        """The column values these overrides set on ``job``; raises Unroutable when fp32
        cannot be routed.

        The precision the user asked for stays as asked: "force fp32" is an override, held in
        ``dtypes`` (which the worker's first plan applies over the precision) and shown as one.
        """
        values: dict[str, Any] = {}
        if self.force_fp32:
            values["dtypes"] = dict(FP32_DTYPES)
            if self.queue is None:
                # fp32 needs more memory and an fp32 queue: route again as submit would.
                routed = route(
                    job.num_frames,
                    job.width,
                    job.height,
                    job.decode_chunk_size,
                    "fp32",
                    allow_cpu=settings.allow_cpu,
                    online_queues=online_queues(session, settings),
                    shape=model_shape(job.model, settings.models_dir),
                    model_key=queue_key(settings.catalog, job.model),
                )
                values["queue"] = routed.queue
                values["memory_estimate_bytes"] = routed.memory_bytes
        if self.casts_off:
            values["casts"] = False
        if self.queue is not None:
            # A class's bare name means that class for the job's own model.
            bare = queue_model(self.queue) is None
            key = queue_key(settings.catalog, job.model) if bare else ""
            values["queue"] = with_model(self.queue, key)
        return values


def requeue_jobs(
    session: Session,
    celery: Celery,
    settings: Settings,
    job_ids: Iterable[uuid.UUID | str],
    *,
    by: By,
    force_fp32: bool = False,
    queue: str | None = None,
    casts_off: bool = False,
) -> list[JobChange]:
    """Put failed or canceled jobs back in the queue, with optional overrides; commits.

    ``force_fp32`` sets every component to fp32 (routed again to an fp32 queue unless
    ``queue`` is given; the requested precision is kept); ``queue`` forces a queue (checked
    against the naming scheme: ValueError before anything changes); ``casts_off`` turns
    boundary casts off. Jobs in other states are skipped with the reason. Returns one
    :class:`JobChange` per id, in order.
    """
    overrides = Overrides(force_fp32, check_queue(queue), casts_off)
    return [_requeue_one(session, celery, settings, raw, overrides, by) for raw in job_ids]


def _requeue_one(
    session: Session,
    celery: Celery,
    settings: Settings,
    raw: uuid.UUID | str,
    overrides: Overrides,
    by: By,
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
    if job.input_expired_at is not None:
        return JobChange(
            str(key),
            False,
            f"Job {key}'s input image was deleted on {job.input_expired_at:%Y-%m-%d %H:%M} UTC "
            "(SVDFARM_INPUT_RETENTION): submit the image again as a new job.",
        )
    try:
        values = overrides.columns(session, settings, job)
    except Unroutable as exc:
        return JobChange(str(key), False, f"Job {key} was not requeued: {exc}")
    if not lifecycle.requeue(session, key, by=by, overrides=values):
        session.rollback()
        return JobChange(str(key), False, f"Job {key} changed state meanwhile; not requeued.")
    session.commit()
    session.refresh(job)
    dispatch_after_submit(session, celery, settings, [job.queue])
    extra = overrides.describe()
    text = f"Job {key} requeued on {job.queue}" + (f" ({extra})." if extra else ".")
    session.refresh(job)
    if job.published_at is None:
        last = session.scalar(
            select(JobEvent.type)
            .where(JobEvent.job_id == job.id)
            .order_by(JobEvent.id.desc())
            .limit(1)
        )
        text += (
            " The broker is unreachable: it is sent once it is back."
            if last is EventType.PUBLISH_FAILED
            else " It waits for a free worker of its class."
        )
    return JobChange(str(key), True, text)


def cancel_job(session: Session, job_id: uuid.UUID | str, *, by: By) -> JobChange:
    """Cancel a job: a queued one at once, a running one at its worker's next step. Commits."""
    key, job, problem = _load(session, job_id)
    if key is None or job is None:
        return JobChange(str(job_id), False, problem)
    try:
        left = lifecycle.cancel(session, key, by=by)
    except lifecycle.IllegalMove:
        session.rollback()
        session.refresh(job)
        return JobChange(
            str(key), False, f"Job {key} is {job.state.label}: there is nothing to cancel."
        )
    session.commit()
    session.refresh(job)
    return JobChange(str(key), True, f"Job {key} is {left.label}.")


def delete_job(session: Session, settings: Settings, job_id: uuid.UUID | str) -> JobChange:
    """Delete a job that no worker is running: its row, its attempts (cascade), its files.

    A running job (or one whose cancel is pending) is refused: cancel it first. Commits
    before removing the files, so a failed commit never leaves a row without its input.
    """
    key, job, problem = _load(session, job_id)
    if key is None or job is None:
        return JobChange(str(job_id), False, problem)
    if job.state.active:
        return JobChange(
            str(key),
            False,
            f"Job {key} is {job.state.label}: cancel it and delete it once it has stopped.",
        )
    result = session.execute(
        delete(Job)
        .where(Job.id == key, Job.state.not_in(JobState.active_states()))
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return JobChange(str(key), False, f"Job {key} started running meanwhile; not deleted.")
    session.commit()
    session.expunge(job)
    open_store(settings).delete_job(key)
    return JobChange(str(key), True, f"Job {key} deleted with its files.")


def list_jobs(session: Session, *, state: JobState | None = None, limit: int = 50) -> list[Job]:
    """The newest jobs first, at most ``limit``, in ``state`` when given."""
    stmt = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit)
    if state is not None:
        stmt = stmt.where(Job.state == state)
    return list(session.scalars(stmt))


def show_job(session: Session, job_id: uuid.UUID | str) -> tuple[Job, list[JobEvent]]:
    """A job with its events in order; LookupError says why there is none."""
    key, job, problem = _load(session, job_id)
    if key is None or job is None:
        raise LookupError(problem)
    return job, lifecycle.events_of(session, key)
