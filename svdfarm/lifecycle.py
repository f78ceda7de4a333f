"""The job's life: its allowed moves, who may make each, and one function per move.

This is the only module that writes ``jobs.state``. Each function is a conditional UPDATE on
what its caller saw (the state, the claim token or the time of the last change), so two
actors racing on one job never both win; and each writes a ``job_events`` row in the same
transaction, so the events are the job's story, in order. A move the table does not allow
raises :class:`IllegalMove` naming the job, its state and the move; a move that lost a race
returns False (or None) and changes nothing. The functions never commit: the caller's
transaction holds the change and its event together.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, bindparam, select, update
from sqlalchemy.orm import Session, lazyload
from sqlalchemy.orm.attributes import set_committed_value

from svdfarm import deliveries, webhooks
from svdfarm.models import Job, JobEvent, Worker, utcnow
from svdfarm.settings import Settings
from svdfarm.states import (
    Actor,
    ClaimOutcome,
    ErrorClass,
    EventType,
    JobState,
    Phase,
)

Q, R, CR = JobState.QUEUED, JobState.RUNNING, JobState.CANCEL_REQUESTED
S, F, C = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED
USERS = frozenset({Actor.WEB, Actor.API, Actor.ADMIN, Actor.CLI})
OPERATORS = frozenset({Actor.ADMIN, Actor.CLI})
#: The error type of an attempt closed because its worker was stopping (not a failure).
HANDED_BACK_TYPE = "HandedBack"


@dataclass(frozen=True)
class By:
    """Who makes a move: a kind of actor and, where there is one, its name (a worker's
    hostname, the admin's user name)."""

    kind: Actor
    name: str = ""

    def __str__(self) -> str:
        """``kind:name``, or the kind alone."""
        return self.kind.value + (f":{self.name}" if self.name else "")


@dataclass(frozen=True)
class Move:
    """One allowed move: from these states to one (None: the job stays where it is)."""

    name: str
    sources: tuple[JobState | None, ...]
    target: JobState | None
    actors: frozenset[Actor]
    event: EventType | None
    summary: str


#: Every move a job can make. ``None`` as a source is "no job yet" (submit).
MOVES: tuple[Move, ...] = (
    Move("submit", (None,), Q, frozenset({Actor.WEB, Actor.API}), EventType.SUBMITTED,
         "a request is recorded"),
    Move("publish", (Q,), None, USERS | {Actor.REAPER, Actor.WORKER}, EventType.PUBLISHED,
         "its id is put on its queue (again: by the reaper when the broker lost it, by a "
         "worker that hands it back)"),
    Move("claim", (Q,), R, frozenset({Actor.WORKER}), EventType.CLAIMED,
         "a worker takes it under a new claim token"),
    Move("progress", (R,), None, frozenset({Actor.WORKER}), EventType.PHASE,
         "the worker reports progress; a new phase is an event"),
    Move("attempt_failed", (R, CR), None, frozenset({Actor.WORKER}), EventType.ATTEMPT_FAILED,
         "one rung of the retry ladder failed; the next one starts"),
    Move("succeed", (R, CR), S, frozenset({Actor.WORKER}), EventType.SUCCEEDED,
         "the video is stored"),
    Move("fail", (R, CR), F, frozenset({Actor.WORKER}), EventType.FAILED,
         "every rung failed, or the job cannot be rendered"),
    Move("request_cancel", (R,), CR, USERS, EventType.CANCEL_REQUESTED,
         "a user asks a running job to stop; its worker stops at the next step"),
    Move("cancel", (Q,), C, USERS, EventType.CANCELED, "a user cancels a waiting job"),
    Move("confirm_cancel", (CR,), C, frozenset({Actor.WORKER, Actor.REAPER}),
         EventType.CANCELED, "the worker stopped (or was lost) after a cancel request"),
    Move("requeue", (F, C), Q, OPERATORS, EventType.REQUEUED,
         "an operator queues an ended job again, with overrides"),
    Move("hand_back", (R,), Q, frozenset({Actor.WORKER}), EventType.HANDED_BACK,
         "a stopping worker gives its job back to the queue"),
    Move("lose_worker", (R,), Q, frozenset({Actor.WORKER, Actor.REAPER}),
         EventType.WORKER_LOST, "its worker was lost; the job goes back to the queue"),
    Move("poison", (R,), F, frozenset({Actor.WORKER, Actor.REAPER}), EventType.FAILED,
         "its workers were lost too many times in a row"),
    Move("expire", (S, F, C), None, frozenset({Actor.REAPER, Actor.CLI}), EventType.EXPIRED,
         "retention deleted its outputs or its input (the event names the files)"),
    Move("reprioritize", (Q,), None, OPERATORS, EventType.PRIORITY_CHANGED,
         "an operator changes a waiting job's priority, or moves it to the front"),
    Move("give_up_waiting", (Q,), F, frozenset({Actor.REAPER}), EventType.FAILED,
         "no worker of its class took it within SVDFARM_MAX_WAIT"),
    Move("retry_storage", (F,), Q, frozenset({Actor.REAPER}), EventType.STORAGE_RETRIED,
         "its worker could not store the video (disk full, store down): queued again after "
         "a delay, a few times in a row at most"),
    Move("decline", (Q,), Q, frozenset({Actor.WORKER}), EventType.DECLINED,
         "a worker it failed on (or a flagged one) leaves it for another worker: it waits "
         "for the dispatcher again"),
)  # fmt: skip

_BY_NAME = {move.name: move for move in MOVES}


class IllegalMove(ValueError):
    """A move the table does not allow from the job's state, or not to this actor."""

    def __init__(
        self, job_id: uuid.UUID | str, state: JobState | None, move: str, by: By, why: str = ""
    ):
        """Say which job, in which state, refused which move by whom (and ``why``, when the
        state alone does not say it)."""
        where = state.label if state is not None else "not yet recorded"
        allowed = _BY_NAME[move]
        if why:
            why = f"{move.replace('_', ' ')} is not possible: {why}"
        elif state in allowed.sources or (state is None and None in allowed.sources):
            why = f"{by.kind.label} may not {move.replace('_', ' ')}"
        else:
            sources = ", ".join(s.label if s else "new" for s in allowed.sources)
            why = f"{move.replace('_', ' ')} is allowed only from {sources}"
        super().__init__(f"Job {job_id} is {where}: {why}.")
        self.job_id, self.state, self.move, self.by = job_id, state, move, by


def check_move(job_id: uuid.UUID | str, state: JobState | None, move: str, by: By) -> Move:
    """The move named ``move`` when the table allows it from ``state`` to ``by``."""
    allowed = _BY_NAME[move]
    if state not in allowed.sources or by.kind not in allowed.actors:
        raise IllegalMove(job_id, state, move, by)
    return allowed


def sources(move: str) -> tuple[JobState, ...]:
    """The states the move named ``move`` may start from."""
    return tuple(s for s in _BY_NAME[move].sources if s is not None)


def allowed_moves(state: JobState, actor: Actor) -> list[str]:
    """The names of the moves ``actor`` may make from ``state`` (for pages and the CLI)."""
    return [m.name for m in MOVES if state in m.sources and actor in m.actors]


def record(
    session: Session,
    job_id: uuid.UUID,
    event: EventType,
    by: By,
    details: Mapping[str, Any] | None = None,
) -> JobEvent:
    """Append one event for ``job_id`` to the caller's transaction, with the webhook
    deliveries it makes (svdfarm.webhooks)."""
    row = JobEvent(
        job_id=job_id,
        type=event,
        at=utcnow(),
        actor_kind=by.kind,
        actor=by.name[:255],
        details=dict(details or {}),
    )
    session.add(row)
    session.flush()
    webhooks.on_event(session, row)
    return row


def _move(
    session: Session,
    job_id: uuid.UUID,
    move: Move,
    seen: JobState,
    by: By,
    *,
    where: Iterable[ColumnElement[bool]] = (),
    values: Mapping[str, Any] | None = None,
    details: Mapping[str, Any] | None = None,
) -> bool:
    """Make ``move`` if the job is still in ``seen`` (and ``where`` holds); True if made."""
    if not _update(session, job_id, move, seen, where, values):
        return False
    if move.event is not None:
        record(session, job_id, move.event, by, details)
    return True


def _move_recorded(
    session: Session,
    job_id: uuid.UUID,
    move: Move,
    seen: JobState,
    by: By,
    *,
    where: Iterable[ColumnElement[bool]] = (),
    values: Mapping[str, Any] | None = None,
    details: Mapping[str, Any] | None = None,
) -> JobEvent | None:
    """:func:`_move` for a move with an event: the event it wrote, None when not made (so
    the caller need not read it back)."""
    assert move.event is not None, move.name
    if not _update(session, job_id, move, seen, where, values):
        return None
    return record(session, job_id, move.event, by, details)


def _update(
    session: Session,
    job_id: uuid.UUID,
    move: Move,
    seen: JobState,
    where: Iterable[ColumnElement[bool]],
    values: Mapping[str, Any] | None,
) -> bool:
    """The conditional UPDATE of a move (no event); True when it changed the row."""
    target = {"state": move.target} if move.target is not None else {}
    changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == seen, *where)
        .values(updated_at=utcnow(), **target, **(values or {}))
        .execution_options(synchronize_session=False)
    )
    return bool(changed.rowcount)  # type: ignore[attr-defined]


