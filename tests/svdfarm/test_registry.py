"""The worker registry as the web reads it, on real databases: who is online after how many
missed heartbeats, which queues are consumed, and why a queued job waits.

Rows are inserted directly, with heartbeats and creation times set in the past.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from svdfarm.db import Database
from svdfarm.models import Job, Worker, utcnow
from svdfarm.registry import effective_state, online_queues, online_workers, waiting_reason
from svdfarm.settings import Settings
from svdfarm.states import JobState, WorkerState
from tests.conftest import DATABASES
from tests.rows import CPU_QUEUES, add_worker, job_row

T4_QUEUES = [f"svd.cuda.{p}.{t}g" for p in ("fp16", "fp32") for t in (8, 12, 16)]
H100_QUEUES = [
    f"svd.cuda.{p}.{t}g" for p in ("bf16", "fp16", "fp32") for t in (8, 12, 16, 24, 40, 48, 80)
]
MPS_QUEUES = [f"svd.mps.{p}.{t}g" for p in ("bf16", "fp16", "fp32") for t in (8, 12)]

pytestmark = pytest.mark.parametrize("database_url", DATABASES, indirect=True)


@pytest.fixture
def beats(settings: Settings) -> Settings:
    """Settings with a 5 s heartbeat: offline after 15 s without one."""
    result = settings.with_overrides(heartbeat_interval_s=5.0)
    assert result.offline_after_s == 15.0
    return result


def add_job(
    db: Database,
    queue: str,
    created_at: datetime,
    state: JobState = JobState.QUEUED,
) -> uuid.UUID:
    """Insert a job row routed to ``queue``, created at ``created_at``; returns its id."""
    job_id = uuid.uuid4()
    with db.begin() as session:
        session.add(
            job_row(job_id, state=state, created_at=created_at, updated_at=created_at, queue=queue)
        )
    return job_id


def read_worker(db: Database, hostname: str) -> Worker:
    """The worker row as the database gives it back."""
    with db.session() as session:
        worker = session.get(Worker, hostname)
        assert worker is not None
        return worker


def reason(db: Database, settings: Settings, job_id: uuid.UUID) -> str | None:
    """``waiting_reason`` for the job, in a fresh session."""
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return waiting_reason(session, settings, job)


def in_session(db: Database, settings: Settings) -> tuple[list[str], set[str]]:
    """The online workers' hostnames and the online queues."""
    with db.session() as session:
        hostnames = [w.hostname for w in online_workers(session, settings)]
        return hostnames, online_queues(session, settings)


# ---- effective_state -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age_s", "expected"),
    [
        (0.0, WorkerState.IDLE),
        (5.0, WorkerState.IDLE),  # one missed beat
        (10.0, WorkerState.IDLE),  # two missed beats
        (14.999, WorkerState.IDLE),
        (15.0, WorkerState.IDLE),  # exactly three beats old: not yet "more than"
        (15.001, WorkerState.OFFLINE),
        (16.0, WorkerState.OFFLINE),
        (3600.0, WorkerState.OFFLINE),
    ],
)
def test_offline_after_three_missed_beats(
    db: Database, beats: Settings, age_s: float, expected: WorkerState
) -> None:
    """A worker stays in its state until its heartbeat is older than three intervals."""
    add_worker(db, "w@host", T4_QUEUES, 0)
    worker = read_worker(db, "w@host")
    now = worker.last_heartbeat + timedelta(seconds=age_s)
    assert effective_state(worker, beats, now) is expected


def test_the_boundary_follows_the_heartbeat_interval(db: Database, beats: Settings) -> None:
    """A 20 s-old heartbeat is offline at a 5 s interval and online at a 10 s interval."""
    add_worker(db, "w@host", T4_QUEUES, 20)
    worker = read_worker(db, "w@host")
    assert effective_state(worker, beats) is WorkerState.OFFLINE
    slower = beats.with_overrides(heartbeat_interval_s=10.0)
    assert effective_state(worker, slower) is WorkerState.IDLE


