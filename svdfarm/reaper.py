"""The reaper: the database's promise that every accepted job reaches a terminal state.

Celery is transport, and transports lose messages: a worker acknowledges a job's message
when the render starts (so no broker timeout cuts a long render short: docs/RELIABILITY.md),
so a worker killed mid-render leaves no message behind; a Redis without persistence forgets
its queues when it restarts, and the embedded filesystem broker deletes a message as soon as
a worker reads it. So the reaper looks at the database, the source of truth, and repairs:

* a job left **running** by a worker that went offline (three missed heartbeats) and no live
  worker holds: its attempt is recorded as *worker lost* and the job is queued and published
  again, or failed with the reason once its worker was lost ``SVDFARM_MAX_DELIVERIES`` times
  in a row (a poison job that kills every worker it lands on);
* a job canceled while its worker was lost: canceled;
* a **queued** job the dispatcher sent to one worker's own queue (:mod:`svdfarm.dispatch`)
  that worker cannot take now (it went offline or is draining, flagged, or took another job
  first): published again on the job's queue, for any of its consumers, once it waited there
  :data:`DIRECT_GRACE_S`;
* a **queued** job whose id the broker does not hold: published again. Redis and the
  embedded broker can be read; AMQP (RabbitMQ) cannot be read without consuming, so there the
  database says which (:func:`unreadable_broker_lost`): a job whose last publish failed or
  never happened, and every waiting job of a queue that holds fewer messages than it has
  waiting jobs;
* a job that **failed to store its video** (a full disk, a store error) a minute ago: queued
  and published again, a few times in a row at most (:mod:`svdfarm.space`);
* **retention**: outputs and inputs of ended jobs past ``SVDFARM_RETENTION`` and
  ``SVDFARM_INPUT_RETENTION`` are deleted and the jobs marked expired (:mod:`svdfarm.retention`).

Every change is a conditional UPDATE on what the reaper saw, so any number of reapers (each
worker runs one in its heartbeat thread; ``svdfarm reap`` runs one by hand) never double a
job. A message that comes back later, or a second one for one job, finds the job claimed or
finished and does nothing.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy import and_, func, not_, or_, select
from sqlalchemy.orm import Session

from svdfarm import lifecycle, retention, space
from svdfarm.celery_app import direct_queue
from svdfarm.db import Database
from svdfarm.depths import BrokerUnavailable, queue_depths
from svdfarm.dispatch import dispatch, takes_new_jobs
from svdfarm.jobs import publish
from svdfarm.lifecycle import By
from svdfarm.models import Job, JobEvent, Worker, utcnow
from svdfarm.registry import effective_state, online_workers
from svdfarm.settings import Settings
from svdfarm.states import Actor, EventType, JobState, WorkerState

log = logging.getLogger(__name__)

#: kombu's Redis transport keeps unacknowledged messages in this hash, and a queue's
#: messages of priority p > 0 in the list ``<queue>\x06\x16<p>``.
REDIS_UNACKED_KEY = "unacked"
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
#: How long a job sent to a worker that cannot take it stays there before it is published
#: again on its queue (a moment for the send to land and for the worker to claim it).
DIRECT_GRACE_S = 5.0


@dataclass
class Reaped:
    """What one pass of the reaper did, by job id."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    #: Jobs that failed to store their video, queued again.
    storage_retried: list[str] = field(default_factory=list)
    #: Jobs whose outputs or input retention deleted.
    expired: list[str] = field(default_factory=list)
    #: Waiting jobs the pass's dispatch sent to their queues (those requeued above among them).
    dispatched: list[str] = field(default_factory=list)
    #: Jobs that waited past SVDFARM_MAX_WAIT for a class no worker has, failed.
    gave_up: list[str] = field(default_factory=list)
    #: Why the pass looked for no lost worker's job (empty when it did).
    skipped: str = ""

    def __bool__(self) -> bool:
        """True when the pass changed anything."""
        return any(self.by_outcome().values())

    def by_outcome(self) -> dict[str, list[str]]:
        """The job ids, by what the pass did to them."""
        return {
            "requeued": self.requeued,
            "failed": self.failed,
            "canceled": self.canceled,
            "republished": self.republished,
            "storage_retried": self.storage_retried,
            "expired": self.expired,
            "gave_up": self.gave_up,
            "dispatched": self.dispatched,
        }


