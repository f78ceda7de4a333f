"""Running one job from its id: claim it in the database, record the attempt, render, store.

Every state change is a conditional UPDATE, so a redelivered or canceled job is never
rendered twice or overwritten once it has finished. Each claim takes a fresh token; the
video is rendered under a name of its own and moved into place only in the transaction that
marks the job succeeded, and only while the token is still the job's. A worker whose job was
taken over (it was thought lost) throws its output away. Status writes are retried while
the database is unreachable (``SVDFARM_DB_RETRY_TIMEOUT``), so a restart of PostgreSQL does
not lose a finished video.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from svdfarm.db import Database, is_unavailable, retrying
from svdfarm.images import open_upright_rgb
from svdfarm.models import Attempt, Job, Worker, utcnow
from svdfarm.params import RenderParams
from svdfarm.reaper import poisoned_message, record_lost_delivery
from svdfarm.registry import effective_state
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, JobState, WorkerState
from svdfarm.storage import Storage
from worker.errors import JobCanceled, classify, user_message
from worker.planner import first_plan
from worker.plans import Plan
from worker.runner import AttemptResult, RenderFailed, local_capabilities, render_with_ladder

log = logging.getLogger(__name__)

_CLAIMABLE = (JobState.QUEUED, JobState.RUNNING)  # RUNNING: redelivered after a lost worker


@dataclass(frozen=True)
class Claimed:
    """What a worker needs of a job it has claimed."""

    params: RenderParams
    input_key: str
    plan: Plan
    reason: str | None
    token: str


def _params_of(job: Job) -> RenderParams:
    """The job's render parameters."""
    return RenderParams(**job.params())


def _claim(db: Database, settings: Settings, job_id: uuid.UUID, hostname: str) -> Claimed | str:
    """Mark the job running under a new token and choose its first plan; or say why not."""
    with db.begin() as session:
        # Locked until this claim commits: two deliveries of one job (a requeue can leave
        # two) are decided one after the other, the second seeing what the first did.
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            return "missing"
        seen_state, seen_token = job.state, job.claim_token
        if job.state is JobState.CANCEL_REQUESTED:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.CANCEL_REQUESTED)
                .values(state=JobState.CANCELED, phase="done", finished_at=utcnow())
            )
            return "canceled"
        if job.state not in _CLAIMABLE:
            return job.state.value
        if job.state is JobState.RUNNING:
            if _running_elsewhere(session, settings, job, hostname):
                # A duplicate delivery while its first worker still beats: that one finishes.
                return "running elsewhere"
            # Redelivered after the worker rendering it died (its pool process was killed).
            streak = record_lost_delivery(session, job)
            if streak >= settings.max_deliveries:
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == JobState.RUNNING)
                    .values(
                        state=JobState.FAILED,
                        error=poisoned_message(streak),
                        claim_token=None,
                        finished_at=utcnow(),
                        updated_at=utcnow(),
                    )
                )
                return "failed"
        token = uuid.uuid4().hex
        unchanged = (
            Job.claim_token.is_(None) if seen_token is None else Job.claim_token == seen_token
        )
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == seen_state, unchanged)
            .values(
                state=JobState.RUNNING,
                phase="loading",
                progress=0.0,
                step=0,
                error=None,
                claim_token=token,
                started_at=utcnow(),
                finished_at=None,
                updated_at=utcnow(),
            )
        )
        if not claimed.rowcount:  # type: ignore[attr-defined]
            return "taken"
        params = _params_of(job)
        casts = settings.casts if job.casts is None else job.casts
        plan, reason = first_plan(local_capabilities(), params, casts=casts, dtypes=job.dtypes)
        session.execute(
            update(Worker)
            .where(Worker.hostname == hostname)
            .values(current_job_id=job_id, last_heartbeat=utcnow())
        )
        session.execute(
            update(Worker)
            .where(Worker.hostname == hostname, Worker.state == WorkerState.IDLE)
            .values(state=WorkerState.BUSY)
        )
        return Claimed(params, job.input_key, plan, reason, token)


