"""Each delivery of a job to a worker, as its attempts record it: attempts closed when their
worker was lost or stopped, how many deliveries in a row were lost, and whether a live worker
still renders the job. :mod:`svdfarm.lifecycle` decides what the job does next.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from svdfarm.models import Attempt, Job, Worker, utcnow
from svdfarm.registry import effective_state
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, ErrorClass, JobState, WorkerState


def lost_message(worker: str) -> str:
    """The message of an attempt whose worker was lost."""
    return (
        f"The worker {worker} was lost while rendering this attempt (killed, crashed or out "
        "of host memory); the job was handed back to the queue."
    )


def poisoned_message(times: int) -> str:
    """The job's error once its workers were lost ``times`` times in a row."""
    return (
        f"The worker rendering this job was lost {times} times in a row (killed, crashed or "
        "out of host memory each time), so it is not retried again. A job that takes its "
        "worker down every time usually needs less memory: try fewer frames, a smaller size "
        "or a smaller decode chunk, or requeue it from the admin page to try once more."
    )


def lost_streak(session: Session, job_id: uuid.UUID) -> int:
    """How many of the job's latest attempts, counted back from the last, lost their worker."""
    classes = session.scalars(
        select(Attempt.error_class).where(Attempt.job_id == job_id).order_by(Attempt.number.desc())
    ).all()
    streak = 0
    for error_class in classes:
        if error_class is not ErrorClass.WORKER_LOST:
            break
        streak += 1
    return streak


def close_running_attempts(
    session: Session, job_id: uuid.UUID, *, error_class: ErrorClass, error_type: str, message: str
) -> list[Attempt]:
    """Close the job's running attempts as failed with this error; returns them."""
    now = utcnow()
    running = session.scalars(
        select(Attempt).where(Attempt.job_id == job_id, Attempt.outcome == AttemptOutcome.RUNNING)
    ).all()
    for attempt in running:
        attempt.outcome = AttemptOutcome.FAILED
        attempt.error_class = error_class
        attempt.error_type = error_type
        attempt.message = message or lost_message(attempt.worker)
        attempt.finished_at = now
        attempt.duration_s = (now - attempt.started_at).total_seconds()
    session.flush()
    return list(running)


def record_lost_delivery(session: Session, job: Job, worker: str | None = None) -> int:
    """Close the job's running attempts as *worker lost* and return the lost streak.

    A worker that died before its first attempt began (loading the model, say) left no
    attempt: one is recorded, so every lost delivery counts towards the limit.
    """
    closed = close_running_attempts(
        session, job.id, error_class=ErrorClass.WORKER_LOST, error_type="WorkerLost", message=""
    )
    if not closed:
        now = utcnow()
        if worker is None:
            worker = session.scalar(select(Worker.hostname).where(Worker.current_job_id == job.id))
        number = session.scalar(
            select(func.coalesce(func.max(Attempt.number), 0)).where(Attempt.job_id == job.id)
        )
        session.add(
            Attempt(
                job_id=job.id,
                number=(number or 0) + 1,
                worker=worker or "unknown",
                plan_name="(lost before its first attempt began)",
                plan={},
                started_at=job.started_at or now,
                finished_at=now,
                outcome=AttemptOutcome.FAILED,
                error_class=ErrorClass.WORKER_LOST,
                error_type="WorkerLost",
                message=lost_message(worker or "unknown"),
            )
        )
        session.flush()
    return lost_streak(session, job.id)


def running_elsewhere(session: Session, settings: Settings, job: Job, hostname: str) -> bool:
    """True when a live worker other than ``hostname`` is still rendering the job.

    Its heartbeat must be fresh, and its row must name the job as the one it runs (the
    heartbeat clears that when the process rendering it died) or it must not have beaten
    since its attempt began: a job requeued once can be delivered twice at the same moment,
    and the second delivery must not take it from the first before that one's heartbeat
    could say so. The caller retries, and claims the job once a beat shows the owner lost it.
    """
    running = session.execute(
        select(Attempt.worker, Attempt.started_at).where(
            Attempt.job_id == job.id, Attempt.outcome == AttemptOutcome.RUNNING
        )
    ).all()
    if not running:
        # Claimed, but its attempt row is not written yet (a moment later, unless the
        # claimer died): give it the time a worker has to prove it is alive.
        window = timedelta(seconds=settings.offline_after_s)
        return job.started_at is not None and utcnow() - job.started_at <= window
    started: dict[str, datetime] = {}
    for worker, began in running:
        if worker != hostname:
            started[worker] = max(began, started.get(worker, began))
    if not started:
        return False
    workers = session.scalars(select(Worker).where(Worker.hostname.in_(started))).all()
    return any(
        effective_state(w, settings) is not WorkerState.OFFLINE
        and (w.current_job_id == job.id or w.last_heartbeat <= started[w.hostname])
        for w in workers
    )


def jobs_running_on(session: Session, worker: str) -> list[uuid.UUID]:
    """The running jobs whose open attempt is ``worker``'s, or that its row names as its own
    (claimed, its attempt not written yet)."""
    found = set(
        session.scalars(
            select(Attempt.job_id)
            .join(Job, Job.id == Attempt.job_id)
            .where(
                Attempt.worker == worker,
                Attempt.outcome == AttemptOutcome.RUNNING,
                Job.state == JobState.RUNNING,
            )
        )
    )
    row = session.get(Worker, worker)
    if row is not None and row.current_job_id is not None:
        job = session.get(Job, row.current_job_id)
        if job is not None and job.state is JobState.RUNNING:
            found.add(job.id)
    return sorted(found)
