"""The dispatcher: the database is the queue of record, the broker a short conveyor.

A submitted job waits in the database (queued, ``published_at`` unset). A dispatch pass sends
a queue's waiting jobs to Celery only as fast as that queue's consumers can take them: as
many as it has idle consumers (live, not draining, holding no job), plus
``SVDFARM_DISPATCH_MARGIN``, minus the jobs already sent and not yet taken. So the order is
decided when a worker is free, and a changed priority or a canceled waiting job takes effect
without touching the broker.

The order (:func:`dispatch_order`): the highest priority first; within a priority, fair share
across owners (the owner whose GPU time over ``SVDFARM_FAIR_SHARE_WINDOW``, divided by their
share, is least goes first, and each job sent counts as the queue's mean run against its
owner for the rest of the pass); within an owner, the oldest first. Owners at their
``--max-running`` limit are skipped.

Who runs a pass: the web after each submit, a worker when it finishes a job or starts, and
every worker's registry thread every :data:`DISPATCH_INTERVAL_S` (so a farm with no submit
and no finish still moves, after a cancel or a priority change). On PostgreSQL a pass holds a
per-queue advisory lock, so passes over one queue run one after another and never both send
a job; on SQLite the database's single writer does the same. A job is marked sent before its
id goes to the broker: a pass that dies between the two leaves a job the reaper finds missing
from the broker and publishes again (:mod:`svdfarm.reaper`); a broker that refuses the id
gets the job back in the database for the next pass.

On an idle farm a submit needs no pass: :func:`mark_at_submit` marks the new job sent in the
submit's own transaction, under the same lock, when its queue has a free slot and no other
job waits there (the order would choose it anyway). A submit that sees no free slot (a busy
farm) takes no lock, so submits do not queue behind one another; it looks once more after
its commit (:func:`slot_freed`) for a worker that freed up meanwhile.

Which worker takes it (:func:`pick_worker`): a job sent while its queue has an idle consumer
goes to one of them on that worker's own queue (Celery's ``worker_direct``), chosen so that
no worker loads a model another idle worker already holds: one with the job's model loaded
first, then one with nothing loaded, then any (not one the job already failed on). And a
free worker holding another model keeps to that model while a job of it waits and another
worker (busy or not) holds this job's model (:func:`_kept_to_their_models`). So two workers
serving two models each keep one loaded instead of swapping both on every job; a farm
whose only worker of a model is busy elsewhere still swaps rather than leave a job waiting
for nobody. A job sent beyond the idle consumers (the margin) goes on its queue, for whichever
consumer is first; so does every job the reaper publishes again, among them a job whose
chosen worker went away or took another job before it (:mod:`svdfarm.reaper`).
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy import (
    BindParameter,
    ColumnElement,
    ScalarSelect,
    Select,
    String,
    Uuid,
    and_,
    bindparam,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from svdfarm import lifecycle
from svdfarm.celery_app import enqueue_render
from svdfarm.lifecycle import By
from svdfarm.models import Attempt, Job, JobEvent, Worker, utcnow
from svdfarm.queues import queue_model
from svdfarm.registry import online_workers
from svdfarm.settings import Settings
from svdfarm.states import JobState, WorkerState
from svdfarm.users import Limits, limits_of
from svdfarm.worker_health import failed_workers_of

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)

#: How often each worker's registry thread runs a pass of its own.
DISPATCH_INTERVAL_S = 2.0
#: What a job sent counts against its owner when the queue has no finished run to measure.
DEFAULT_RUN_S = 60.0
#: The most waiting jobs of one queue a page's place reads (beyond it: "more than").
PLACE_HORIZON = 2000


def waiting() -> ColumnElement[bool]:
    """Jobs that wait in the database for the dispatcher (queued, not yet sent)."""
    return and_(Job.state == JobState.QUEUED, Job.published_at.is_(None))


@dataclass(frozen=True)
class Sending:
    """A job marked sent: its queue, and the worker whose own queue it goes to (None: the
    queue, for any of its consumers)."""

    job_id: uuid.UUID
    queue: str
    worker: str | None = None


@dataclass(frozen=True)
class IdleWorker:
    """An idle consumer of a queue, as :func:`pick_worker` sees it."""

    hostname: str
    #: The catalog key of the model it holds loaded (None: none yet).
    loaded_model: str | None = None
    #: True while a job sent to its own queue waits for it (it is spoken for).
    awaiting: bool = False
    #: The farm's queues it consumes.
    queues: tuple[str, ...] = ()


def pick_worker(
    idle: Sequence[IdleWorker], model: str | None, avoid: Iterable[str] = ()
) -> str | None:
    """The idle worker a job of ``model`` (a catalog key; None: a queue without one) goes
    to: one that holds the model loaded, else one that holds none, else the first; never one
    spoken for or in ``avoid`` (workers the job failed on). None: no such worker (the job
    goes on its queue)."""
    avoided = set(avoid)
    free = sorted(
        (w for w in idle if not w.awaiting and w.hostname not in avoided),
        key=lambda w: w.hostname,
    )
    if not free:
        return None
    for rank in (
        lambda w: model is not None and w.loaded_model == model,
        lambda w: not w.loaded_model,
    ):
        for worker in free:
            if rank(worker):
                return worker.hostname
    return free[0].hostname


@dataclass
class Candidate:
    """A waiting job as the order sees it."""

    id: uuid.UUID
    owner: str
    priority: int
    created_at: datetime


@dataclass
class Ledger:
    """What the order needs of each owner: their limits, GPU time and jobs at work."""

    limits: dict[str, Limits] = field(default_factory=dict)
    used_s: dict[str, float] = field(default_factory=dict)
    busy: dict[str, int] = field(default_factory=dict)
    run_s: float = DEFAULT_RUN_S

    def weight(self, owner: str) -> float:
        """The owner's recent GPU time divided by their share (less goes first)."""
        share = self.limits.get(owner, Limits()).share or 1.0
        return self.used_s.get(owner, 0.0) / share

    def full(self, owner: str) -> bool:
        """True when the owner is at their ``--max-running`` limit."""
        limit = self.limits.get(owner, Limits()).max_running
        return limit is not None and self.busy.get(owner, 0) >= limit

    def copy(self) -> Ledger:
        """A copy to charge, this one left as it is."""
        return Ledger(dict(self.limits), dict(self.used_s), dict(self.busy), self.run_s)

    def charge(self, owner: str) -> None:
        """Count one more job of ``owner`` at work, with a mean run against their time."""
        self.used_s[owner] = self.used_s.get(owner, 0.0) + self.run_s
        self.busy[owner] = self.busy.get(owner, 0) + 1


