"""A full disk loses nothing: submits are refused while the store is nearly full, and a job
whose worker could not store its video goes back to the queue after a delay.

A worker that meets ENOSPC (or a store error) records the attempt with the error class
``storage`` and the job fails with a message that says so; the reaper's next pass after
:data:`STORAGE_RETRY_DELAY_S` queues it again (:func:`svdfarm.lifecycle.retry_storage`),
until ``SVDFARM_MAX_DELIVERIES`` lives in a row ended that way. Its input stays where it was.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from svdfarm import lifecycle
from svdfarm.db import Database
from svdfarm.lifecycle import By
from svdfarm.models import Job, JobEvent, storage_failure_event, utcnow
from svdfarm.settings import Settings
from svdfarm.states import JobState
from svdfarm.storage import open_store

#: How long a job that failed to store its video waits before it is queued again.
STORAGE_RETRY_DELAY_S = 60.0
#: How long a client refused for a full disk is asked to wait.
LOW_SPACE_RETRY_AFTER_S = 60


def low_space(settings: Settings) -> str | None:
    """Why a submit must wait for space (with the figures and what to do), or None; a store
    without a bound (S3) never refuses."""
    limit = settings.min_free_bytes
    if not limit or settings.storage.path is None:
        return None
    free = open_store(settings).free_bytes()
    if free is None or free >= limit:
        return None
    return (
        f"The farm's storage is nearly full ({free / 2**20:.0f} MiB free, at least "
        f"{limit / 2**20:.0f} MiB needed by SVDFARM_MIN_FREE_BYTES), so no job is taken now. "
        f"Try again in {LOW_SPACE_RETRY_AFTER_S} s; an operator can free space (svdfarm "
        "cleanup, SVDFARM_RETENTION) or add some."
    )


def retry_storage_failures(
    db: Database, settings: Settings, *, by: By, now: datetime | None = None
) -> list[Job]:
    """Queue again the jobs that failed to store their video at least
    :data:`STORAGE_RETRY_DELAY_S` ago (within the cap); returns them, for the caller to
    publish."""
    before = (now or utcnow()) - timedelta(seconds=STORAGE_RETRY_DELAY_S)
    with db.session() as session:
        failed = session.scalars(
            select(Job)
            .where(
                Job.state == JobState.FAILED,
                Job.finished_at < before,
                # Jobs that ever failed to store (a partial index holds just those events:
                # rare, so the pass does not read every failed job of the history).
                Job.id.in_(select(JobEvent.job_id).where(storage_failure_event())),
                # The failed event of its current life says the video could not be stored.
                select(JobEvent.id)
                .where(
                    JobEvent.job_id == Job.id,
                    storage_failure_event(),
                    JobEvent.at >= Job.finished_at,
                )
                .exists(),
            )
            .order_by(Job.finished_at)
        ).all()
    retried = []
    for job in failed:
        assert job.finished_at is not None
        with db.begin() as session:
            if lifecycle.retry_storage(
                session, settings, job.id, by=by, seen_finished_at=job.finished_at
            ):
                retried.append(job)
    return retried