def _back_to_queue() -> dict[str, Any]:
    """What a job that goes back to the queue forgets of its last run."""
    return {
        "phase": Phase.QUEUED,
        "progress": 0.0,
        "step": 0,
        "error": None,
        "claim_token": None,
        "started_at": None,
        "finished_at": None,
        "expired_at": None,
        "published_at": None,
        "sent_to": None,
    }


def _ended(**values: Any) -> dict[str, Any]:
    """The values of a job that has just ended: done, with its end time."""
    return {
        "phase": Phase.DONE,
        "claim_token": None,
        "finished_at": utcnow(),
        "published_at": None,
        "sent_to": None,
        **values,
    }


def _state_of(session: Session, job_id: uuid.UUID, lock: bool = False) -> JobState | None:
    """The job's state now (row-locked until commit with ``lock``), None when it is gone."""
    stmt = select(Job.state).where(Job.id == job_id)
    if lock:
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


# -- Users: submit, publish, cancel, requeue -------------------------------------------------


def submit(session: Session, job: Job, *, by: By) -> None:
    """Record a new job, queued, with its ``submitted`` event (flushed, not committed)."""
    check_move(job.id, None, "submit", by)
    job.state, job.phase = Q, Phase.QUEUED
    session.add(job)
    session.flush()
    details = {"queue": job.queue, "model": job.model, "precision": job.precision}
    record(session, job.id, EventType.SUBMITTED, by, details)