def dispatch_order(candidates: Iterable[Candidate], ledger: Ledger, limit: int) -> list[Candidate]:
    """The first ``limit`` of ``candidates`` in dispatch order (the ledger is charged for
    each one chosen). Each owner's candidates must come oldest first within a priority."""
    heads: dict[str, deque[Candidate]] = {}
    for candidate in sorted(candidates, key=lambda c: (-c.priority, c.created_at, c.id.hex)):
        heads.setdefault(candidate.owner, deque()).append(candidate)
    chosen: list[Candidate] = []
    while len(chosen) < limit:
        ready = [o for o, jobs in heads.items() if jobs and not ledger.full(o)]
        if not ready:
            break
        owner = min(
            ready,
            key=lambda o: (-heads[o][0].priority, ledger.weight(o), heads[o][0].created_at),
        )
        chosen.append(heads[owner].popleft())
        ledger.charge(owner)
    return chosen


def dispatch(
    session: Session,
    celery: Celery,
    settings: Settings,
    *,
    queues: Iterable[str] | None = None,
    by: By,
) -> list[uuid.UUID]:
    """One pass over ``queues`` (default: every queue with a waiting job): send each queue
    the waiting jobs its idle consumers can take now, in dispatch order. Commits; returns
    the ids sent."""
    if queues is None:
        queues = session.scalars(select(Job.queue).where(waiting()).distinct()).all()
        session.commit()
    sent: list[uuid.UUID] = []
    for queue in sorted(set(queues)):
        chosen = _choose(session, settings, queue, by)
        session.commit()
        for sending in chosen:
            if _send(session, celery, sending, by):
                sent.append(sending.job_id)
    return sent