def _running_elsewhere(session: Session, settings: Settings, job: Job, hostname: str) -> bool:
    """True when a live worker other than ``hostname`` is still rendering the job.

    Its heartbeat must be fresh, and its row must name the job as the one it runs (the
    heartbeat clears that when the process rendering it died) or it must not have beaten
    since its attempt began: a job requeued once can be delivered twice at the same moment,
    and the second delivery must not take it from the first before that one's heartbeat
    could say so. It retries, and claims the job once a beat shows the owner lost it.
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


class _ProgressWriter:
    """Writes phase and progress to the job row, throttled; stops the render on cancel."""

    def __init__(self, db: Database, job_id: uuid.UUID, interval_s: float) -> None:
        """Write for ``job_id`` at most every ``interval_s`` seconds (phase changes at once)."""
        self.db, self.job_id, self.interval_s = db, job_id, interval_s
        self.last_write = 0.0
        self.last_phase = ""

    def __call__(self, phase: str, progress: float, step: int) -> None:
        """Record progress; raise :class:`JobCanceled` when a cancel was requested."""
        now = time.monotonic()
        if phase == self.last_phase and now - self.last_write < self.interval_s:
            return
        self.last_write, self.last_phase = now, phase
        try:
            with self.db.begin() as session:
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.state == JobState.RUNNING)
                    .values(phase=phase, progress=progress, step=step, updated_at=utcnow())
                )
                state = session.scalar(select(Job.state).where(Job.id == self.job_id))
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            # Progress is advisory: the render goes on; the heartbeat keeps the job ours.
            log.warning("progress of job %s not written: database unavailable", self.job_id)
            return
        if state is JobState.CANCEL_REQUESTED:
            raise JobCanceled()


class _AttemptRows:
    """Records each attempt of the ladder as a row, as it starts and as it ends."""

    def __init__(
        self, db: Database, job_id: uuid.UUID, hostname: str, retry_timeout_s: float = 0.0
    ) -> None:
        """Record attempts of ``job_id`` run by ``hostname``, retrying for ``retry_timeout_s``."""
        self.db, self.job_id, self.hostname = db, job_id, hostname
        self.retry_timeout_s = retry_timeout_s
        self.rows: dict[int, int] = {}  # attempt number in this run -> row id

    def started(self, attempt: AttemptResult) -> None:
        """Insert the attempt's row, numbered after any earlier runs of the job."""
        retrying(
            lambda: self._started(attempt),
            timeout_s=self.retry_timeout_s,
            what=f"job {self.job_id}: recording attempt {attempt.number}",
        )

    def _started(self, attempt: AttemptResult) -> None:
        """One try at inserting the attempt's row."""
        with self.db.begin() as session:
            number = (
                session.scalar(
                    select(func.coalesce(func.max(Attempt.number), 0)).where(
                        Attempt.job_id == self.job_id
                    )
                )
                or 0
            ) + 1
            plan = attempt.plan.as_dict()
            if attempt.reason:
                plan["reason"] = attempt.reason
            row = Attempt(
                job_id=self.job_id,
                number=number,
                worker=self.hostname,
                plan_name=attempt.plan.name,
                plan=plan,
                outcome=AttemptOutcome.RUNNING,
            )
            session.add(row)
            session.flush()
            self.rows[attempt.number] = row.id

    def finished(self, attempt: AttemptResult) -> None:
        """Write how the attempt ended."""
        retrying(
            lambda: self._finished(attempt),
            timeout_s=self.retry_timeout_s,
            what=f"job {self.job_id}: recording how attempt {attempt.number} ended",
        )

    def _finished(self, attempt: AttemptResult) -> None:
        """One try at writing how the attempt ended."""
        with self.db.begin() as session:
            row = session.get(Attempt, self.rows[attempt.number])
            if row is None or row.outcome is not AttemptOutcome.RUNNING:
                return  # the reaper closed it: this worker was taken for lost
            row.finished_at = utcnow()
            row.outcome = attempt.outcome
            row.error_class = attempt.error_class
            row.error_type = attempt.error_type
            row.message = attempt.message
            row.traceback = attempt.traceback
            row.duration_s = attempt.duration_s
            row.peak_memory_bytes = attempt.peak_memory_bytes


def _finish(
    db: Database,
    settings: Settings,
    claimed: Claimed,
    job_id: uuid.UUID,
    hostname: str,
    values: dict[str, Any],
    outputs: dict[Path, Path] | None = None,
) -> bool:
    """Move the job to its end state and free the worker, in one transaction.

    Only while ``claimed.token`` is still the job's; ``outputs`` (rendered file -> its final
    name) are moved into place inside that transaction, so a succeeded job's files are never
    replaced and a job taken over elsewhere gets none of this worker's. Retried while the
    database is unreachable. Returns False (the outputs deleted) when the job was not ours.
    """
    won = retrying(
        lambda: _finish_once(db, claimed.token, job_id, hostname, values, outputs or {}),
        timeout_s=settings.db_retry_timeout_s,
        what=f"job {job_id}: recording how it ended",
    )
    if not won:
        log.warning("job %s was taken over by another worker; this run's output is dropped", job_id)
        for rendered in outputs or {}:
            rendered.unlink(missing_ok=True)
    return won