def publish(
    session: Session,
    job_id: uuid.UUID,
    *,
    by: By,
    seen_updated_at: datetime | None = None,
    waiting_only: bool = False,
    queue: str | None = None,
    sent_to: str | None = None,
) -> bool:
    """Mark a queued job as being put on its queue; the caller sends it after commit.

    With ``seen_updated_at`` only if nobody touched the job since (one reaper of many
    republishes a job); with ``waiting_only`` only if it was not sent already (the
    dispatcher). ``queue`` is the job's queue when the caller knows it (the dispatcher):
    the mark is then one UPDATE, with no read before it. ``sent_to`` names the worker whose
    own queue the job goes to (the dispatcher's choice of a worker with the model loaded);
    None: the job's queue. False when the job is no longer queued, was touched, or is not
    on ``queue``.
    """
    where = [Job.updated_at == seen_updated_at] if seen_updated_at is not None else []
    if queue is None:
        seen = session.execute(select(Job.state, Job.queue).where(Job.id == job_id)).first()
        if seen is None or seen.state is not Q:
            return False
        queue = seen.queue
    else:
        where.append(Job.queue == queue)  # the event names the job's own queue
    move = check_move(job_id, Q, "publish", by)
    if waiting_only:
        where.append(Job.published_at.is_(None))
    values = {"published_at": utcnow(), "sent_to": sent_to}
    details = {"queue": queue, **({"worker": sent_to} if sent_to else {})}
    return _move(session, job_id, move, Q, by, where=where, values=values, details=details)


def publish_failed(session: Session, job_id: uuid.UUID, *, by: By, error: str) -> None:
    """Note that the broker refused a job's id; it stays queued for the reaper to publish."""
    record(session, job_id, EventType.PUBLISH_FAILED, by, {"error": error[:500]})