def _lock(session: Session, queue: str) -> bool:
    """Take ``queue``'s dispatch lock until the transaction ends (PostgreSQL; SQLite's single
    writer serialises the marks instead); True when a lock was taken."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    session.execute(
        text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"svdfarm-dispatch:{queue}"}
    )
    return True


def _choose(session: Session, settings: Settings, queue: str, by: By) -> list[Sending]:
    """Mark the jobs this pass sends to ``queue`` (under the queue's lock), each with the
    worker it goes to (:func:`pick_worker`)."""
    _lock(session, queue)
    model = queue_model(queue)
    idle = _kept_to_their_models(session, settings, queue, idle_workers(session, settings, queue))
    slots = _slots(settings, idle, session.scalar(select(_in_flight(queue))))
    if slots <= 0:
        return []
    candidates = _candidates(session, queue, per_owner=slots)
    if not candidates:
        return []
    owners = {c.owner for c in candidates}
    ledger = Ledger(limits=limits_of(session, owners))
    if len(owners) > 1 or any(limit.max_running is not None for limit in ledger.limits.values()):
        # Fair share and running limits need each owner's time and jobs at work; one owner
        # without a running limit (an idle farm's usual submit) goes in its own order.
        ledger = ledger_for(session, settings, queue, owners)
    order = dispatch_order(candidates, ledger, slots)
    failed_on = failed_workers_of(session, [c.id for c in order]) if idle else {}
    chosen = []
    for candidate in order:
        worker = pick_worker(idle, model, failed_on.get(candidate.id, ()))
        if lifecycle.publish(
            session, candidate.id, by=by, waiting_only=True, queue=queue, sent_to=worker
        ):
            chosen.append(Sending(candidate.id, queue, worker))
            idle = _spoken_for(idle, {worker})
    return chosen


def _kept_to_their_models(
    session: Session, settings: Settings, queue: str, idle: list[IdleWorker]
) -> list[IdleWorker]:
    """``idle`` (the consumers of ``queue``) with each free worker that holds another model
    than the queue's marked spoken for while a job of its own model waits for it, as long
    as another online worker of ``queue`` (busy or not) holds the queue's model: that one
    takes this queue's jobs, and nobody swaps models back and forth. Two reads, only when a
    free worker holds another model."""
    model = queue_model(queue)
    others = [w for w in idle if not w.awaiting and w.loaded_model not in (None, model)]
    if model is None or not others:
        return idle
    holders = session.execute(
        select(Worker.queues).where(*takes_new_jobs(settings), Worker.loaded_model == model)
    ).all()
    if not any(queue in (queues or []) for (queues,) in holders):
        return idle
    backlog = set(session.scalars(select(Job.queue).where(waiting()).distinct()))
    kept = {
        w.hostname
        for w in others
        if any(queue_model(q) == w.loaded_model for q in backlog & set(w.queues))
    }
    return _spoken_for(idle, kept)


def _spoken_for(idle: list[IdleWorker], hostnames: Collection[str | None]) -> list[IdleWorker]:
    """``idle`` with the workers named in ``hostnames`` marked spoken for."""
    return [replace(w, awaiting=True) if w.hostname in hostnames else w for w in idle]


class Unmarked(enum.Enum):
    """Why :func:`mark_at_submit` marked nothing."""

    #: A pass decides (another job waits, an owner's running limit, a worker would swap
    #: models): run one after the commit.
    FOR_PASS = "for_pass"
    #: The queue had no free slot: a pass now would send nothing either. After the commit,
    #: :func:`slot_freed` says whether a worker freed up meanwhile (then run a pass);
    #: otherwise the job waits for the pass of the next worker to be free.
    NO_SLOT = "no_slot"


@dataclass(frozen=True)
class QueueView:
    """What a submit reads of its queue: its free slots (:func:`free_slots`), whether a
    job other than the submitted one waits there, and the queue's idle consumers."""

    slots: int
    others_wait: bool
    idle: list[IdleWorker]


@functools.cache
def _view_statements() -> tuple[Select[Unpack[tuple[Any, ...]]], Select[int, bool]]:
    """The reads of :func:`_view`, built once (a submit runs them every time): the idle
    workers with the queue's jobs in flight and whether another job waits; and those two
    alone. Parameters: ``queue``, ``job_id``, ``recent`` (the oldest live heartbeat)."""
    queue = bindparam("queue", type_=String)
    others_wait = (
        select(Job.id)
        .where(Job.queue == queue, waiting(), Job.id != bindparam("job_id", type_=Uuid))
        .exists()
    )
    in_flight = _in_flight(queue)
    idle = [*_takes_new_jobs(bindparam("recent")), Worker.current_job_id.is_(None)]
    with_idle = select(*_idle_columns(), in_flight, others_wait).where(*idle)
    return with_idle, select(in_flight, others_wait)


#: The job id :func:`slot_freed` reads the queue for: none (no job has it).
_NO_JOB = uuid.UUID(int=0)


def _view(session: Session, settings: Settings, queue: str, job_id: uuid.UUID) -> QueueView:
    """``queue`` as a submit of ``job_id`` sees it, in one read (a second only when no
    worker at all is idle and the margin is above 0)."""
    with_idle, alone = _view_statements()
    params = {"queue": queue, "job_id": job_id, "recent": _oldest_live_heartbeat(settings)}
    rows = session.execute(with_idle, params).all()
    if rows:
        in_flight, others = rows[0][-2], rows[0][-1]
    elif settings.dispatch_margin <= 0:
        return QueueView(0, False, [])  # no idle worker and no margin: no slot
    else:
        in_flight, others = session.execute(alone, params).one()
    idle = _consumers_among(rows, queue)
    return QueueView(_slots(settings, idle, in_flight), bool(others), idle)


def mark_at_submit(
    session: Session, settings: Settings, job: Job, limits: Limits | None = None, *, by: By
) -> Sending | Unmarked:
    """The idle farm's fast path: in the transaction that records ``job`` (flushed, not yet
    committed), mark it sent when its queue has a free slot (:func:`free_slots`) and no
    other job waits there, to the worker :func:`pick_worker` chooses. The caller commits,
    then sends it (:func:`send`); otherwise nothing was marked, the job waits for a dispatch
    pass as any other, and :class:`Unmarked` says whether one is worth running now.

    A pass would choose this job too: with nothing else waiting in its queue, priority and
    fair share have nothing to decide. An owner with a ``--max-running`` limit (``limits``,
    read when not given) goes by the pass, which counts their jobs at work.

    The queue is read first without its dispatch lock, so that on a busy farm (no free
    slot: the usual answer under load) submits do not wait for one another. On
    :attr:`Unmarked.NO_SLOT` the caller asks :func:`slot_freed` after its commit: a worker
    frees itself (committed) before its pass, so either that pass sees this job or the
    look after the commit sees the worker. When a slot is seen, the queue's lock is taken
    (PostgreSQL) and the queue read again; the lock is held until the caller's commit, as
    a pass holds it: a pass or another submit after it sees this job sent, so it is never
    sent twice and its slot is not counted again.
    """
    if job.state is not JobState.QUEUED or job.published_at is not None:
        return Unmarked.FOR_PASS
    if limits is None:
        limits = limits_of(session, [job.owner])[job.owner]
    if limits.max_running is not None:
        return Unmarked.FOR_PASS
    queue = job.queue
    view = _view(session, settings, queue, job.id)
    if view.slots >= 1 and not view.others_wait and _lock(session, queue):
        # Again under the lock: a pass or a submit before it may have taken the slot.
        view = _view(session, settings, queue, job.id)
    if view.slots < 1:
        return Unmarked.NO_SLOT
    if view.others_wait:
        return Unmarked.FOR_PASS
    # A new job failed nowhere yet: nobody to avoid.
    model = queue_model(queue)
    worker = pick_worker(view.idle, model)
    loaded = {w.hostname: w.loaded_model for w in view.idle}
    if worker is not None and loaded[worker] not in (None, model):
        return Unmarked.FOR_PASS  # a worker would swap models: _kept_to_their_models decides
    if not lifecycle.publish(
        session, job.id, by=by, waiting_only=True, queue=queue, sent_to=worker
    ):
        return Unmarked.FOR_PASS
    return Sending(job.id, queue, worker)


def slot_freed(session: Session, settings: Settings, queue: str) -> bool:
    """After a submit to ``queue`` answered :attr:`Unmarked.NO_SLOT` has committed: True
    when the queue has a free slot now (a worker freed up between the submit's look and its
    commit, and its pass may have missed the job): run a pass.

    On PostgreSQL one read, outside a transaction (none to begin or end). Never on SQLite:
    there the submit's transaction holds the single writer's lock from its first insert, so
    a worker frees itself only after the commit, and its pass sees the job.
    """
    if session.get_bind().dialect.name != "postgresql":
        return False
    session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    freed = _view(session, settings, queue, _NO_JOB).slots >= 1
    session.commit()  # gives the connection back: nothing to commit on the server
    return freed


def send(session: Session, celery: Celery, sending: Sending, *, by: By) -> bool:
    """Put a job marked sent (and committed) on its queue, or its worker's own; on a refusal
    the job goes back to the database for the next pass. True when the broker took it."""
    return _send(session, celery, sending, by)


def _send(session: Session, celery: Celery, sending: Sending, by: By) -> bool:
    """Put one marked job's id on its queue; on a refusal give it back to the database."""
    job_id = sending.job_id
    try:
        enqueue_render(celery, str(job_id), sending.queue, worker=sending.worker)
    except Exception as exc:
        log.warning(
            "could not send job %s to %s (%s: %s); the next dispatch pass tries again",
            job_id,
            sending.worker or sending.queue,
            type(exc).__name__,
            exc,
        )
        lifecycle.publish_failed(session, job_id, by=by, error=type(exc).__name__)
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(published_at=None, sent_to=None)
        )
        session.commit()
        return False
    return True


