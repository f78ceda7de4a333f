"""The reaper: the database's promise that every accepted job reaches a terminal state.

Celery is transport, and transports lose messages: a worker killed with SIGKILL leaves its
job's message unacknowledged in Redis until the visibility timeout (hours, on purpose: see
docs/RELIABILITY.md), a Redis without persistence forgets its queues when it restarts, and
the embedded filesystem broker deletes a message as soon as a worker reads it. So the
reaper looks at the database, the source of truth, and repairs:

* a job left **running** by a worker that went offline (three missed heartbeats) and no live
  worker holds: its attempt is recorded as *worker lost* and the job is queued and published
  again, or failed with the reason once its worker was lost ``SVDFARM_MAX_DELIVERIES`` times
  in a row (a poison job that kills every worker it lands on);
* a job canceled while its worker was lost: canceled;
* a **queued** job whose id the broker does not hold (Redis and the embedded broker can be
  read): published again.

Every change is a conditional UPDATE on what the reaper saw, so any number of reapers (each
worker runs one in its heartbeat thread; ``svdfarm reap`` runs one by hand) never double a
job. A message that comes back later (Redis restores unacknowledged ones after the
visibility timeout) finds the job claimed or finished and does nothing.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from svdfarm.db import Database
from svdfarm.models import Attempt, Job, Worker, utcnow
from svdfarm.registry import effective_state
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, ErrorClass, JobState, WorkerState

log = logging.getLogger(__name__)

#: kombu's Redis transport keeps unacknowledged messages in this hash, and a queue's
#: messages of priority p > 0 in the list ``<queue>\x06\x16<p>``.
REDIS_UNACKED_KEY = "unacked"
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)


@dataclass
class Reaped:
    """What one pass of the reaper did, by job id."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        """True when the pass changed anything."""
        return bool(self.requeued or self.failed or self.canceled or self.republished)


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


def record_lost_delivery(session: Session, job: Job, worker: str | None = None) -> int:
    """Close the job's running attempts as *worker lost* and return the lost streak.

    A worker that died before its first attempt began (loading the model, say) left no
    attempt: one is recorded, so every lost delivery counts towards the limit.
    """
    now = utcnow()
    running = session.scalars(
        select(Attempt).where(Attempt.job_id == job.id, Attempt.outcome == AttemptOutcome.RUNNING)
    ).all()
    for attempt in running:
        attempt.outcome = AttemptOutcome.FAILED
        attempt.error_class = ErrorClass.WORKER_LOST
        attempt.error_type = "WorkerLost"
        attempt.message = lost_message(attempt.worker)
        attempt.finished_at = now
        attempt.duration_s = (now - attempt.started_at).total_seconds()
    if not running:
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


def settle_lost_job(session: Session, settings: Settings, job: Job, seen: datetime) -> str | None:
    """Decide a job whose worker was lost: ``failed``, ``canceled`` or ``requeued``.

    The change only happens if the job still has the state and ``updated_at`` the caller saw
    (``seen``); otherwise someone else handled it and None is returned.
    """
    state = job.state
    streak = record_lost_delivery(session, job)
    now = utcnow()
    values: dict[str, Any]
    if state is JobState.CANCEL_REQUESTED:
        outcome, values = "canceled", {"state": JobState.CANCELED, "phase": "done"}
        values["finished_at"] = now
    elif streak >= settings.max_deliveries:
        outcome = "failed"
        values = {"state": JobState.FAILED, "error": poisoned_message(streak), "finished_at": now}
    else:
        outcome = "requeued"
        values = {"state": JobState.QUEUED, "phase": "queued", "progress": 0.0, "step": 0}
    changed = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == state, Job.updated_at == seen)
        .values(claim_token=None, updated_at=now, **values)
    )
    if not changed.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return None
    session.execute(
        update(Worker).where(Worker.current_job_id == job.id).values(current_job_id=None)
    )
    return outcome


def _held_by_live_worker(session: Session, settings: Settings, job_id: uuid.UUID) -> bool:
    """True when a worker whose heartbeats still come names the job as the one it runs."""
    workers = session.scalars(select(Worker).where(Worker.current_job_id == job_id)).all()
    return any(effective_state(w, settings) is not WorkerState.OFFLINE for w in workers)


def reap(db: Database, settings: Settings, celery: Celery | None = None) -> Reaped:
    """One pass: settle jobs of lost workers, then publish queued jobs the broker lost.

    Without ``celery`` (no way to publish), requeued jobs wait for the next pass that has one.
    """
    from svdfarm.jobs import publish

    reaped = Reaped()
    stale_before = utcnow() - timedelta(seconds=settings.offline_after_s)
    with db.session() as session:
        anyone_beating = session.scalar(
            select(func.count()).select_from(Worker).where(Worker.last_heartbeat >= stale_before)
        )
        # No worker beat lately: the database (or this clock) was away, not every worker.
        # Judging now would take live workers' jobs for lost; nobody could run them anyway.
        candidates = (
            []
            if not anyone_beating
            else session.scalars(
                select(Job).where(
                    Job.state.in_((JobState.RUNNING, JobState.CANCEL_REQUESTED)),
                    Job.updated_at < stale_before,
                )
            ).all()
        )
    for candidate in candidates:
        with db.begin() as session:
            job = session.get(Job, candidate.id)
            if job is None or job.state is not candidate.state:
                continue
            if _held_by_live_worker(session, settings, job.id):
                continue
            outcome = settle_lost_job(session, settings, job, job.updated_at)
        if outcome is not None:
            log.warning("job %s: its worker was lost; %s", job.id, outcome)
            getattr(reaped, outcome).append(str(job.id))
    if celery is None:
        return reaped
    for job in republish_candidates(db, settings, celery, set(reaped.requeued)):
        if publish(celery, job):
            reaped.republished.append(str(job.id))
    return reaped


def republish_candidates(
    db: Database, settings: Settings, celery: Celery, just_requeued: set[str]
) -> list[Job]:
    """Queued jobs the broker does not hold, each touched so only one reaper publishes it.

    Jobs just requeued by this pass are always included; others only once they have waited
    longer than the grace period (so a submit between commit and publish is left alone), and
    only on brokers whose messages can be read (Redis, the embedded broker).
    """
    grace = timedelta(seconds=max(2 * settings.offline_after_s, 5.0))
    with db.session() as session:
        queued = session.scalars(select(Job).where(Job.state == JobState.QUEUED)).all()
    if not queued:
        return []
    old = [j for j in queued if str(j.id) in just_requeued or j.updated_at < utcnow() - grace]
    if not old:
        return []
    held = broker_held_ids(settings, celery, {j.queue for j in old})
    chosen: list[Job] = []
    for job in old:
        if str(job.id) not in just_requeued and (held is None or str(job.id) in held):
            continue
        with db.begin() as session:
            touched = session.execute(
                update(Job)
                .where(
                    Job.id == job.id,
                    Job.state == JobState.QUEUED,
                    Job.updated_at == job.updated_at,
                )
                .values(updated_at=utcnow())
            )
            if touched.rowcount:  # type: ignore[attr-defined]
                chosen.append(job)
    return chosen


def _task_id(message: Any) -> str | None:
    """The task id in a kombu message (a dict, or its JSON text)."""
    if isinstance(message, (bytes, str)):
        try:
            message = json.loads(message)
        except ValueError:
            return None
    if isinstance(message, list) and message:  # Redis's unacked entries: [message, ex, rk]
        return _task_id(message[0])
    if isinstance(message, dict):
        headers = message.get("headers") or {}
        task_id = headers.get("id") or (message.get("properties") or {}).get("correlation_id")
        return str(task_id) if task_id else None
    return None


def broker_held_ids(settings: Settings, celery: Celery, queues: Iterable[str]) -> set[str] | None:
    """Ids of the tasks the broker holds for ``queues`` (waiting or delivered, unacked).

    None when this broker's messages cannot be read without consuming them (AMQP): then
    nothing is republished, and RabbitMQ's durable queues keep what they were given.
    """
    if settings.embedded_broker:
        folder = settings.broker_dir / "queue"
        ids: set[str] = set()
        for path in folder.glob("*.msg") if folder.is_dir() else ():
            try:
                task_id = _task_id(path.read_bytes())
            except OSError:  # taken by a worker meanwhile
                continue
            if task_id:
                ids.add(task_id)
        return ids
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    with celery.connection_for_read() as connection:
        client = connection.default_channel.client
        ids = set()
        for queue in queues:
            for step in REDIS_PRIORITY_STEPS:
                key = queue if step == 0 else f"{queue}{REDIS_PRIORITY_SEP}{step}"
                for raw in client.lrange(key, 0, -1):
                    task_id = _task_id(raw)
                    if task_id:
                        ids.add(task_id)
        for raw in client.hvals(REDIS_UNACKED_KEY):
            task_id = _task_id(raw)
            if task_id:
                ids.add(task_id)
        return ids