def cancel(session: Session, job_id: uuid.UUID, *, by: By, reason: str = "") -> JobState:
    """A user's cancel: a queued job is canceled, a running one asked to stop.

    Returns the state it left the job in (cancel requested stays so); raises
    :class:`IllegalMove` for a job that has already ended. A ``reason`` (``purged``) goes
    into the event's details.
    """
    state = _state_of(session, job_id, lock=True)
    if state is CR:
        check_move(job_id, R, "request_cancel", by)  # the same right as asking again
        return CR
    name = "cancel" if state is Q else "request_cancel"
    move = check_move(job_id, state, name, by)
    assert state is not None and move.target is not None
    values = _ended() if move.target is C else {}
    details = {"reason": reason} if reason else None
    made = _move(session, job_id, move, state, by, values=values, details=details)
    if not made:  # pragma: no cover - locked
        raise IllegalMove(job_id, _state_of(session, job_id), name, by)
    return move.target


def requeue(
    session: Session, job_id: uuid.UUID, *, by: By, overrides: Mapping[str, Any] | None = None
) -> bool:
    """Queue an ended job again (failed or canceled), with column ``overrides``.

    Raises :class:`IllegalMove` from another state; False when it changed meanwhile.
    """
    state = _state_of(session, job_id, lock=True)
    move = check_move(job_id, state, "requeue", by)
    assert state is not None
    values = {**_back_to_queue(), **(overrides or {})}
    details = {"from": state.value, "overrides": _plain(overrides or {})}
    return _move(session, job_id, move, state, by, values=values, details=details)


def reprioritize(
    session: Session, job_id: uuid.UUID, *, by: By, priority: int | None = None, front: bool = False
) -> int:
    """Change a waiting job's ``priority`` (-10..10), or with ``front`` move it to the front
    (the highest priority, so the dispatcher sends it next). Returns the new priority.

    Raises :class:`IllegalMove` when the job is not queued (a job already sent to a worker
    keeps its place: the broker holds it), ValueError for a priority out of range.
    """
    from svdfarm.users import MAX_PRIORITY, MIN_PRIORITY

    if front:
        priority = MAX_PRIORITY
    if priority is None or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"A priority is an integer from {MIN_PRIORITY} to {MAX_PRIORITY}.")
    seen = session.execute(
        select(Job.state, Job.priority, Job.published_at).where(Job.id == job_id).with_for_update()
    ).first()
    state = seen.state if seen is not None else None
    move = check_move(job_id, state, "reprioritize", by)
    assert seen is not None
    if seen.published_at is not None:
        raise IllegalMove(job_id, state, "reprioritize", by, why="it was already sent to a worker")
    details = {"from": seen.priority, "to": priority, "front": front}
    where = [Job.published_at.is_(None)]
    values = {"priority": priority}
    if not _move(session, job_id, move, Q, by, where=where, values=values, details=details):
        raise IllegalMove(job_id, _state_of(session, job_id), "reprioritize", by)
    return priority


def give_up_waiting(session: Session, job_id: uuid.UUID, *, by: By, waited_s: float) -> bool:
    """Fail a queued job that no worker of its class took within ``SVDFARM_MAX_WAIT``."""
    move = check_move(job_id, Q, "give_up_waiting", by)
    minutes = waited_s / 60
    error = (
        f"No worker that can run this job came online within {minutes:.0f} min "
        "(SVDFARM_MAX_WAIT); requeue it once one does."
    )
    details = {"reason": "max_wait", "waited_s": round(waited_s)}
    return _move(session, job_id, move, Q, by, values=_ended(error=error), details=details)


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """Column values as JSON can hold them."""
    return {k: v.value if hasattr(v, "value") else v for k, v in values.items()}


# -- Workers: claim, progress, attempts, the end ---------------------------------------------


@dataclass
class Claim:
    """What a claim found: the outcome, and the job and its new token when claimed."""

    outcome: ClaimOutcome
    job: Job | None = None
    token: str = ""
    event: JobEvent | None = field(default=None, repr=False)