def consumers_of(workers: Sequence[Worker], queue: str) -> list[Worker]:
    """The workers (online ones) that take new jobs from ``queue``: not draining, not
    flagged (svdfarm.worker_health)."""
    return [
        w
        for w in workers
        if queue in (w.queues or [])
        and w.state is not WorkerState.DRAINING
        and w.flagged_at is None
    ]


def free_slots(session: Session, settings: Settings, queue: str) -> int:
    """How many more jobs ``queue`` can be sent now: its idle consumers (not spoken for)
    plus the margin, minus the jobs sent to the queue itself and not yet taken. The margin
    holds even with no consumer, so a queue scaled to zero shows its first jobs to a
    length-based autoscaler. A job sent to a worker's own queue is counted by that worker
    being spoken for (in every queue it consumes), not by its own queue."""
    in_flight = session.scalar(select(_in_flight(queue)))
    return _slots(settings, idle_workers(session, settings, queue), in_flight)


def _in_flight(queue: str | BindParameter[str]) -> ScalarSelect[int]:
    """The number of jobs sent to ``queue`` itself (not to a worker's own) and not yet
    taken, as a subquery."""
    return (
        select(func.count())
        .select_from(Job)
        .where(
            Job.queue == queue,
            Job.state == JobState.QUEUED,
            Job.published_at.is_not(None),
            Job.sent_to.is_(None),
        )
        .scalar_subquery()
    )