@pytest.mark.parametrize("state", [WorkerState.IDLE, WorkerState.BUSY, WorkerState.DRAINING])
def test_a_fresh_worker_keeps_its_state(db: Database, beats: Settings, state: WorkerState) -> None:
    """Idle, busy and draining are reported as stored while the heartbeats are fresh."""
    add_worker(db, "w@host", T4_QUEUES, 1, state=state)
    assert effective_state(read_worker(db, "w@host"), beats) is state


def test_a_worker_that_said_goodbye_is_offline(db: Database, beats: Settings) -> None:
    """A worker that marked itself offline on shutdown is offline even with a fresh beat."""
    add_worker(db, "w@host", T4_QUEUES, 0, state=WorkerState.OFFLINE)
    assert effective_state(read_worker(db, "w@host"), beats) is WorkerState.OFFLINE


def test_heartbeats_come_back_timezone_aware(db: Database, beats: Settings) -> None:
    """The stored heartbeat is aware UTC on every database, so it compares with utcnow()."""
    add_worker(db, "w@host", T4_QUEUES, 3)
    heartbeat = read_worker(db, "w@host").last_heartbeat
    assert heartbeat.utcoffset() == timedelta(0)
    assert timedelta(seconds=2) < utcnow() - heartbeat < timedelta(seconds=60)


# ---- online workers and queues -------------------------------------------------------------


def test_online_queues_union_only_online_workers(db: Database, beats: Settings) -> None:
    """Queues of fresh workers are unioned; stale and offline-marked workers add nothing."""
    add_worker(db, "t4@a", T4_QUEUES, 1)
    add_worker(db, "cpu@b", CPU_QUEUES, 12, state=WorkerState.BUSY)  # two missed beats
    add_worker(db, "h100@c", H100_QUEUES, 16)  # three missed beats and a bit
    add_worker(db, "mac@d", MPS_QUEUES, 0, state=WorkerState.OFFLINE)
    hostnames, queues = in_session(db, beats)
    assert hostnames == ["cpu@b", "t4@a"]  # by hostname
    assert queues == set(T4_QUEUES) | set(CPU_QUEUES)
    assert "svd.cuda.bf16.8g" not in queues and "svd.cuda.fp16.24g" not in queues


def test_long_gone_workers_are_left_out_by_the_database(db: Database, beats: Settings) -> None:
    """Hundreds of rows of workers gone for days leave the one live worker and its queues."""
    now = utcnow()
    with db.begin() as session:
        session.add_all(
            Worker(
                hostname=f"gone-{n:03d}@old",
                capabilities={"device": "cuda"},
                queues=H100_QUEUES,
                state=WorkerState.IDLE,  # never said goodbye: only the old beat tells
                started_at=now - timedelta(days=3),
                last_heartbeat=now - timedelta(days=2, seconds=n),
            )
            for n in range(300)
        )
    add_worker(db, "t4@a", T4_QUEUES, 1)
    assert in_session(db, beats) == (["t4@a"], set(T4_QUEUES))


def test_no_workers_no_queues(db: Database, beats: Settings) -> None:
    """An empty registry has nobody online and no queue consumed."""
    assert in_session(db, beats) == ([], set())


def test_overlapping_queues_are_counted_once(db: Database, beats: Settings) -> None:
    """Two workers on the same queues give each queue once."""
    add_worker(db, "t4@a", T4_QUEUES, 1)
    add_worker(db, "t4@b", T4_QUEUES, 2)
    add_worker(db, "h100@c", H100_QUEUES, 3)
    _, queues = in_session(db, beats)
    assert queues == set(H100_QUEUES)  # the H100's cover the T4's


# ---- waiting_reason ------------------------------------------------------------------------


def test_no_consumer_names_the_class_needed(db: Database, beats: Settings) -> None:
    """With nobody on the job's queue, the reason names the worker class that would run it."""
    job_id = add_job(db, "svd.cpu.fp32.40g", utcnow())
    add_worker(db, "t4@a", T4_QUEUES, 1)  # online, but not on this queue
    assert reason(db, beats, job_id) == (
        "waiting: no worker online that can take it (a cpu worker with fp32 and >= 40 GB is needed)"
    )