def claim(
    session: Session,
    settings: Settings,
    job_id: uuid.UUID,
    *,
    by: By,
    more_details: Callable[[Job], Mapping[str, Any]] | None = None,
) -> Claim:
    """Take the job for the worker ``by`` under a new claim token, or say why not.

    The row is locked until the caller commits, so two deliveries of one job are decided
    one after the other. A job still running is a redelivery: left alone while a live
    worker renders it, else its lost run is recorded (and the job poisoned after
    ``SVDFARM_MAX_DELIVERIES`` such losses in a row) before it is claimed again.
    ``more_details``, called with the locked job just before the ``claimed`` event is
    written, adds to that event's details (the worker's first plan): it is written once.
    """
    # The job's attempts are not read with it (a query of their own, on the idle farm's path
    # from submit to render); whoever needs them loads them.
    job = session.get(
        Job,
        job_id,
        with_for_update=True,
        populate_existing=True,
        options=[lazyload(Job.attempts)],
    )
    if job is None:
        return Claim(ClaimOutcome.MISSING)
    if job.state is CR:
        confirm_cancel(session, job_id, by=by, reason="its cancel was requested before it ran")
        return Claim(ClaimOutcome.CANCELED, job)
    if not job.state.claimable:
        return Claim(ClaimOutcome.FINISHED, job)
    seen_token = job.claim_token
    redelivered = job.state is R
    if redelivered:
        if deliveries.running_elsewhere(session, settings, job, by.name):
            return Claim(ClaimOutcome.RUNNING_ELSEWHERE, job)
        # Redelivered after the worker rendering it died (its pool process was killed).
        if settle_lost(session, settings, job, by=by, seen_updated_at=None) is not Q:
            return Claim(ClaimOutcome.POISONED, job)
        seen_token = None
    move = check_move(job_id, Q, "claim", by)
    token = uuid.uuid4().hex
    unchanged = Job.claim_token.is_(None) if seen_token is None else Job.claim_token == seen_token
    values = {
        "phase": Phase.LOADING,
        "progress": 0.0,
        "step": 0,
        "error": None,
        "claim_token": token,
        "published_at": None,
        "sent_to": None,
        "started_at": utcnow(),
        "finished_at": None,
    }
    details: dict[str, Any] = {"worker": by.name, "queue": job.queue}
    if more_details is not None:
        details.update(more_details(job))
    event = _move_recorded(
        session, job_id, move, Q, by, where=[unchanged], values=values, details=details
    )
    if event is None:
        return Claim(ClaimOutcome.TAKEN, job)
    if redelivered:
        session.refresh(job)  # the lost run's settling changed more than the claim
    else:
        # The locked row now holds what the UPDATE wrote: no read back (the claim is on the
        # idle farm's path from submit to render).
        for key, value in {"state": R, **values}.items():
            set_committed_value(job, key, value)
        session.expire(job, ["updated_at"])
    return Claim(ClaimOutcome.CLAIMED, job, token, event)


def progress(
    session: Session, job_id: uuid.UUID, *, by: By, phase: Phase, fraction: float, step: int
) -> JobState | None:
    """Write a running job's progress; a new phase is an event. Returns the job's state."""
    phase_changed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == R, Job.phase != phase)
        .values(phase=phase, progress=fraction, step=step, updated_at=utcnow())
    )
    if phase_changed.rowcount:  # type: ignore[attr-defined]
        record(session, job_id, EventType.PHASE, by, {"phase": phase.value, "step": step})
    else:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == R)
            .values(progress=fraction, step=step, updated_at=utcnow())
        )
    return _state_of(session, job_id)


def _holding(job_id: uuid.UUID, token: str) -> list[ColumnElement[bool]]:
    """The condition that the claim with ``token`` still holds the job."""
    return [Job.id == job_id, Job.claim_token == token]


def _finish_move(
    session: Session,
    job_id: uuid.UUID,
    name: str,
    by: By,
    token: str,
    *,
    values: Mapping[str, Any] | None = None,
    details: Mapping[str, Any] | None = None,
) -> bool:
    """A worker's move on the job its claim ``token`` holds; False when no longer held."""
    state = session.scalar(select(Job.state).where(*_holding(job_id, token)).with_for_update())
    if state is None or not state.active:
        return False
    move = check_move(job_id, state, name, by)
    where = [Job.claim_token == token]
    return _move(session, job_id, move, state, by, where=where, values=values, details=details)


def attempt_failed(
    session: Session, job_id: uuid.UUID, *, by: By, token: str, details: Mapping[str, Any]
) -> bool:
    """One rung of the ladder failed and the next starts (``details``: plans, error class)."""
    return _finish_move(session, job_id, "attempt_failed", by, token, details=details)