def _free(idle: Sequence[IdleWorker]) -> int:
    """How many of ``idle`` are not spoken for."""
    return sum(1 for worker in idle if not worker.awaiting)


def _slots(settings: Settings, idle: Sequence[IdleWorker], in_flight: int | None) -> int:
    """A queue's free slots (:func:`free_slots`) from its idle consumers and its count of
    jobs sent to it and not yet taken."""
    return _free(idle) + settings.dispatch_margin - (in_flight or 0)


def idle_workers(session: Session, settings: Settings, queue: str) -> list[IdleWorker]:
    """The online workers that take new jobs from ``queue`` and hold none now (the idle ones
    of :func:`consumers_of` over :func:`~svdfarm.registry.online_workers`), read as a few
    columns (a pass runs this every few seconds, and at each submit), with the model each
    holds loaded and whether a job sent to its own queue waits for it."""
    rows = session.execute(select(*_idle_columns()).where(*_idle(settings))).all()
    return _consumers_among(rows, queue)


def _idle_columns() -> list[Any]:
    """What a read of idle workers takes of each: its queues, name, loaded model, and
    whether a job sent to its own queue waits for it."""
    awaiting = (
        select(Job.id)
        .where(
            Job.sent_to == Worker.hostname,
            Job.state == JobState.QUEUED,
            Job.published_at.is_not(None),
        )
        .exists()
    )
    return [Worker.queues, Worker.hostname, Worker.loaded_model, awaiting]