def test_a_stale_consumer_does_not_count(db: Database, beats: Settings) -> None:
    """A consumer of the job's queue that missed three beats leaves it with no worker."""
    job_id = add_job(db, "svd.cuda.fp16.16g", utcnow())
    add_worker(db, "t4@a", T4_QUEUES, 60)
    assert reason(db, beats, job_id) == (
        "waiting: no worker online that can take it "
        "(a cuda worker with fp16 and >= 16 GB is needed)"
    )


def test_a_queue_outside_the_scheme_is_named_as_is(db: Database, beats: Settings) -> None:
    """A job on a queue the scheme does not know (an old row) names that queue."""
    job_id = add_job(db, "celery", utcnow())
    assert reason(db, beats, job_id) == (
        "waiting: no worker online that can take it (a worker on queue celery is needed)"
    )


def test_consumers_are_the_online_workers_on_the_queue(db: Database, beats: Settings) -> None:
    """Consumers are the online workers on the job's queue, with how many are busy; jobs
    ahead do not change the reason (the place is the dispatcher's)."""
    queue = "svd.cuda.fp16.16g"
    start = utcnow() - timedelta(minutes=10)
    at = [start + timedelta(seconds=s) for s in range(10)]
    add_job(db, queue, at[0])  # ahead
    add_job(db, "svd.cuda.fp16.8g", at[1])  # another queue
    add_job(db, "svd.cpu.fp32.24g", at[1])  # another queue
    running = add_job(db, queue, at[2], JobState.RUNNING)  # not waiting
    add_job(db, queue, at[3], JobState.SUCCEEDED)
    add_job(db, queue, at[3], JobState.CANCELED)
    add_job(db, queue, at[4])  # ahead
    mine = add_job(db, queue, at[5])
    later = add_job(db, queue, at[6])  # behind

    add_worker(db, "t4@a", T4_QUEUES, 1, state=WorkerState.BUSY, current_job_id=running)
    add_worker(db, "h100@b", H100_QUEUES, 2)
    add_worker(db, "t4@stale", T4_QUEUES, 100, state=WorkerState.BUSY)  # offline: not counted
    other = add_job(db, "svd.cpu.fp32.8g", at[0], JobState.RUNNING)
    # not on it:
    add_worker(db, "cpu@c", CPU_QUEUES, 1, state=WorkerState.BUSY, current_job_id=other)

    assert reason(db, beats, mine) == (
        f"waiting: in queue {queue}; 2 worker(s) can take it, 1 busy"
    )
    assert reason(db, beats, later) == (
        f"waiting: in queue {queue}; 2 worker(s) can take it, 1 busy"
    )


def test_first_in_line_has_nobody_ahead(db: Database, beats: Settings) -> None:
    """The oldest queued job of its queue has zero jobs ahead."""
    job_id = add_job(db, "svd.cpu.fp32.12g.tiny", utcnow() - timedelta(seconds=5))
    add_job(db, "svd.cpu.fp32.12g.tiny", utcnow())
    add_worker(db, "cpu@a", CPU_QUEUES, 0)
    assert reason(db, beats, job_id) == (
        "waiting: in queue svd.cpu.fp32.12g.tiny; 1 worker(s) can take it, 0 busy"
    )


@pytest.mark.parametrize(
    "state",
    [
        JobState.RUNNING,
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCEL_REQUESTED,
        JobState.CANCELED,
    ],
)
def test_no_reason_unless_queued(db: Database, beats: Settings, state: JobState) -> None:
    """Only a queued job waits; every other state has no waiting reason."""
    job_id = add_job(db, "svd.cuda.fp16.8g", utcnow(), state)
    assert reason(db, beats, job_id) is None


def test_no_reason_for_a_job_never_routed(db: Database, beats: Settings) -> None:
    """A queued job without a queue (recorded before routing existed) has no reason."""
    job_id = add_job(db, "", utcnow())
    assert reason(db, beats, job_id) is None
