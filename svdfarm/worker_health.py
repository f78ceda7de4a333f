"""A bad worker does not eat the ladder: per-job blocklists, and flagging broken workers.

Two rules, both about errors that are not precision errors (the retry ladder handles
``dtype_mismatch``, ``out_of_memory`` and ``non_finite`` by changing the plan; another card
does not help there):

* **Per job** (Flamenco's blocklist): a job whose attempt failed on a worker goes to another
  worker of its class when one is free. The worker whose attempt failed hands the job back
  instead of failing it (:func:`hand_back_to`, once per worker and job), and a worker that is
  sent a job it failed declines it (:func:`decline_reason`, twice per worker and job at most,
  so two workers never play ping-pong with it).
* **Per worker**: a worker that fails :data:`FLAG_AFTER` jobs in a row with the same such
  error (a broken card, a full scratch disk, a missing model) is flagged
  (:func:`check_worker`): the dispatcher sends it nothing, its heartbeat keeps it from
  consuming (``worker.tasks``) and the admin's workers page shows why, until an operator
  clears the flag (:func:`clear_flag`: the admin page or ``svdfarm workers clear``).

Which failures count: :data:`NOT_PRECISION`. ``worker_lost`` does not (the reaper's poison
rule handles a job that takes its workers down), nor an attempt closed by a stopping worker's
hand-back (``HandedBack``), nor a video the shared store would not take after a successful
render (the attempt succeeded: the store, not this worker, is at fault; the reaper retries
those, see :func:`svdfarm.lifecycle.retry_storage`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from svdfarm.lifecycle import HANDED_BACK_TYPE
from svdfarm.models import Attempt, Job, JobEvent, Worker, utcnow
from svdfarm.registry import online_workers, serves
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, ErrorClass, EventType, JobState, WorkerState

#: Jobs in a row a worker fails with the same non-precision error before it is flagged.
FLAG_AFTER = 3
#: The errors the retry ladder handles by changing the plan: never the worker's fault.
PRECISION = frozenset({ErrorClass.DTYPE_MISMATCH, ErrorClass.OUT_OF_MEMORY, ErrorClass.NON_FINITE})
#: The errors that say something about the worker (its card, its disk, its models), not
#: about the job's precision. ``model_unavailable`` counts: a missing model is not the card's
#: fault, but it is this worker's problem (another worker may have it). ``worker_lost`` does
#: not: the poison rule handles it.
NOT_PRECISION = frozenset(
    {ErrorClass.MODEL_UNAVAILABLE, ErrorClass.TIMEOUT, ErrorClass.STORAGE, ErrorClass.OTHER}
)
#: How many times one worker declines one job at most; after that it claims it.
MAX_DECLINES = 2
#: How long each error message is in a flag's reason, at most.
MESSAGE_CHARS = 160
#: How ``flagged_reason`` starts once the flag was cleared (``flagged_at`` unset).
CLEARED_PREFIX = "cleared "
#: How many of a worker's latest attempts :func:`check_worker` reads to find its last jobs.
_ATTEMPTS_READ = 200


def counts_against_worker(attempt: Attempt) -> bool:
    """True when ``attempt`` failed with an error that is not a precision error (and was
    not closed by its worker's stop)."""
    return (
        attempt.outcome is AttemptOutcome.FAILED
        and attempt.error_class in NOT_PRECISION
        and attempt.error_type != HANDED_BACK_TYPE
    )


def _counted_attempts(session: Session, job_ids: Sequence[uuid.UUID]) -> list[Attempt]:
    """The attempts of ``job_ids`` that count against their worker, by job and number."""
    attempts = session.scalars(
        select(Attempt)
        .where(
            Attempt.job_id.in_(job_ids),
            Attempt.outcome == AttemptOutcome.FAILED,
            Attempt.error_class.in_(NOT_PRECISION),
        )
        .order_by(Attempt.job_id, Attempt.number)
    )
    return [attempt for attempt in attempts if counts_against_worker(attempt)]


def _failed_here(session: Session, job_id: uuid.UUID) -> dict[str, list[Attempt]]:
    """The job's attempts that count against their worker, by worker."""
    found: dict[str, list[Attempt]] = {}
    for attempt in _counted_attempts(session, [job_id]):
        found.setdefault(attempt.worker, []).append(attempt)
    return found


def failed_workers(session: Session, job_id: uuid.UUID) -> set[str]:
    """The workers an attempt of the job failed on with a non-precision error."""
    return set(_failed_here(session, job_id))


def failed_workers_of(session: Session, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, set[str]]:
    """:func:`failed_workers` of each of ``job_ids`` (those with none left out), in one read:
    each job's blocklist, as the dispatcher reads it for the jobs of a pass."""
    found: dict[uuid.UUID, set[str]] = {}
    for attempt in _counted_attempts(session, job_ids):
        found.setdefault(attempt.job_id, set()).add(attempt.worker)
    return found


@dataclass(frozen=True)
class _JobEnd:
    """How a job ended on one worker: its last attempt there."""

    job_id: uuid.UUID
    attempt: Attempt


def _last_jobs(
    session: Session, hostname: str, count: int, since: datetime | None = None
) -> list[_JobEnd]:
    """The last ``count`` jobs ``hostname`` finished an attempt of (after ``since``), newest
    first, each with its last attempt on this worker (by the attempts' end)."""
    stmt = select(Attempt).where(Attempt.worker == hostname, Attempt.finished_at.is_not(None))
    if since is not None:
        stmt = stmt.where(Attempt.finished_at > since)
    attempts = session.scalars(
        stmt.order_by(Attempt.finished_at.desc(), Attempt.id.desc()).limit(_ATTEMPTS_READ)
    )
    ends: dict[uuid.UUID, _JobEnd] = {}
    for attempt in attempts:
        if attempt.job_id not in ends:
            ends[attempt.job_id] = _JobEnd(attempt.job_id, attempt)
            if len(ends) == count:
                break
    return list(ends.values())


def _short(message: str | None) -> str:
    """An error message on one line, at most :data:`MESSAGE_CHARS` long."""
    text = " ".join((message or "no message").split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def flag_reason(error_class: ErrorClass, ends: Sequence[_JobEnd]) -> str:
    """The reason a flag gives: the error class, then each job's id and shortened error."""
    jobs = "; ".join(f"job {end.job_id}: {_short(end.attempt.message)}" for end in ends)
    return f"{len(ends)} jobs in a row failed here with {error_class.label} errors: {jobs}"


def check_worker(session: Session, hostname: str) -> str | None:
    """Flag ``hostname`` when its last :data:`FLAG_AFTER` jobs all failed here with the same
    error class of :data:`NOT_PRECISION`; returns the reason when it flagged it now.

    Looks at the worker's attempts grouped by job, newest first by their end: each job's
    last attempt on this worker must have failed (a success, a precision error or another
    class in between breaks the run); only jobs ended since the last :func:`clear_flag`
    count. Sets ``flagged_at`` and ``flagged_reason`` (the class,
    the job ids, their shortened errors) in the caller's transaction. None when the worker
    is unknown, already flagged, or not failing that way.
    """
    worker = session.get(Worker, hostname, with_for_update=True)
    if worker is None or worker.flagged_at is not None:
        return None
    ends = _last_jobs(session, hostname, FLAG_AFTER, since=cleared_at(worker))
    if len(ends) < FLAG_AFTER or not all(counts_against_worker(e.attempt) for e in ends):
        return None
    classes = {e.attempt.error_class for e in ends}
    if len(classes) != 1:
        return None
    [error_class] = classes
    assert error_class is not None
    reason = flag_reason(error_class, ends)
    worker.flagged_at = utcnow()
    worker.flagged_reason = reason
    session.flush()
    return reason


def clear_flag(session: Session, hostname: str) -> bool:
    """Clear the flag of ``hostname`` (an operator fixed it); False when it was not flagged
    or is unknown. The worker takes jobs again at its next heartbeat.

    The failures before now no longer count towards a flag: with ``flagged_at`` unset,
    ``flagged_reason`` keeps when it was cleared and what the flag said
    (:data:`CLEARED_PREFIX`), and :func:`check_worker` looks only at jobs ended since.
    """
    worker = session.get(Worker, hostname, with_for_update=True)
    if worker is None or worker.flagged_at is None:
        return False
    was = f"was flagged {worker.flagged_at.isoformat()}: {worker.flagged_reason or ''}"
    worker.flagged_reason = f"{CLEARED_PREFIX}{utcnow().isoformat()}; {was}"
    worker.flagged_at = None
    session.flush()
    return True


def cleared_at(worker: Worker) -> datetime | None:
    """When the worker's last flag was cleared (None: never, or it is flagged now)."""
    reason = worker.flagged_reason or ""
    if worker.flagged_at is not None or not reason.startswith(CLEARED_PREFIX):
        return None
    stamp = reason[len(CLEARED_PREFIX) :].split(";", 1)[0]
    try:
        return datetime.fromisoformat(stamp)
    except ValueError:
        return None


def declines_by(session: Session, job_id: uuid.UUID, hostname: str) -> int:
    """How many times ``hostname`` declined the job (its ``declined`` events)."""
    events = session.scalars(
        select(JobEvent.details).where(
            JobEvent.job_id == job_id, JobEvent.type == EventType.DECLINED
        )
    )
    return sum(1 for details in events if (details or {}).get("worker") == hostname)


def other_taker(
    session: Session, settings: Settings, job: Job, hostname: str, failed: set[str]
) -> str | None:
    """Another worker that can take ``job`` now: live, a consumer of its queue, serving its
    model, not draining, not flagged, idle, and not among the ``failed`` workers. Its
    hostname, or None."""
    for worker in online_workers(session, settings):
        if (
            worker.hostname != hostname
            and worker.hostname not in failed
            and job.queue in (worker.queues or [])
            and worker.state is not WorkerState.DRAINING
            and worker.flagged_at is None
            and worker.current_job_id is None
            and serves(worker, job.model or None)
        ):
            return worker.hostname
    return None


def decline_reason(
    session: Session, settings: Settings, job_id: uuid.UUID, hostname: str
) -> str | None:
    """Why ``hostname`` should decline the queued job it was sent, or None to claim it.

    A flagged worker declines every job (it stops consuming at its next heartbeat; until
    then a job that reaches it goes back to the dispatcher). Otherwise it declines a job that
    failed on it with a non-precision error when another worker can take it
    (:func:`other_taker`), :data:`MAX_DECLINES` times at most.
    """
    # One light read decides the usual case (a queued job, a worker not flagged, no failed
    # attempt of it here): claim it. It runs before every claim, on the idle farm's path.
    seen = session.execute(
        select(
            Job.state,
            select(Worker.flagged_at)
            .where(Worker.hostname == hostname)
            .scalar_subquery()
            .label("flagged_at"),
            exists()
            .where(
                Attempt.job_id == Job.id,
                Attempt.worker == hostname,
                Attempt.outcome == AttemptOutcome.FAILED,
                Attempt.error_class.in_(NOT_PRECISION),
            )
            .label("failed_here"),
        ).where(Job.id == job_id)
    ).first()
    if seen is None or seen.state is not JobState.QUEUED:
        return None  # the claim says what to do
    if seen.flagged_at is None and not seen.failed_here:
        return None
    job = session.get(Job, job_id)
    if job is None:
        return None
    worker = session.get(Worker, hostname)
    if worker is not None and worker.flagged_at is not None:
        return f"the worker {hostname} is flagged: {worker.flagged_reason or 'see the admin'}"
    failed = _failed_here(session, job_id)
    if hostname not in failed or declines_by(session, job_id, hostname) >= MAX_DECLINES:
        return None
    other = other_taker(session, settings, job, hostname, set(failed))
    if other is None:
        return None
    last = failed[hostname][-1]
    assert last.error_class is not None
    return (
        f"its attempt {last.number} failed on {hostname} with {last.error_class.label}; "
        f"{other} can take it"
    )


def hand_back_to(
    session: Session,
    settings: Settings,
    job_id: uuid.UUID,
    hostname: str,
    error_class: ErrorClass | None,
) -> str | None:
    """The worker to leave the job to instead of failing it, when its attempt just failed
    on ``hostname`` with ``error_class``; None to fail it as before.

    Only for an error of :data:`NOT_PRECISION`, once per worker and job (a job this worker
    already handed back fails), and while no other worker failed it that way too (two
    workers failing it say the job, not the worker, is at fault); and only when another
    worker can take it now (:func:`other_taker`).
    """
    if error_class not in NOT_PRECISION:
        return None
    job = session.get(Job, job_id)
    if job is None:
        return None
    failed = _failed_here(session, job_id)
    if set(failed) - {hostname}:
        return None
    handed = session.scalars(
        select(JobEvent.details).where(
            JobEvent.job_id == job_id, JobEvent.type == EventType.HANDED_BACK
        )
    )
    if any((details or {}).get("worker") == hostname for details in handed):
        return None
    return other_taker(session, settings, job, hostname, set(failed))
