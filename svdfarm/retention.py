"""Retention: the files of ended jobs deleted once they are older than the farm keeps them.

``SVDFARM_RETENTION`` (the outputs: video and poster) and ``SVDFARM_INPUT_RETENTION`` (the
input image) count from the moment a job ended; 0 keeps them forever. A job's ``expires_at``
is derived from its end and the setting in force, so a changed setting applies to jobs that
ended before it. Every worker's reaper runs a :func:`sweep` each pass (``svdfarm cleanup``
runs one by hand): on PostgreSQL an advisory lock lets one sweeper work at a time, and on any
database each job is marked by a conditional UPDATE (:func:`svdfarm.lifecycle.expire`) whose
winner alone deletes the files, inside the transaction that marks it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, text, tuple_

from svdfarm import lifecycle
from svdfarm.db import Database
from svdfarm.lifecycle import By, IllegalMove
from svdfarm.models import Job, utcnow
from svdfarm.settings import Settings
from svdfarm.states import JobState
from svdfarm.storage import open_store

log = logging.getLogger(__name__)

#: The PostgreSQL advisory lock one sweeper holds while it works.
SWEEP_LOCK = "svdfarm-retention"
#: Jobs read at a time by a pass (see :func:`_due`).
SWEEP_BATCH = 500


@dataclass
class Swept:
    """What one pass did (or, dry, would do): job ids whose outputs or input went, and the
    storage keys deleted."""

    expired: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    dry_run: bool = False
    #: Why the pass did nothing (retention off, another sweeper at work); empty when it ran.
    skipped: str = ""

    def __bool__(self) -> bool:
        """True when the pass expired anything."""
        return bool(self.expired or self.inputs)

    def as_dict(self) -> dict[str, object]:
        """The pass as ``svdfarm cleanup --json`` prints it."""
        return asdict(self)


def expires_at(job: Job, settings: Settings) -> datetime | None:
    """When an ended job's outputs go (``SVDFARM_RETENTION`` after it ended); None: kept."""
    if not settings.retention_s or job.finished_at is None or not job.state.terminal:
        return None
    return job.finished_at + timedelta(seconds=settings.retention_s)


def input_expires_at(job: Job, settings: Settings) -> datetime | None:
    """When an ended job's input goes (``SVDFARM_INPUT_RETENTION`` after it ended)."""
    if not settings.input_retention_s or job.finished_at is None or not job.state.terminal:
        return None
    return job.finished_at + timedelta(seconds=settings.input_retention_s)


def _due(db: Database, settings: Settings, now: datetime) -> Iterator[Job]:
    """Ended jobs with outputs or an input past their time, oldest first, read a batch at a
    time from where the last one ended: each read is a range of a partial index that holds
    only the jobs whose files are still kept, so a pass costs the same at any history."""
    due = []
    if settings.retention_s:
        before = now - timedelta(seconds=settings.retention_s)
        due.append(and_(Job.expired_at.is_(None), Job.finished_at < before))
    if settings.input_retention_s:
        before = now - timedelta(seconds=settings.input_retention_s)
        due.append(and_(Job.input_expired_at.is_(None), Job.finished_at < before))
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        stmt = select(Job).where(Job.state.in_(JobState.terminal_states()), or_(*due))
        if after is not None:
            stmt = stmt.where(tuple_(Job.finished_at, Job.id) > tuple_(*after))
        with db.session() as session:
            batch = list(session.scalars(stmt.order_by(Job.finished_at, Job.id).limit(SWEEP_BATCH)))
        yield from batch
        if len(batch) < SWEEP_BATCH:
            return
        last = batch[-1]
        assert last.finished_at is not None
        after = (last.finished_at, last.id)


@contextmanager
def _one_sweeper(db: Database) -> Iterator[bool]:
    """True when this pass may sweep: on PostgreSQL, while it holds the advisory lock."""
    if db.engine.dialect.name != "postgresql":
        yield True
        return
    with db.engine.connect() as connection:
        key = {"key": SWEEP_LOCK}
        got = connection.scalar(text("SELECT pg_try_advisory_lock(hashtext(:key))"), key)
        try:
            yield bool(got)
        finally:
            if got:
                connection.scalar(text("SELECT pg_advisory_unlock(hashtext(:key))"), key)
            connection.commit()


def sweep(
    db: Database,
    settings: Settings,
    *,
    by: By,
    dry_run: bool = False,
    now: datetime | None = None,
) -> Swept:
    """One pass: delete the outputs and inputs past their retention and mark the jobs.

    ``dry_run`` says what would go and changes nothing; ``now`` is the clock (tests).
    """
    swept = Swept(dry_run=dry_run)
    if not settings.retention_s and not settings.input_retention_s:
        swept.skipped = "retention is off (SVDFARM_RETENTION and SVDFARM_INPUT_RETENTION are 0)"
        return swept
    now = now or utcnow()
    with _one_sweeper(db) as mine:
        if not mine:
            swept.skipped = "another sweeper is at work"
            return swept
        for job in _due(db, settings, now):
            _expire_one(db, settings, job, by=by, now=now, swept=swept)
    return swept


def _expire_one(
    db: Database, settings: Settings, job: Job, *, by: By, now: datetime, swept: Swept
) -> None:
    """Expire what is due of one job; nothing when it changed since it was read."""
    outputs = job.expired_at is None and _past(expires_at(job, settings), now)
    inputs = job.input_expired_at is None and _past(input_expires_at(job, settings), now)
    others = [k for f, k in (job.output_keys or {}).items() if f != "mp4"]
    named = ([job.video_key, job.poster_key, *others] if outputs else []) + (
        [job.input_key] if inputs else []
    )
    keys = [key for key in named if key]
    assert job.finished_at is not None  # _due selects ended jobs only
    if not swept.dry_run:
        store = open_store(settings)
        everything = (outputs or job.expired_at is not None) and (
            inputs or job.input_expired_at is not None
        )
        try:
            with db.begin() as session:
                if not lifecycle.expire(
                    session,
                    job.id,
                    by=by,
                    outputs=outputs,
                    inputs=inputs,
                    files=keys,
                    seen_finished_at=job.finished_at,
                ):
                    return
                # Deleted before the commit: a failed commit leaves the job for the next pass.
                for key in keys:
                    store.delete(key)
                if everything:
                    store.delete_job(job.id)  # its folder, and anything a failed run left
        except IllegalMove:  # requeued since it was read
            return
        log.info("job %s expired: %s", job.id, ", ".join(keys) or "no files")
    if outputs:
        swept.expired.append(str(job.id))
    if inputs:
        swept.inputs.append(str(job.id))
    swept.files.extend(keys)


def _past(moment: datetime | None, now: datetime) -> bool:
    """True when ``moment`` is set and before ``now``."""
    return moment is not None and moment < now
