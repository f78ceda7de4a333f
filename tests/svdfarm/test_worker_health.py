"""A bad worker does not eat the ladder (svdfarm.worker_health): a worker that fails several
jobs in a row with the same non-precision error is flagged until cleared, and a worker a job
failed on leaves it to another free worker (declines it, at most twice)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import update

from svdfarm import lifecycle, worker_health
from svdfarm.db import Database
from svdfarm.lifecycle import By
from svdfarm.models import Attempt, Worker, utcnow
from svdfarm.settings import Settings
from svdfarm.states import Actor, AttemptOutcome, ErrorClass, EventType, JobState, WorkerState
from tests.conftest import DATABASES
from tests.rows import QUEUE, add_job, add_worker, read_job

W1, W2 = "w1@farm", "w2@farm"
FULL = "OSError: [Errno 28] No space left on device: '/scratch/svdfarm-x/video.mp4'"


def fail_on(
    db: Database,
    settings: Settings,
    worker: str,
    error_class: ErrorClass | None,
    minutes_ago: float,
    error: str = FULL,
) -> uuid.UUID:
    """A job that ended ``minutes_ago`` with one attempt on ``worker``: failed with
    ``error_class``, or succeeded when it is None."""
    state = JobState.FAILED if error_class is not None else JobState.SUCCEEDED
    return add_job(
        db,
        settings,
        state,
        error_class=error_class,
        worker=worker,
        error=error,
        finished_at=utcnow() - timedelta(minutes=minutes_ago),
    )


def check(db: Database, hostname: str = W1) -> str | None:
    """Run the check in a transaction of its own."""
    with db.begin() as session:
        return worker_health.check_worker(session, hostname)


def worker_row(db: Database, hostname: str = W1) -> Worker:
    """The worker's row, read afresh."""
    with db.session() as session:
        row = session.get(Worker, hostname)
        assert row is not None
        return row


def test_the_error_classes_that_count() -> None:
    """The precision errors (the ladder's) and a lost worker (the poison rule's) never count
    against a worker; a broken card, a full disk, a missing model or a timeout do."""
    assert worker_health.PRECISION.isdisjoint(worker_health.NOT_PRECISION)
    assert ErrorClass.WORKER_LOST not in worker_health.NOT_PRECISION
    assert worker_health.NOT_PRECISION == {
        ErrorClass.STORAGE,
        ErrorClass.OTHER,
        ErrorClass.TIMEOUT,
        ErrorClass.MODEL_UNAVAILABLE,
    }


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_three_jobs_in_a_row_failing_the_same_way_flag_the_worker(
    db: Database, settings: Settings
) -> None:
    """Two failures leave the worker alone; the third of the same class flags it, with a
    reason naming the class, the jobs and their (shortened) errors."""
    add_worker(db, W1, [QUEUE])
    long_error = "No space left on device " + "x" * 500
    jobs = [fail_on(db, settings, W1, ErrorClass.STORAGE, 30 - i, long_error) for i in range(2)]
    fail_on(db, settings, W2, ErrorClass.STORAGE, 1)  # another worker's failure: not W1's
    assert check(db) is None and worker_row(db).flagged_at is None
    jobs.append(fail_on(db, settings, W1, ErrorClass.STORAGE, 10, long_error))
    reason = check(db)
    assert reason is not None and reason.startswith("3 jobs in a row failed here with storage")
    assert all(str(job_id) in reason for job_id in jobs)
    assert "No space left on device" in reason and "x" * 200 not in reason
    row = worker_row(db)
    assert row.flagged_at is not None and row.flagged_reason == reason
    assert check(db) is None  # already flagged: nothing new
    assert worker_row(db).flagged_at == row.flagged_at


@pytest.mark.parametrize(
    "between",
    [ErrorClass.OTHER, ErrorClass.OUT_OF_MEMORY, ErrorClass.WORKER_LOST, None],
    ids=["another-class", "precision", "worker-lost", "success"],
)
@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_different_job_end_in_between_breaks_the_run(
    db: Database, settings: Settings, between: ErrorClass | None
) -> None:
    """Storage, then another class / a precision error / a lost worker / a success, then
    storage twice: not three in a row of one class, no flag; one more storage failure and
    the last three are, so it flags."""
    add_worker(db, W1, [QUEUE])
    fail_on(db, settings, W1, ErrorClass.STORAGE, 40)
    fail_on(db, settings, W1, between, 30)
    fail_on(db, settings, W1, ErrorClass.STORAGE, 20)
    fail_on(db, settings, W1, ErrorClass.STORAGE, 10)
    assert check(db) is None and worker_row(db).flagged_at is None
    fail_on(db, settings, W1, ErrorClass.STORAGE, 5)
    assert check(db) is not None


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_clear_flag_forgets_the_failures_before_it(db: Database, settings: Settings) -> None:
    """Clearing unflags the worker (once; an unknown or unflagged worker: False); the
    failures before it no longer count, three new ones flag it again."""
    add_worker(db, W1, [QUEUE])
    for minutes in (30, 20, 10):
        fail_on(db, settings, W1, ErrorClass.OTHER, minutes)
    assert check(db) is not None
    with db.begin() as session:
        assert worker_health.clear_flag(session, W1) is True
        assert worker_health.clear_flag(session, W1) is False
        assert worker_health.clear_flag(session, "nobody@farm") is False
    row = worker_row(db)
    assert row.flagged_at is None and worker_health.cleared_at(row) is not None
    assert check(db) is None
    fail_on(db, settings, W1, ErrorClass.OTHER, -1)  # ended after the clear
    fail_on(db, settings, W1, ErrorClass.OTHER, -2)
    assert check(db) is None
    fail_on(db, settings, W1, ErrorClass.OTHER, -3)
    assert check(db) is not None and worker_row(db).flagged_at is not None


