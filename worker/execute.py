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

from svdfarm.db import Database
from svdfarm.images import open_upright_rgb
from svdfarm.models import Attempt, Job, Worker, utcnow
from svdfarm.params import RenderParams
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, ErrorClass, JobState, WorkerState
from svdfarm.storage import Storage
from worker.errors import JobCanceled, classify, user_message
from worker.plans import Plan, choose_plan
from worker.runner import render_to_files

log = logging.getLogger(__name__)

_CLAIMABLE = (JobState.QUEUED, JobState.RUNNING)  # RUNNING: redelivered after a lost worker


@dataclass(frozen=True)
class Claimed:
    """What a worker needs of a job it has claimed."""

    params: RenderParams
    input_key: str
    attempt_id: int
    plan: Plan


def _params_of(job: Job) -> RenderParams:
    """The job's render parameters."""
    return RenderParams(**job.params())


def _claim(db: Database, job_id: uuid.UUID, hostname: str) -> Claimed | str:
    """Mark the job running and insert its attempt; or say why there is nothing to do."""
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
        plan, reason = choose_plan(params.precision)
        number = (
            session.scalar(select(func.coalesce(func.max(Attempt.number), 0)).where(
                Attempt.job_id == job_id
            ))
            or 0
        ) + 1
        attempt = Attempt(
            job_id=job_id,
            number=number,
            worker=hostname,
            plan_name=plan.name,
            plan={**plan.as_dict(), **({"reason": reason} if reason else {})},
            outcome=AttemptOutcome.RUNNING,
        )
        session.add(attempt)
        session.execute(
            update(Worker)
            .where(Worker.hostname == hostname)
            .values(state=WorkerState.BUSY, current_job_id=job_id, last_heartbeat=utcnow())
        )
        session.flush()
        return Claimed(params, job.input_key, attempt.id, plan)


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


def _finish(
    db: Database,
    job_id: uuid.UUID,
    attempt_id: int,
    hostname: str,
    job_values: dict[str, Any],
    attempt_values: dict[str, Any],
) -> None:
    """Close the attempt and move the job to its end state, in one transaction."""
    now = utcnow()
    with db.begin() as session:
        attempt = session.get(Attempt, attempt_id)
        if attempt is not None:
            attempt.finished_at = now
            attempt.duration_s = (now - attempt.started_at).total_seconds()
            for name, value in attempt_values.items():
                setattr(attempt, name, value)
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_((JobState.RUNNING, JobState.CANCEL_REQUESTED)))
            .values(finished_at=now, updated_at=now, **job_values)
        )
        session.execute(
            update(Worker)
            .where(Worker.hostname == hostname)
            .values(state=WorkerState.IDLE, current_job_id=None, last_heartbeat=now)
        )


def run_job(db: Database, settings: Settings, job_id: str, hostname: str) -> str:
    """Render job ``job_id`` and record everything; returns how it ended (for logs)."""
    key = uuid.UUID(job_id)
    claimed = _claim(db, key, hostname)
    if isinstance(claimed, str):
        log.info("job %s not run: %s", job_id, claimed)
        return claimed
    storage = Storage(settings.storage_dir)
    video_key, poster_key = Storage.key(key, "video.mp4"), Storage.key(key, "poster.png")
    report = _ProgressWriter(db, key, settings.progress_interval_s)
    try:
        image = open_upright_rgb(storage.path(claimed.input_key).read_bytes())
        outcome = render_to_files(
            settings,
            claimed.params,
            claimed.plan,
            image,
            storage.path(video_key),
            storage.path(poster_key),
            report,
        )
    except JobCanceled:
        _finish(
            db,
            key,
            claimed.attempt_id,
            hostname,
            {"state": JobState.CANCELED, "phase": "done"},
            {"outcome": AttemptOutcome.CANCELED, "message": "Canceled by request."},
        )
        return "canceled"
    except Exception as exc:
        error_class = classify(exc)
        log.exception("job %s failed (%s)", job_id, error_class.value)
        _finish(
            db,
            key,
            claimed.attempt_id,
            hostname,
            {"state": JobState.FAILED, "error": user_message(error_class, exc)},
            {
                "outcome": AttemptOutcome.FAILED,
                "error_class": error_class,
                "error_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "message": str(exc)[:10_000],
                "traceback": traceback.format_exc(),
            },
        )
        return "failed"
    _finish(
        db,
        key,
        claimed.attempt_id,
        hostname,
        {
            "state": JobState.SUCCEEDED,
            "phase": "done",
            "progress": 1.0,
            "step": claimed.params.num_inference_steps,
            "video_key": video_key,
            "poster_key": poster_key,
        },
        {
            "outcome": AttemptOutcome.SUCCEEDED,
            "peak_memory_bytes": outcome.peak_memory_bytes,
        },
    )
    return "succeeded"