def succeed(
    session: Session,
    job_id: uuid.UUID,
    *,
    by: By,
    token: str,
    values: Mapping[str, Any],
    details: Mapping[str, Any] | None = None,
) -> bool:
    """The claim ``token`` finished the job with its video (``values``: keys, step)."""
    done = _ended(progress=1.0, error=None, **values)
    return _finish_move(session, job_id, "succeed", by, token, values=done, details=details)


def fail(
    session: Session,
    job_id: uuid.UUID,
    *,
    by: By,
    token: str,
    error: str,
    details: Mapping[str, Any] | None = None,
) -> bool:
    """The claim ``token`` gives the job up with ``error`` (every rung failed, bad input)."""
    values = _ended(error=error)
    return _finish_move(session, job_id, "fail", by, token, values=values, details=details)


def confirm_cancel(
    session: Session, job_id: uuid.UUID, *, by: By, token: str | None = None, reason: str = ""
) -> bool:
    """A job whose cancel was requested stops: canceled (by its worker, or on its claim)."""
    where = [Job.claim_token == token] if token is not None else []
    move = check_move(job_id, CR, "confirm_cancel", by)
    details = {"reason": reason} if reason else {}
    return _move(session, job_id, move, CR, by, where=where, values=_ended(), details=details)


def hand_back(
    session: Session, job_id: uuid.UUID, *, by: By, message: str, after_failure: bool = False
) -> bool:
    """A stopping worker gives its running job back: its attempt closed, the job queued
    (``after_failure``: a worker whose attempt failed leaves the job to another one)."""
    state = _state_of(session, job_id, lock=True)
    if state is not R:
        return False
    move = check_move(job_id, state, "hand_back", by)
    deliveries.close_running_attempts(
        session, job_id, error_class=ErrorClass.OTHER, error_type=HANDED_BACK_TYPE, message=message
    )
    details: dict[str, Any] = {"worker": by.name, "reason": message}
    if after_failure:
        details["after_failure"] = True
    return _move(session, job_id, move, R, by, values=_back_to_queue(), details=details)


def decline(session: Session, job_id: uuid.UUID, *, by: By, reason: str) -> bool:
    """The worker ``by`` would not take a queued job sent to it (its attempt failed on that
    worker and another worker can take it, or the worker is flagged: svdfarm.worker_health).

    The job stays queued and waits in the database again (``published_at`` unset), so the
    next dispatch pass sends it on; the ``declined`` event names the worker and the
    ``reason``. False when the job is no longer queued (nothing changes).
    """
    state = _state_of(session, job_id, lock=True)
    if state is not Q:
        return False
    move = check_move(job_id, state, "decline", by)
    details = {"worker": by.name, "reason": reason[:500]}
    values = {"published_at": None, "sent_to": None}
    return _move(session, job_id, move, Q, by, values=values, details=details)


# -- Retention and storage failures ---------------------------------------------------------


def expire(
    session: Session,
    job_id: uuid.UUID,
    *,
    by: By,
    outputs: bool,
    inputs: bool,
    files: list[str],
    seen_finished_at: datetime,
) -> bool:
    """Mark an ended job's ``outputs`` and/or ``inputs`` deleted by retention, its state kept.

    The event names the ``files``. Only if the job still ended at ``seen_finished_at`` (not
    requeued since); False when it was, or someone else expired them meanwhile: the caller
    deletes the files only when this returns True, in the same transaction.
    """
    state = _state_of(session, job_id, lock=True)
    move = check_move(job_id, state, "expire", by)
    assert state is not None
    now = utcnow()
    where: list[ColumnElement[bool]] = [Job.finished_at == seen_finished_at]
    values: dict[str, Any] = {}
    if outputs:
        where.append(Job.expired_at.is_(None))
        values["expired_at"] = now
    if inputs:
        where.append(Job.input_expired_at.is_(None))
        values["input_expired_at"] = now
    if not values:
        return False
    details = {"outputs": outputs, "input": inputs, "files": files}
    return _move(session, job_id, move, state, by, where=where, values=values, details=details)