def queued_job_failed_on(db: Database, settings: Settings, worker: str) -> uuid.UUID:
    """A queued job (sent to its queue) whose earlier attempt failed on ``worker`` with a
    storage error."""
    job_id = fail_on(db, settings, worker, ErrorClass.STORAGE, 5)
    with db.begin() as session:
        lifecycle.requeue(session, job_id, by=By(Actor.ADMIN, "admin"))
        lifecycle.publish(session, job_id, by=By(Actor.ADMIN, "admin"))
    return job_id


def reason(db: Database, settings: Settings, job_id: uuid.UUID, hostname: str = W1) -> str | None:
    """Why ``hostname`` should decline the job, read in a session of its own."""
    with db.session() as session:
        return worker_health.decline_reason(session, settings, job_id, hostname)


@pytest.mark.parametrize(
    "other",
    ["none", "busy", "draining", "flagged", "offline", "failed-too", "other-queue", "idle"],
)
@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_worker_declines_a_job_it_failed_only_for_another_free_worker(
    db: Database, settings: Settings, other: str
) -> None:
    """W1 failed the job with a storage error; it declines it only when another live, idle,
    unflagged, not draining consumer of its queue that did not fail it exists."""
    add_worker(db, W1, [QUEUE])
    job_id = queued_job_failed_on(db, settings, W1)
    if other != "none":
        add_worker(
            db,
            W2,
            ["svd.cuda.bf16.80g"] if other == "other-queue" else [QUEUE],
            heartbeat_age_s=3600 if other == "offline" else 1,
            state=WorkerState.DRAINING if other == "draining" else WorkerState.IDLE,
            current_job_id=add_job(db, settings, JobState.RUNNING) if other == "busy" else None,
        )
    if other == "flagged":
        with db.begin() as session:
            session.execute(update(Worker).where(Worker.hostname == W2).values(flagged_at=utcnow()))
    if other == "failed-too":
        with db.begin() as session:
            session.add(
                Attempt(
                    job_id=job_id,
                    number=2,
                    worker=W2,
                    plan_name="fp32 on cuda",
                    plan={},
                    finished_at=utcnow(),
                    outcome=AttemptOutcome.FAILED,
                    error_class=ErrorClass.TIMEOUT,
                )
            )
    why = reason(db, settings, job_id)
    if other == "idle":
        assert why is not None and W2 in why and "storage" in why
    else:
        assert why is None
    if other in ("idle", "busy", "other-queue"):
        assert reason(db, settings, job_id, W2) is None  # W2 never failed it


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_decline_sends_the_job_back_to_the_dispatcher_twice_at_most(
    db: Database, settings: Settings
) -> None:
    """A decline keeps the job queued, unsets ``published_at`` (the dispatcher sends it
    again) and records a ``declined`` event naming the worker; after two, W1 claims it."""
    add_worker(db, W1, [QUEUE])
    add_worker(db, W2, [QUEUE])
    job_id = queued_job_failed_on(db, settings, W1)
    by = By(Actor.WORKER, W1)
    for n in (1, 2):
        why = reason(db, settings, job_id)
        assert why is not None
        with db.begin() as session:
            assert lifecycle.decline(session, job_id, by=by, reason=why) is True
        job = read_job(db, job_id)
        assert job is not None and job.state is JobState.QUEUED and job.published_at is None
        with db.session() as session:
            last = lifecycle.events_of(session, job_id)[-1]
            assert worker_health.declines_by(session, job_id, W1) == n
            assert worker_health.declines_by(session, job_id, W2) == 0
        assert last.type is EventType.DECLINED and last.actor == W1
        assert last.details == {"worker": W1, "reason": why}
        with db.begin() as session:
            lifecycle.publish(session, job_id, by=By(Actor.WORKER, W2))
    assert reason(db, settings, job_id) is None  # declined twice: it claims it now


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_decline_is_only_for_a_queued_job(db: Database, settings: Settings) -> None:
    """A job no longer queued is not declined (False, no event); a user may not decline."""
    job_id = add_job(db, settings, JobState.RUNNING)
    with db.begin() as session:
        assert lifecycle.decline(session, job_id, by=By(Actor.WORKER, W1), reason="x") is False
        assert not any(e.type is EventType.DECLINED for e in lifecycle.events_of(session, job_id))
    queued = add_job(db, settings, JobState.QUEUED)
    with db.begin() as session, pytest.raises(lifecycle.IllegalMove):
        lifecycle.decline(session, queued, by=By(Actor.API), reason="x")


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_flagged_worker_declines_every_job(db: Database, settings: Settings) -> None:
    """A flagged worker declines any job that still reaches it, another worker or not,
    however often."""
    add_worker(db, W1, [QUEUE])
    job_id = add_job(db, settings, JobState.QUEUED)
    assert reason(db, settings, job_id) is None
    with db.begin() as session:
        session.execute(
            update(Worker)
            .where(Worker.hostname == W1)
            .values(flagged_at=utcnow(), flagged_reason="3 jobs in a row failed here")
        )
    for _ in range(3):
        why = reason(db, settings, job_id)
        assert why is not None and "flagged" in why
        with db.begin() as session:
            assert lifecycle.decline(session, job_id, by=By(Actor.WORKER, W1), reason=why)