def _consumers_among(rows: Sequence[Any], queue: str) -> list[IdleWorker]:
    """The rows (of :func:`_idle_columns` first) of workers that consume ``queue``."""
    return [
        IdleWorker(row[1], row[2], bool(row[3]), tuple(row[0] or ()))
        for row in rows
        if queue in (row[0] or [])
    ]


def _idle(settings: Settings) -> list[ColumnElement[bool]]:
    """The workers that are online, take new jobs and hold none (any queue)."""
    return [*takes_new_jobs(settings), Worker.current_job_id.is_(None)]


def takes_new_jobs(settings: Settings) -> list[ColumnElement[bool]]:
    """The workers that are online and take new jobs (busy or not): heartbeat recent, not
    offline or draining, not flagged."""
    return _takes_new_jobs(_oldest_live_heartbeat(settings))


def _oldest_live_heartbeat(settings: Settings) -> datetime:
    """The oldest heartbeat of a worker that is online now."""
    return utcnow() - timedelta(seconds=settings.offline_after_s)


def _takes_new_jobs(recent: Any) -> list[ColumnElement[bool]]:
    """:func:`takes_new_jobs` with ``recent`` (a time, or a parameter) the oldest live
    heartbeat."""
    return [
        Worker.last_heartbeat >= recent,
        Worker.state.not_in([WorkerState.OFFLINE, WorkerState.DRAINING]),
        Worker.flagged_at.is_(None),
    ]


def _candidates(
    session: Session, queue: str, *, per_owner: int | None = None, limit: int | None = None
) -> list[Candidate]:
    """The waiting jobs of ``queue``: each owner's first ``per_owner`` in their own order
    (all with None), at most ``limit`` in all."""
    rank = (
        func.row_number()
        .over(partition_by=Job.owner, order_by=(Job.priority.desc(), Job.created_at, Job.id))
        .label("rank")
    )
    inner = (
        select(Job.id, Job.owner, Job.priority, Job.created_at, rank)
        .where(Job.queue == queue, waiting())
        .subquery()
    )
    stmt = select(inner.c.id, inner.c.owner, inner.c.priority, inner.c.created_at)
    if per_owner is not None:
        stmt = stmt.where(inner.c.rank <= per_owner)
    if limit is not None:
        stmt = stmt.order_by(inner.c.priority.desc(), inner.c.created_at).limit(limit)
    return [Candidate(*row) for row in session.execute(stmt)]


