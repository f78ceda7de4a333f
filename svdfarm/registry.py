"""The worker registry as the web reads it: who is online, what they consume, why a job waits.

A worker is online while its heartbeats keep coming; three missed beats make it offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from svdfarm.models import Job, Worker, utcnow
from svdfarm.queues import parse_queue
from svdfarm.settings import Settings
from svdfarm.states import JobState, WorkerState


def effective_state(worker: Worker, settings: Settings, now: datetime | None = None) -> WorkerState:
    """The worker's state, offline when its last heartbeat is too old."""
    now = now or utcnow()
    if now - worker.last_heartbeat > timedelta(seconds=settings.offline_after_s):
        return WorkerState.OFFLINE
    return worker.state


def online_workers(session: Session, settings: Settings) -> Sequence[Worker]:
    """Workers that are not offline, by hostname.

    The database leaves out every worker whose heartbeat is too old, so a table that keeps
    the rows of long-gone workers costs the status page and the submit nothing.
    """
    now = utcnow()
    recent = now - timedelta(seconds=settings.offline_after_s)
    rows = session.scalars(
        select(Worker).where(Worker.last_heartbeat >= recent).order_by(Worker.hostname)
    ).all()
    return [w for w in rows if effective_state(w, settings, now) is not WorkerState.OFFLINE]


def online_queues(session: Session, settings: Settings) -> set[str]:
    """Every queue at least one online worker consumes and will take new jobs from.

    A draining worker is finishing its last job: routing does not count on it.
    """
    return {
        q
        for w in online_workers(session, settings)
        if w.state is not WorkerState.DRAINING
        for q in w.queues
    }


def waiting_reason(session: Session, settings: Settings, job: Job) -> str | None:
    """Why a queued job waits, for its status page: no worker for its class, or its place."""
    if job.state is not JobState.QUEUED or not job.queue:
        return None
    consumers = [w for w in online_workers(session, settings) if job.queue in w.queues]
    if not consumers:
        try:
            wanted = parse_queue(job.queue).describe()
        except ValueError:
            wanted = f"a worker on queue {job.queue}"
        return f"waiting: no worker online that can take it ({wanted} is needed)"
    ahead = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.queue == job.queue, Job.state == JobState.QUEUED, Job.created_at < job.created_at
        )
    )
    busy = sum(1 for w in consumers if w.current_job_id is not None)
    return (
        f"waiting: {ahead or 0} job(s) ahead in queue {job.queue}; "
        f"{len(consumers)} worker(s) can take it, {busy} busy"
    )