def retry_storage(
    session: Session, settings: Settings, job_id: uuid.UUID, *, by: By, seen_finished_at: datetime
) -> bool:
    """Queue again a job that failed because its worker could not store the video.

    Only while its last ``SVDFARM_MAX_DELIVERIES`` lives did not all end that way (the cap,
    as for poison jobs) and only if nobody touched it since it ended at ``seen_finished_at``.
    The caller publishes it after commit. False when it stays failed.
    """
    state = _state_of(session, job_id, lock=True)
    if state is not F:
        return False
    move = check_move(job_id, state, "retry_storage", by)
    streak = storage_failures_in_a_row(session, job_id)
    if not 0 < streak < settings.max_deliveries:
        return False
    where = [Job.finished_at == seen_finished_at]
    details = {"storage_failures_in_a_row": streak}
    values = _back_to_queue()
    return _move(session, job_id, move, F, by, where=where, values=values, details=details)


def storage_failures_in_a_row(session: Session, job_id: uuid.UUID) -> int:
    """How many of the job's latest lives, counted back from the last, failed because the
    video could not be stored (their ``failed`` event's error class is ``storage``)."""
    ends = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.type.in_(_TERMINAL_EVENTS))
        .order_by(JobEvent.id.desc())
    )
    streak = 0
    for event in ends:
        if event.type is not EventType.FAILED or not is_storage_failure(event.details):
            break
        streak += 1
    return streak


def is_storage_failure(details: Mapping[str, Any]) -> bool:
    """True for the details of a ``failed`` event whose video could not be stored."""
    return details.get("error_class") == ErrorClass.STORAGE.value


_TERMINAL_EVENTS = [e for e in EventType if e.terminal]


# -- Lost workers and poison jobs ------------------------------------------------------------


def settle_lost(
    session: Session,
    settings: Settings,
    job: Job,
    *,
    by: By,
    seen_updated_at: datetime | None,
) -> JobState | None:
    """Decide a job whose worker was lost: queued again, failed as poison, or canceled.

    Its running attempt is recorded as lost. A job whose cancel was requested is canceled;
    one lost ``SVDFARM_MAX_DELIVERIES`` times in a row fails (the poison rule, here only);
    any other goes back to the queue. With ``seen_updated_at``, only if nobody changed the
    job since; returns the state it was left in, or None when someone else handled it.
    """
    state = job.state
    if not state.active:
        return None
    lost_worker = session.scalar(select(Worker.hostname).where(Worker.current_job_id == job.id))
    streak = deliveries.record_lost_delivery(session, job)
    where = [Job.updated_at == seen_updated_at] if seen_updated_at is not None else []
    details = {"worker": lost_worker or "", "lost_in_a_row": streak}
    if state is CR:
        move = check_move(job.id, state, "confirm_cancel", by)
        details["reason"] = "its worker was lost after the cancel request"
        values = _ended()
    elif streak >= settings.max_deliveries:
        move = check_move(job.id, state, "poison", by)
        details["reason"] = "poison"
        values = _ended(error=deliveries.poisoned_message(streak))
    else:
        move = check_move(job.id, state, "lose_worker", by)
        values = _back_to_queue()
    if not _move(session, job.id, move, state, by, where=where, values=values, details=details):
        session.rollback()
        return None
    session.execute(
        update(Worker).where(Worker.current_job_id == job.id).values(current_job_id=None)
    )
    assert move.target is not None
    return move.target


# -- Reading ---------------------------------------------------------------------------------


#: A job's events after an event id, oldest first: built once (every status page reads it).
_EVENTS_OF = (
    select(JobEvent)
    .where(JobEvent.job_id == bindparam("job_id"), JobEvent.id > bindparam("after"))
    .order_by(JobEvent.id)
)


def events_of(session: Session, job_id: uuid.UUID, after: int = 0) -> list[JobEvent]:
    """The job's events in order (those after event id ``after``)."""
    return list(session.scalars(_EVENTS_OF, {"job_id": job_id, "after": after}))


def mermaid() -> str:
    """The state diagram as a Mermaid block, drawn from :data:`MOVES`."""
    lines = ["stateDiagram-v2"]
    for move in MOVES:
        for source in move.sources:
            start = "[*]" if source is None else source.value
            end = (move.target or source or Q).value
            who = ", ".join(sorted(a.value for a in move.actors))
            lines.append(f"    {start} --> {end}: {move.name} ({who})")
    for state in JobState.terminal_states():
        lines.append(f"    {state.value} --> [*]")
    return "\n".join(lines)