def ledger_for(session: Session, settings: Settings, queue: str, owners: set[str]) -> Ledger:
    """Each owner's limits, GPU time over the fair-share window and jobs at work (running,
    or sent and not yet taken), and the queue's mean run."""
    now = utcnow()
    since = now - timedelta(seconds=settings.fair_share_window_s)
    ledger = Ledger(limits=limits_of(session, owners))
    # The window's attempts of these owners (their GPU time) and of this queue (its mean run):
    # not every owner's.
    runs = session.execute(
        select(Job.owner, Job.queue, Attempt.started_at, Attempt.finished_at)
        .join(Attempt, Attempt.job_id == Job.id)
        .where(Attempt.started_at >= since, or_(Job.owner.in_(owners), Job.queue == queue))
    )
    finished: list[float] = []
    for owner, job_queue, started, ended in runs:
        seconds = max(0.0, ((ended or now) - started).total_seconds())
        if owner in owners:
            ledger.used_s[owner] = ledger.used_s.get(owner, 0.0) + seconds
        if ended is not None and job_queue == queue:
            finished.append(seconds)
    if finished:
        ledger.run_s = max(0.001, sum(finished) / len(finished))
    at_work = Job.state.in_(
        [JobState.RUNNING, JobState.CANCEL_REQUESTED]
    ) | Job.published_at.is_not(None)
    for owner, count in session.execute(
        select(Job.owner, func.count()).where(Job.owner.in_(owners), at_work).group_by(Job.owner)
    ):
        ledger.busy[owner] = count
    return ledger


