"""A bad worker does not eat the ladder, in process: a job whose attempt failed here with a
non-precision error is handed back for another free worker (once per worker), the worker
declines it when it comes back (twice at most), a worker failing three jobs in a row is
flagged and declines everything, and its intake stays paused until the flag is cleared."""

from __future__ import annotations

import errno
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.worker import state as worker_state
from sqlalchemy import select, update

from svdfarm import lifecycle, worker_health
from svdfarm.db import Database
from svdfarm.models import Job, Worker
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, ErrorClass, EventType, JobState, RunOutcome, WorkerState
from tests.conftest import DATABASES
from tests.rows import add_worker, job_with_attempts, submit_small_job, wait_until
from tests.worker.consumers import FakeConsumer
from worker import tasks
from worker.execute import run_job

W1, W2 = "w1@test", "w2@test"


def _full(*_: Any, **__: Any) -> None:
    """What a write on a full scratch disk does."""
    raise OSError(errno.ENOSPC, "No space left on device")


def _oom(*_: Any, **__: Any) -> None:
    """What a card out of memory does."""
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Every render fails as on a full disk until the test undoes it."""
    monkeypatch.setattr("worker.runner.render_to_files", _full)
    yield monkeypatch


def submit(db: Database, settings: Settings, *workers: str) -> uuid.UUID:
    """A small job, with ``workers`` registered (idle, live) on its queue."""
    job_id = submit_small_job(db, settings)
    queue = job_with_attempts(db, job_id).queue
    with db.session() as session:
        known = set(session.scalars(select(Worker.hostname)))
    for hostname in workers:
        if hostname not in known:
            add_worker(db, hostname, [queue], capabilities={"device": "cpu"})
    return job_id


def types(db: Database, job_id: uuid.UUID) -> list[EventType]:
    """The job's event types, in order."""
    with db.session() as session:
        return [e.type for e in lifecycle.events_of(session, job_id)]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_failed_here_goes_to_the_other_worker(
    db: Database, settings: Settings, broken: pytest.MonkeyPatch
) -> None:
    """W1's full disk fails the attempt: the job is handed back (not failed), waiting for
    the dispatcher; W1 declines it when it is sent there again (twice at most); W2 renders
    it. W1 is free again, not flagged."""
    job_id = submit(db, settings, W1, W2)
    assert run_job(db, settings, str(job_id), W1) is RunOutcome.HANDED_BACK
    job = job_with_attempts(db, job_id)
    assert job.state is JobState.QUEUED and job.published_at is None and job.error is None
    [attempt] = job.attempts
    assert (attempt.worker, attempt.outcome, attempt.error_class) == (
        W1,
        AttemptOutcome.FAILED,
        ErrorClass.STORAGE,
    )
    assert types(db, job_id)[-1] is EventType.HANDED_BACK
    with db.session() as session:
        row = session.get(Worker, W1)
        assert row is not None and row.current_job_id is None and row.flagged_at is None
    assert run_job(db, settings, str(job_id), W1) is RunOutcome.DECLINED
    job = job_with_attempts(db, job_id)
    assert job.state is JobState.QUEUED and job.published_at is None and len(job.attempts) == 1
    assert types(db, job_id)[-1] is EventType.DECLINED
    broken.undo()
    assert run_job(db, settings, str(job_id), W2) is RunOutcome.SUCCEEDED
    job = job_with_attempts(db, job_id)
    assert job.state is JobState.SUCCEEDED
    assert [a.worker for a in job.attempts] == [W1, W2]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_without_another_worker_the_job_fails_as_before(
    db: Database, settings: Settings, broken: pytest.MonkeyPatch
) -> None:
    """Alone on its queue, W1 fails the job at once, as before this rule."""
    job_id = submit(db, settings, W1)
    assert run_job(db, settings, str(job_id), W1) is RunOutcome.FAILED
    assert job_with_attempts(db, job_id).state is JobState.FAILED
    assert EventType.HANDED_BACK not in types(db, job_id)