def _finish_once(
    db: Database,
    token: str,
    job_id: uuid.UUID,
    hostname: str,
    values: dict[str, Any],
    outputs: dict[Path, Path],
) -> bool:
    """One try at :func:`_finish`."""
    now = utcnow()
    with db.begin() as session:
        changed = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.claim_token == token,
                Job.state.in_((JobState.RUNNING, JobState.CANCEL_REQUESTED)),
            )
            .values(finished_at=now, updated_at=now, **values)
        )
        won = bool(changed.rowcount)  # type: ignore[attr-defined]
        if won:
            # The row is locked until commit: nobody else can finish the job meanwhile.
            for rendered, final in outputs.items():
                if rendered.exists():  # a retry after a failed commit finds it moved
                    os.replace(rendered, final)
        session.execute(
            update(Worker)
            .where(Worker.hostname == hostname, Worker.current_job_id == job_id)
            .values(current_job_id=None, last_heartbeat=now)
        )
        session.execute(
            update(Worker)
            .where(Worker.hostname == hostname, Worker.state == WorkerState.BUSY)
            .values(state=WorkerState.IDLE)
        )
    return won


def run_job(db: Database, settings: Settings, job_id: str, hostname: str) -> str:
    """Render job ``job_id`` down the ladder and record everything; returns how it ended."""
    key = uuid.UUID(job_id)
    claimed = retrying(
        lambda: _claim(db, settings, key, hostname),
        timeout_s=settings.db_retry_timeout_s,
        what=f"job {job_id}: claiming it",
    )
    if isinstance(claimed, str):
        log.info("job %s not run: %s", job_id, claimed)
        return claimed
    storage = Storage(settings.storage_dir)
    video_key, poster_key = Storage.key(key, "video.mp4"), Storage.key(key, "poster.png")
    # Rendered under this claim's own names, moved into place only by _finish.
    rendered_video = storage.path(Storage.key(key, f"video.{claimed.token}.mp4"))
    rendered_poster = storage.path(Storage.key(key, f"poster.{claimed.token}.png"))
    outputs = {
        rendered_video: storage.path(video_key),
        rendered_poster: storage.path(poster_key),
    }
    try:
        image = open_upright_rgb(storage.path(claimed.input_key).read_bytes())
        render_with_ladder(
            settings,
            claimed.params,
            claimed.plan,
            claimed.reason,
            image,
            rendered_video,
            rendered_poster,
            _ProgressWriter(db, key, settings.progress_interval_s),
            _AttemptRows(db, key, hostname, settings.db_retry_timeout_s),
        )
    except JobCanceled:
        _finish(db, settings, claimed, key, hostname, {"state": JobState.CANCELED, "phase": "done"})
        _discard(outputs)
        return "canceled"
    except RenderFailed as failed:
        log.warning("job %s failed after %d attempt(s): %s", job_id, len(failed.attempts), failed)
        _finish(
            db, settings, claimed, key, hostname, {"state": JobState.FAILED, "error": str(failed)}
        )
        _discard(outputs)
        return "failed"
    except Exception as exc:
        # Before the first attempt (the input could not be read): record it as one.
        log.exception("job %s failed before rendering", job_id)
        _record_early_failure(db, settings, key, hostname, claimed.plan, exc)
        _finish(
            db,
            settings,
            claimed,
            key,
            hostname,
            {"state": JobState.FAILED, "error": user_message(classify(exc), exc)},
        )
        _discard(outputs)
        return "failed"
    won = _finish(
        db,
        settings,
        claimed,
        key,
        hostname,
        {
            "state": JobState.SUCCEEDED,
            "phase": "done",
            "progress": 1.0,
            "step": claimed.params.num_inference_steps,
            "video_key": video_key,
            "poster_key": poster_key,
        },
        outputs,
    )
    return "succeeded" if won else "superseded"


def _discard(outputs: dict[Path, Path]) -> None:
    """Delete this run's rendered files that were not moved into place."""
    for rendered in outputs:
        rendered.unlink(missing_ok=True)


def _record_early_failure(
    db: Database,
    settings: Settings,
    job_id: uuid.UUID,
    hostname: str,
    plan: Plan,
    exc: BaseException,
) -> None:
    """Record a failure that happened before rendering as a failed attempt."""
    rows = _AttemptRows(db, job_id, hostname, settings.db_retry_timeout_s)
    attempt = AttemptResult(1, plan, None, outcome=AttemptOutcome.FAILED)
    attempt.error_class = classify(exc)
    attempt.error_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
    attempt.message = str(exc)[:10_000]
    attempt.traceback = traceback.format_exc()
    rows.started(attempt)
    rows.finished(attempt)
