"""Running one job from its id: claim it in the database, record the attempt, render, store.

Every state change is a conditional UPDATE, so a redelivered or canceled job is never
rendered twice or overwritten once it has finished.
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from svdfarm.db import Database
from svdfarm.images import open_upright_rgb
from svdfarm.models import Attempt, Job, Worker, utcnow
from svdfarm.params import RenderParams
from svdfarm.registry import effective_state
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, ErrorClass, JobState, WorkerState
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


def _params_of(job: Job) -> RenderParams:
    """The job's render parameters."""
    return RenderParams(**job.params())


def _claim(db: Database, settings: Settings, job_id: uuid.UUID, hostname: str) -> Claimed | str:
    """Mark the job running and choose its first plan; or say why there is nothing to do."""
    with db.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            return "missing"
        if job.state is JobState.CANCEL_REQUESTED:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.CANCEL_REQUESTED)
                .values(state=JobState.CANCELED, phase="done", finished_at=utcnow())
            )
            return "canceled"
        if job.state not in _CLAIMABLE:
            return job.state.value
        if job.state is JobState.RUNNING and _running_elsewhere(
            session, settings, job_id, hostname
        ):
            # A duplicate delivery while its first worker still beats: that one finishes it.
            return "running elsewhere"
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(_CLAIMABLE))
            .values(
                state=JobState.RUNNING,
                phase="loading",
                progress=0.0,
                step=0,
                error=None,
                started_at=utcnow(),
                finished_at=None,
                updated_at=utcnow(),
            )
        )
        if not claimed.rowcount:  # type: ignore[attr-defined]
            return "taken"
        # An attempt left running by a worker that died is closed before the new one starts.
        session.execute(
            update(Attempt)
            .where(Attempt.job_id == job_id, Attempt.outcome == AttemptOutcome.RUNNING)
            .values(
                outcome=AttemptOutcome.FAILED,
                error_class=ErrorClass.OTHER,
                message="The worker running this attempt was lost; the job was redelivered.",
                finished_at=utcnow(),
            )
        )
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
        return Claimed(params, job.input_key, plan, reason)


def _running_elsewhere(
    session: Session, settings: Settings, job_id: uuid.UUID, hostname: str
) -> bool:
    """True when a live worker other than ``hostname`` is still rendering the job.

    Its heartbeat must be fresh and its row must name the job as the one it runs (the
    heartbeat clears that when the process rendering it died).
    """
    owners = set(
        session.scalars(
            select(Attempt.worker).where(
                Attempt.job_id == job_id, Attempt.outcome == AttemptOutcome.RUNNING
            )
        )
    ) - {hostname}
    if not owners:
        return False
    workers = session.scalars(select(Worker).where(Worker.hostname.in_(owners))).all()
    return any(
        w.current_job_id == job_id and effective_state(w, settings) is not WorkerState.OFFLINE
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
        with self.db.begin() as session:
            session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.state == JobState.RUNNING)
                .values(phase=phase, progress=progress, step=step, updated_at=utcnow())
            )
            state = session.scalar(select(Job.state).where(Job.id == self.job_id))
        if state is JobState.CANCEL_REQUESTED:
            raise JobCanceled()


class _AttemptRows:
    """Records each attempt of the ladder as a row, as it starts and as it ends."""

    def __init__(self, db: Database, job_id: uuid.UUID, hostname: str) -> None:
        """Record attempts of ``job_id`` run by ``hostname``."""
        self.db, self.job_id, self.hostname = db, job_id, hostname
        self.rows: dict[int, int] = {}  # attempt number in this run -> row id

    def started(self, attempt: AttemptResult) -> None:
        """Insert the attempt's row, numbered after any earlier runs of the job."""
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
        with self.db.begin() as session:
            row = session.get(Attempt, self.rows[attempt.number])
            if row is None:
                return
            row.finished_at = utcnow()
            row.outcome = attempt.outcome
            row.error_class = attempt.error_class
            row.error_type = attempt.error_type
            row.message = attempt.message
            row.traceback = attempt.traceback
            row.duration_s = attempt.duration_s
            row.peak_memory_bytes = attempt.peak_memory_bytes


def _finish(db: Database, job_id: uuid.UUID, hostname: str, values: dict[str, Any]) -> None:
    """Move the job to its end state and free the worker, in one transaction."""
    now = utcnow()
    with db.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_((JobState.RUNNING, JobState.CANCEL_REQUESTED)))
            .values(finished_at=now, updated_at=now, **values)
        )
        session.execute(
            update(Worker)
            .where(Worker.hostname == hostname)
            .values(current_job_id=None, last_heartbeat=now)
        )
        session.execute(
            update(Worker)
            .where(Worker.hostname == hostname, Worker.state == WorkerState.BUSY)
            .values(state=WorkerState.IDLE)
        )


def run_job(db: Database, settings: Settings, job_id: str, hostname: str) -> str:
    """Render job ``job_id`` down the ladder and record everything; returns how it ended."""
    key = uuid.UUID(job_id)
    claimed = _claim(db, settings, key, hostname)
    if isinstance(claimed, str):
        log.info("job %s not run: %s", job_id, claimed)
        return claimed
    storage = Storage(settings.storage_dir)
    video_key, poster_key = Storage.key(key, "video.mp4"), Storage.key(key, "poster.png")
    try:
        image = open_upright_rgb(storage.path(claimed.input_key).read_bytes())
        render_with_ladder(
            settings,
            claimed.params,
            claimed.plan,
            claimed.reason,
            image,
            storage.path(video_key),
            storage.path(poster_key),
            _ProgressWriter(db, key, settings.progress_interval_s),
            _AttemptRows(db, key, hostname),
        )
    except JobCanceled:
        _finish(db, key, hostname, {"state": JobState.CANCELED, "phase": "done"})
        return "canceled"
    except RenderFailed as failed:
        log.warning("job %s failed after %d attempt(s): %s", job_id, len(failed.attempts), failed)
        _finish(db, key, hostname, {"state": JobState.FAILED, "error": str(failed)})
        return "failed"
    except Exception as exc:
        # Before the first attempt (the input could not be read): record it as one.
        log.exception("job %s failed before rendering", job_id)
        _record_early_failure(db, key, hostname, claimed.plan, exc)
        _finish(
            db, key, hostname, {"state": JobState.FAILED, "error": user_message(classify(exc), exc)}
        )
        return "failed"
    _finish(
        db,
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
    )
    return "succeeded"


def _record_early_failure(
    db: Database, job_id: uuid.UUID, hostname: str, plan: Plan, exc: BaseException
) -> None:
    """Record a failure that happened before rendering as a failed attempt."""
    rows = _AttemptRows(db, job_id, hostname)
    attempt = AttemptResult(1, plan, None, outcome=AttemptOutcome.FAILED)
    attempt.error_class = classify(exc)
    attempt.error_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
    attempt.message = str(exc)[:10_000]
    attempt.traceback = traceback.format_exc()
    rows.started(attempt)
    rows.finished(attempt)