def test_a_precision_error_keeps_the_ladder(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory is the ladder's to handle: the job fails here, with W2 free, and it is
    not handed back."""
    monkeypatch.setattr("worker.runner.render_to_files", _oom)
    job_id = submit(db, settings, W1, W2)
    assert run_job(db, settings, str(job_id), W1) is RunOutcome.FAILED
    job = job_with_attempts(db, job_id)
    assert job.state is JobState.FAILED
    assert job.attempts[-1].error_class is ErrorClass.OUT_OF_MEMORY
    assert EventType.HANDED_BACK not in types(db, job_id)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_each_worker_hands_a_job_back_once_and_declines_it_twice(
    db: Database, settings: Settings, broken: pytest.MonkeyPatch
) -> None:
    """W1 hands the job back once; sent to W1 again it declines twice, then claims it and,
    failing it again, fails it."""
    job_id = submit(db, settings, W1, W2)
    outcomes = [run_job(db, settings, str(job_id), W1) for _ in range(4)]
    assert outcomes == [
        RunOutcome.HANDED_BACK,
        RunOutcome.DECLINED,
        RunOutcome.DECLINED,
        RunOutcome.FAILED,
    ]
    assert job_with_attempts(db, job_id).state is JobState.FAILED
    with db.session() as session:
        assert worker_health.declines_by(session, job_id, W1) == 2


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_failed_on_two_workers_fails(
    db: Database, settings: Settings, broken: pytest.MonkeyPatch
) -> None:
    """W2 fails the job and hands it back; W1 (which never failed it) claims it and fails it
    too: two workers failing it say the job is at fault, it fails."""
    job_id = submit(db, settings, W1, W2)
    assert run_job(db, settings, str(job_id), W2) is RunOutcome.HANDED_BACK
    assert run_job(db, settings, str(job_id), W1) is RunOutcome.FAILED
    job = job_with_attempts(db, job_id)
    assert job.state is JobState.FAILED
    assert [a.worker for a in job.attempts] == [W2, W1]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_three_jobs_failed_in_a_row_flag_the_worker_and_it_declines_the_next(
    db: Database, settings: Settings, broken: pytest.MonkeyPatch
) -> None:
    """W1, alone, fails three jobs with a full disk: flagged after the third (not before),
    with the jobs in the reason; the next job sent to it is declined, not rendered."""
    jobs = [submit(db, settings, W1) for _ in range(4)]
    reason = None
    for n, job_id in enumerate(jobs[:3], start=1):
        assert run_job(db, settings, str(job_id), W1) is RunOutcome.FAILED
        with db.session() as session:
            row = session.get(Worker, W1)
            assert row is not None
            assert (row.flagged_at is not None) is (n == 3)
            reason = row.flagged_reason
    assert reason is not None and "storage" in reason
    assert all(str(job_id) in reason for job_id in jobs[:3])
    assert run_job(db, settings, str(jobs[3]), W1) is RunOutcome.DECLINED
    job = job_with_attempts(db, jobs[3])
    assert job.state is JobState.QUEUED and job.attempts == []


def test_a_failed_health_check_never_breaks_the_finish(
    db: Database, settings: Settings, broken: pytest.MonkeyPatch
) -> None:
    """The check raising is logged; the job is failed all the same."""

    def boom(*_: Any) -> None:
        raise RuntimeError("health check broke")

    broken.setattr(worker_health, "check_worker", boom)
    job_id = submit(db, settings, W1)
    assert run_job(db, settings, str(job_id), W1) is RunOutcome.FAILED
    assert job_with_attempts(db, job_id).state is JobState.FAILED


# -- The worker process: the heartbeat reads the flag, the intake stays paused ---------------


@pytest.fixture
def registry(settings: Settings) -> Iterator[tasks._Registry]:
    """The worker's registry on the test's database (not started), as the module's own
    (the intake reads it); put back afterwards."""
    saved, saved_requests = tasks._registry, set(worker_state.active_requests)
    fresh = tasks._Registry()
    fresh.settings = settings.with_overrides(heartbeat_interval_s=0.1)
    fresh.hostname = W1
    tasks._registry = fresh
    yield fresh
    fresh.stop.set()
    tasks._registry = saved
    worker_state.active_requests.clear()
    worker_state.active_requests.update(saved_requests)


def test_a_flagged_worker_stays_paused_until_cleared(registry: tasks._Registry) -> None:
    """The intake stops consuming once the worker is flagged, even with nothing rendering,
    and consumes again once the flag is cleared."""
    intake = tasks._Intake()
    intake.consumer = FakeConsumer()
    consumer = intake.consumer.task_consumer
    registry.flagged = True
    intake.tick()
    intake.tick()
    assert consumer.calls == ["cancel"] and intake.paused
    registry.flagged = False
    intake.tick()
    assert consumer.calls == ["cancel", "consume"] and not intake.paused


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_heartbeat_follows_the_flag(
    db: Database, settings: Settings, registry: tasks._Registry
) -> None:
    """The heartbeat reads the row's flag: the worker shows as draining while flagged, and
    idle again within a beat or two of an operator clearing it."""
    add_worker(db, W1, [])
    with db.begin() as session:
        row = session.get(Worker, W1)
        assert row is not None
        row.flagged_at, row.flagged_reason = row.last_heartbeat, "3 jobs in a row failed here"
    beat = threading.Thread(target=registry._beat, daemon=True)
    beat.start()

    def state() -> WorkerState:
        with db.session() as session:
            found = session.get(Worker, W1)
            assert found is not None
            return found.state

    wait_until(lambda: registry.flagged and state() is WorkerState.DRAINING, "the flag", 10)
    with db.begin() as session:
        assert worker_health.clear_flag(session, W1)
    wait_until(lambda: not registry.flagged and state() is WorkerState.IDLE, "the clear", 10)
    registry.stop.set()
    beat.join(5)


def test_the_job_table_is_untouched_by_a_decline(db: Database, settings: Settings) -> None:
    """A declined job keeps its place: its priority, owner and creation time are unchanged."""
    job_id = submit(db, settings, W1)
    with db.session() as session:
        before = session.get(Job, job_id)
        assert before is not None
        seen = (before.priority, before.owner, before.created_at)
    with db.begin() as session:
        session.execute(update(Worker).where(Worker.hostname == W1).values(flagged_at=seen[2]))
    assert run_job(db, settings, str(job_id), W1) is RunOutcome.DECLINED
    with db.session() as session:
        after = session.get(Job, job_id)
        assert after is not None
        assert (after.priority, after.owner, after.created_at) == seen