def _held_by_live_worker(session: Session, settings: Settings, job_id: uuid.UUID) -> bool:
    """True when a worker whose heartbeats still come names the job as the one it runs."""
    workers = session.scalars(select(Worker).where(Worker.current_job_id == job_id)).all()
    return any(effective_state(w, settings) is not WorkerState.OFFLINE for w in workers)


def reap(
    db: Database, settings: Settings, celery: Celery | None = None, *, name: str = ""
) -> Reaped:
    """One pass: settle jobs of lost workers, queue again jobs that could not store their
    video, delete files past their retention, then publish queued jobs the broker lost.

    Without ``celery`` (no way to publish), requeued jobs wait for the next pass that has one.
    ``name`` is who runs the pass (a worker's hostname), as its events show it.
    """
    by = By(Actor.REAPER, name)
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
                    Job.state.in_(JobState.active_states()),
                    Job.updated_at < stale_before,
                )
            ).all()
        )
    if not anyone_beating:
        reaped.skipped = (
            f"no worker has sent a heartbeat in the last {settings.offline_after_s:g} s, so "
            "none is judged lost (the database may have been away, not every worker); jobs "
            "of lost workers are requeued once a worker beats again"
        )
    for candidate in candidates:
        with db.begin() as session:
            job = session.get(Job, candidate.id)
            if job is None or job.state is not candidate.state:
                continue
            if _held_by_live_worker(session, settings, job.id):
                continue
            left = lifecycle.settle_lost(
                session, settings, job, by=by, seen_updated_at=job.updated_at
            )
        if left is not None:
            log.warning("job %s: its worker was lost; %s", candidate.id, left.label)
            getattr(reaped, _OUTCOMES[left]).append(str(candidate.id))
    reaped.storage_retried = [
        str(job.id) for job in space.retry_storage_failures(db, settings, by=by)
    ]
    swept = retention.sweep(db, settings, by=by)
    reaped.expired = sorted(set(swept.expired) | set(swept.inputs))
    reaped.gave_up = give_up_waiting(db, settings, by=by)
    if celery is None:
        return reaped
    for job in republish_candidates(db, settings, celery):
        with db.session() as session:
            if publish(session, celery, job, by=by, seen_updated_at=job.updated_at):
                reaped.republished.append(str(job.id))
    with db.session() as session:
        # Jobs queued again above, and any waiting: sent as far as consumers can take them.
        reaped.dispatched = [str(i) for i in dispatch(session, celery, settings, by=by)]
    return reaped


def give_up_waiting(db: Database, settings: Settings, *, by: By) -> list[str]:
    """Fail the jobs that waited longer than ``SVDFARM_MAX_WAIT`` for a class no worker has
    (none online consumes its queue); nothing when the setting is 0 (wait forever)."""
    if not settings.max_wait_s:
        return []
    now = utcnow()
    oldest = now - timedelta(seconds=settings.max_wait_s)
    failed: list[str] = []
    with db.session() as session:
        served = {q for w in online_workers(session, settings) for q in w.queues or []}
        late = session.execute(
            select(Job.id, Job.queue, Job.created_at).where(
                Job.state == JobState.QUEUED, Job.created_at < oldest
            )
        ).all()
    for job_id, queue, created_at in late:
        if queue in served:
            continue
        with db.begin() as session:
            waited = (now - created_at).total_seconds()
            if lifecycle.give_up_waiting(session, job_id, by=by, waited_s=waited):
                failed.append(str(job_id))
    return failed


#: Where a pass records a lost worker's job, by the state the job was left in.
_OUTCOMES = {JobState.QUEUED: "requeued", JobState.FAILED: "failed", JobState.CANCELED: "canceled"}


