"""Canceling a job from the web: the database decides, the worker obeys at its next step."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from svdfarm.models import Job, utcnow
from svdfarm.states import JobState


def cancel_job(session: Session, job: Job) -> bool:
    """Cancel ``job``; False when it had already ended. Commits.

    Conditional updates make this safe against a worker changing the state at the same time.
    """
    now = utcnow()
    moves: tuple[tuple[JobState, dict[str, Any]], ...] = (
        # A queued job is skipped by the worker when its id comes off the queue.
        (JobState.QUEUED, {"state": JobState.CANCELED, "phase": "done", "finished_at": now}),
        (JobState.RUNNING, {"state": JobState.CANCEL_REQUESTED}),
    )
    for current, values in moves:
        result = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == current)
            .values(updated_at=now, **values)
        )
        if result.rowcount:  # type: ignore[attr-defined]
            session.commit()
            session.refresh(job)
            return True
    session.rollback()
    return False