@dataclass(frozen=True)
class Place:
    """A queued job's place: 0 when it was sent and a worker takes it next, else its
    position in its queue's dispatch order; and an estimate of when it starts."""

    position: int
    eta_s: float | None
    #: Why it waits beyond its turn ("you have 2 jobs running, your limit"), or "".
    held: str = ""
    #: True when more waiting jobs than :data:`PLACE_HORIZON` were read (position is a floor).
    beyond: bool = False

    def describe(self) -> str:
        """``2nd in line``, ``next``, with the estimate when there is one."""
        if self.position == 0:
            text = "sent to a worker: it starts next"
        else:
            text = f"{ordinal(self.position)} in line" + (" or later" if self.beyond else "")
        if self.eta_s is not None:
            text += f", starts in about {_minutes(self.eta_s)}"
        return text


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 21st..."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _minutes(seconds: float) -> str:
    """A start estimate in words."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"


def place_of(
    session: Session,
    settings: Settings,
    job: Job,
    workers: Sequence[Worker] | None = None,
    orders: OrderCache | None = None,
) -> Place | None:
    """Where a queued job stands in its queue's dispatch order, and when it may start
    (from the queue's mean run and its consumers); None for a job that is not queued.
    ``orders``: a cache of the queues' orders (:class:`OrderCache`), else read now."""
    return places_of(session, settings, [job], workers, orders).get(job.id)


def places_of(
    session: Session,
    settings: Settings,
    jobs: Sequence[Job],
    workers: Sequence[Worker] | None = None,
    orders: OrderCache | None = None,
) -> dict[uuid.UUID, Place]:
    """:func:`place_of` for each queued job of ``jobs`` (others are left out), each queue's
    order worked out once (a list of jobs costs a few queries per queue, not per job)."""
    queued = [job for job in jobs if job.state is JobState.QUEUED]
    if not queued:
        return {}
    workers = online_workers(session, settings) if workers is None else workers
    places: dict[uuid.UUID, Place] = {}
    for queue in sorted({job.queue for job in queued}):
        here = [job for job in queued if job.queue == queue]
        consumers = consumers_of(workers, queue)
        places.update(_places_in(session, settings, queue, here, consumers, orders))
    return places


def _places_in(
    session: Session,
    settings: Settings,
    queue: str,
    jobs: Sequence[Job],
    consumers: Sequence[Worker],
    orders: OrderCache | None = None,
) -> dict[uuid.UUID, Place]:
    """The places of ``jobs``, all queued on ``queue`` with these ``consumers``."""
    places: dict[uuid.UUID, Place] = {}
    if all(job.published_at is not None for job in jobs):  # all sent: nothing to read
        return {job.id: Place(0, 0.0 if consumers else None) for job in jobs}
    order = (
        orders.get(session, settings, queue) if orders else queue_order(session, settings, queue)
    )
    per_job = order.run_s / len(consumers) if consumers else None
    all_busy = bool(consumers) and all(w.current_job_id is not None for w in consumers)
    for job in jobs:
        if job.published_at is not None:
            places[job.id] = Place(0, 0.0 if consumers else None)
            continue
        held = ""
        if order.limits.full(job.owner):
            limit = order.limits.limits[job.owner].max_running
            busy = order.limits.busy.get(job.owner, 0)
            held = f"you have {busy} job(s) running, your limit is {limit}"
        found = order.positions.get(job.id)
        position = found if found is not None else order.read + 1
        eta = None
        if per_job is not None and not held:
            # The jobs ahead, a mean run each shared by the consumers; when every consumer is
            # busy, half a run more for the first of them to be free.
            eta = (position - 1) * per_job + (per_job / 2 if all_busy else 0.0)
        beyond = found is None and order.read >= PLACE_HORIZON
        places[job.id] = Place(position, eta, held, beyond)
    return places


@dataclass(frozen=True)
class QueueOrder:
    """A queue's dispatch order as one read saw it: each waiting job's position (from 1),
    the owners' limits and jobs at work, and the queue's mean run."""

    positions: dict[uuid.UUID, int]
    #: How many waiting jobs were read (at most :data:`PLACE_HORIZON`).
    read: int
    #: The ledger before the order charged it: whose running limit holds their jobs back.
    limits: Ledger
    run_s: float


def queue_order(session: Session, settings: Settings, queue: str) -> QueueOrder:
    """The dispatch order of ``queue``'s first :data:`PLACE_HORIZON` waiting jobs."""
    candidates = _candidates(session, queue, limit=PLACE_HORIZON)
    ledger = ledger_for(session, settings, queue, {c.owner for c in candidates})
    # The order charges its ledger with every waiting job: the limits are read from a copy.
    fresh = ledger.copy()
    ordered = dispatch_order(candidates, ledger, len(candidates))
    positions = {c.id: n for n, c in enumerate(ordered, start=1)}
    return QueueOrder(positions, len(candidates), fresh, ledger.run_s)


class OrderCache:
    """Each queue's :class:`QueueOrder` as this process last read it, used again while no
    job event was recorded since (a submit, a send, a claim, a cancel, a priority change:
    everything that moves a queue records one) and for at most ``max_age_s`` (what moves
    without an event: the fair-share window, a user's limits). Whether an event was recorded
    is read (the newest event's id, one cheap query) at most every ``check_s`` seconds, so
    the status of many waiting jobs costs no query at all most of the time, and a place is
    at most ``check_s`` older than the queue; one cache per web app (per database)."""

    def __init__(self, max_age_s: float = 2.0, check_s: float = 0.25) -> None:
        """Empty; entries live at most ``max_age_s`` seconds, events are looked for at
        most every ``check_s``."""
        self.max_age_s = max_age_s
        self.check_s = check_s
        self._orders: dict[str, tuple[int | None, float, QueueOrder]] = {}
        self._version: int | None = None
        self._checked_at = -math.inf

    def get(self, session: Session, settings: Settings, queue: str) -> QueueOrder:
        """``queue``'s order, read again only when stale."""
        now = time.monotonic()
        if now - self._checked_at >= self.check_s:
            self._version = session.scalar(select(func.max(JobEvent.id)))
            self._checked_at = now
        version = self._version
        seen = self._orders.get(queue)
        if seen is not None and seen[0] == version and now - seen[1] < self.max_age_s:
            return seen[2]
        order = queue_order(session, settings, queue)
        self._orders[queue] = (version, now, order)
        return order


def backlog(session: Session) -> dict[str, int]:
    """Jobs waiting in the database per queue (what KEDA scales on: see docs/SCHEDULING.md)."""
    rows = session.execute(select(Job.queue, func.count()).where(waiting()).group_by(Job.queue))
    return {queue: count for queue, count in rows}


def describe_ledger(ledger: Ledger) -> dict[str, Any]:
    """The ledger as plain data (for the CLI and the benchmark)."""
    return {"used_s": dict(ledger.used_s), "busy": dict(ledger.busy), "run_s": ledger.run_s}