def republish_candidates(db: Database, settings: Settings, celery: Celery) -> list[Job]:
    """Jobs the dispatcher sent whose id the broker does not hold (the caller publishes each
    only if untouched). Jobs still waiting in the database are the dispatcher's.

    Only jobs sent longer ago than the grace period (so a pass between its commit and its
    send is left alone): on brokers whose messages can be read (Redis, the embedded broker)
    those whose id the broker does not hold, on AMQP those :func:`unreadable_broker_lost`
    finds.
    """
    grace = timedelta(seconds=max(2 * settings.offline_after_s, 5.0))
    with db.session() as session:
        old = session.scalars(
            select(Job).where(
                Job.state == JobState.QUEUED,
                Job.published_at.is_not(None),
                Job.updated_at < utcnow() - grace,
            )
        ).all()
        stranded = stranded_jobs(session, settings)
    if not old:
        return stranded
    held = broker_held_ids(settings, celery, {sent_queue(j) for j in old})
    if held is None:
        lost_ids = unreadable_broker_lost(db, settings, celery, list(old))
        lost = [job for job in old if str(job.id) in lost_ids]
    else:
        lost = [job for job in old if str(job.id) not in held]
    seen = {job.id for job in lost}
    return lost + [job for job in stranded if job.id not in seen]


def sent_queue(job: Job) -> str:
    """The queue a sent job's message waits on: its worker's own, or the job's."""
    return direct_queue(job.sent_to) if job.sent_to else job.queue


def stranded_jobs(session: Session, settings: Settings) -> list[Job]:
    """Jobs sent to a worker's own queue (for :data:`DIRECT_GRACE_S` or more) that the worker
    cannot take now: it is gone, offline, draining or flagged, or holds another job."""
    now = utcnow()
    return list(
        session.scalars(
            select(Job)
            .outerjoin(Worker, Worker.hostname == Job.sent_to)
            .where(
                Job.state == JobState.QUEUED,
                Job.published_at.is_not(None),
                Job.sent_to.is_not(None),
                Job.updated_at < now - timedelta(seconds=DIRECT_GRACE_S),
                or_(
                    Worker.hostname.is_(None),
                    not_(and_(*takes_new_jobs(settings))),
                    # Another job: its heartbeat may name this one a moment before the claim.
                    and_(Worker.current_job_id.is_not(None), Worker.current_job_id != Job.id),
                ),
            )
        )
    )


def unreadable_broker_lost(
    db: Database, settings: Settings, celery: Celery, waiting: list[Job]
) -> set[str]:
    """Ids of ``waiting`` (queued past the grace period) whose message a broker that cannot be
    read (AMQP) no longer holds, as far as the database and the queues' counts can tell:

    * a job whose last event is not ``published`` (its publish failed, or its worker handed
      it back and could not publish it): it has no message;
    * every other waiting job of a queue that holds fewer messages than it has such jobs: the
      broker lost some (a restart without its data, a queue deleted or purged by hand), and
      which cannot be told apart. Workers acknowledge a message when the render starts, so a
      waiting job's message is in its queue, not at a worker. Those still held are doubled;
      the second delivery finds the job claimed or finished and does nothing.

    A queue's count also holds the messages of jobs canceled while waiting, so a loss can hide
    behind them until a worker has dropped those. An unreachable broker loses nothing here:
    the pass publishes nothing then (it could not).
    """
    ids = [job.id for job in waiting]
    last: dict[str, EventType] = {}
    with db.session() as session:
        rows = session.execute(
            select(JobEvent.job_id, JobEvent.type)
            .where(JobEvent.job_id.in_(ids))
            .order_by(JobEvent.job_id, JobEvent.id.desc())
        )
        for job_id, kind in rows:
            last.setdefault(str(job_id), kind)
    lost = {str(job.id) for job in waiting if last.get(str(job.id)) is not EventType.PUBLISHED}
    published: dict[str, list[str]] = {}
    for job in waiting:
        if str(job.id) not in lost:
            published.setdefault(sent_queue(job), []).append(str(job.id))
    if not published:
        return lost
    try:
        held = queue_depths(settings, list(published), celery=celery)
    except BrokerUnavailable:
        return set()
    for queue, job_ids in published.items():
        if held.get(queue, 0) < len(job_ids):
            lost.update(job_ids)
    return lost


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
    :func:`unreadable_broker_lost` decides from the database and the queues' counts.
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
