"""The reaper on real rows and the real embedded broker: jobs of lost workers are requeued,
failed once their workers were lost too often, canceled when asked; queued jobs the broker
lost are published again, once; jobs a live worker holds are left alone."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from celery import Celery
from sqlalchemy import select

from svdfarm.celery_app import create_celery, enqueue_render
from svdfarm.db import Database
from svdfarm.deliveries import lost_streak
from svdfarm.lifecycle import By, settle_lost
from svdfarm.models import Attempt, Job, Worker, utcnow
from svdfarm.reaper import DIRECT_GRACE_S, broker_held_ids, reap
from svdfarm.settings import Settings
from svdfarm.states import Actor, AttemptOutcome, ErrorClass, JobState, WorkerState
from tests.conftest import AMQP_URL, DATABASES, needs_amqp
from tests.rows import add_worker, broker_messages, job_row

DEAD = "dead@host"
ALIVE = "alive@host"
REAPER = "reaper@host"


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """A 1 s heartbeat: a worker is offline after 3 s without one; at most 3 lost deliveries."""
    return settings.with_overrides(heartbeat_interval_s=1.0, max_deliveries=3)


@pytest.fixture
def celery(fast: Settings) -> Celery:
    """A Celery app on the test's embedded broker."""
    fast.ensure_dirs()
    return create_celery(fast)


@pytest.fixture(autouse=True)
def live_reaper(db: Database) -> str:
    """The worker running the reaper: beating, no job of its own."""
    add_worker(db, REAPER, ["svd.cpu.fp32.8g"], 0.1, state=WorkerState.BUSY)
    return REAPER


def queued_messages(settings: Settings) -> list[str]:
    """Task ids of the messages waiting in the embedded broker, one per message."""
    ids = []
    for path in sorted((settings.broker_dir / "queue").glob("*.msg")):
        ids.append(json.loads(path.read_text())["headers"]["id"])
    return ids


def running_job(
    db: Database,
    *,
    quiet_s: float = 60,
    lost_before: int = 0,
    attempt: bool = True,
    state: JobState = JobState.RUNNING,
) -> uuid.UUID:
    """A job left running ``quiet_s`` ago with ``lost_before`` earlier lost attempts and, if
    ``attempt``, a running attempt by :data:`DEAD`."""
    job_id = uuid.uuid4()
    then = utcnow() - timedelta(seconds=quiet_s)
    with db.begin() as session:
        session.add(
            job_row(
                job_id,
                state=state,
                queue="svd.cpu.fp32.8g",
                started_at=then,
                updated_at=then,
                claim_token="a" * 32,
            )
        )
        session.flush()
        for number in range(1, lost_before + 1):
            session.add(
                Attempt(
                    job_id=job_id,
                    number=number,
                    worker=DEAD,
                    plan_name="cpu fp32",
                    plan={},
                    outcome=AttemptOutcome.FAILED,
                    error_class=ErrorClass.WORKER_LOST,
                )
            )
        if attempt:
            session.add(
                Attempt(
                    job_id=job_id,
                    number=lost_before + 1,
                    worker=DEAD,
                    plan_name="cpu fp32",
                    plan={},
                    started_at=then,
                )
            )
    return job_id


def load(db: Database, job_id: uuid.UUID) -> Job:
    """The job with its attempts."""
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.attempts  # noqa: B018 - loaded before the session closes
        return job


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_of_a_dead_worker_is_requeued_and_published(
    db: Database, fast: Settings, celery: Celery
) -> None:
    """Offline owner: the attempt is closed as worker lost, the job queued and on the broker."""
    job_id = running_job(db)
    add_worker(db, DEAD, ["svd.cpu.fp32.8g"], 10, state=WorkerState.BUSY, current_job_id=job_id)
    reaped = reap(db, fast, celery)
    assert reaped.requeued == [str(job_id)] and reaped.dispatched == [str(job_id)]
    job = load(db, job_id)
    assert job.state is JobState.QUEUED and job.claim_token is None
    (attempt,) = job.attempts
    assert attempt.outcome is AttemptOutcome.FAILED
    assert attempt.error_class is ErrorClass.WORKER_LOST
    assert DEAD in (attempt.message or "") and attempt.finished_at is not None
    assert queued_messages(fast) == [str(job_id)]
    with db.session() as session:
        dead = session.get(Worker, DEAD)
        assert dead is not None and dead.current_job_id is None
    # A second pass finds nothing to do: the message is on the broker now.
    assert not reap(db, fast, celery)
    assert queued_messages(fast) == [str(job_id)]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_a_live_worker_holds_is_left_alone(
    db: Database, fast: Settings, celery: Celery
) -> None:
    """Quiet for a minute (a long model load) but its worker beats: not touched."""
    job_id = running_job(db)
    add_worker(db, ALIVE, ["svd.cpu.fp32.8g"], 0.2, state=WorkerState.BUSY, current_job_id=job_id)
    assert not reap(db, fast, celery)
    assert load(db, job_id).state is JobState.RUNNING
    assert queued_messages(fast) == []


def test_a_job_that_moved_recently_is_left_alone(
    db: Database, fast: Settings, celery: Celery
) -> None:
    """Progress written a second ago (under the 3 s offline limit): not stale yet."""
    job_id = running_job(db, quiet_s=1)
    assert not reap(db, fast, celery)
    assert load(db, job_id).state is JobState.RUNNING


def test_nothing_is_judged_while_no_worker_beats(
    db: Database, fast: Settings, celery: Celery
) -> None:
    """Every heartbeat is old (the database was away): nobody is taken for lost yet."""
    from sqlalchemy import update

    job_id = running_job(db)
    add_worker(db, DEAD, ["svd.cpu.fp32.8g"], 10, state=WorkerState.BUSY, current_job_id=job_id)
    with db.begin() as session:
        session.execute(update(Worker).values(last_heartbeat=utcnow() - timedelta(seconds=60)))
    skipped = reap(db, fast, celery)
    assert not skipped
    # ... and the pass says why it judged nobody, instead of a bare "requeued: 0".
    assert skipped.skipped.startswith("no worker has sent a heartbeat in the last 3 s")
    assert load(db, job_id).state is JobState.RUNNING
    with db.begin() as session:  # the reaper's own worker beats again: now it is judged
        session.execute(
            update(Worker).where(Worker.hostname == REAPER).values(last_heartbeat=utcnow())
        )
    judged = reap(db, fast, celery)
    assert judged.requeued == [str(job_id)] and judged.skipped == ""


def test_the_worker_lost_before_its_first_attempt_still_counts(
    db: Database, fast: Settings, celery: Celery
) -> None:
    """No attempt row (it died loading the model): one lost attempt is recorded for it."""
    job_id = running_job(db, attempt=False)
    add_worker(db, DEAD, ["svd.cpu.fp32.8g"], 10, state=WorkerState.BUSY, current_job_id=job_id)
    assert reap(db, fast, celery).requeued == [str(job_id)]
    (attempt,) = load(db, job_id).attempts
    assert attempt.error_class is ErrorClass.WORKER_LOST and attempt.worker == DEAD
    assert attempt.plan_name == "(lost before its first attempt began)"


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_that_lost_its_worker_too_often_fails_with_the_reason(
    db: Database, fast: Settings, celery: Celery
) -> None:
    """Two lost before and this third one: failed (max 3), not published again."""
    job_id = running_job(db, lost_before=2)
    reaped = reap(db, fast, celery)
    assert reaped.failed == [str(job_id)] and reaped.republished == []
    job = load(db, job_id)
    assert job.state is JobState.FAILED and job.finished_at is not None
    assert "lost 3 times in a row" in (job.error or "")
    with db.session() as session:
        assert lost_streak(session, job_id) == 3
    assert queued_messages(fast) == []


def test_a_success_between_lost_workers_resets_the_count(
    db: Database, fast: Settings, celery: Celery
) -> None:
    """Only the lost attempts since the last other outcome count."""
    job_id = running_job(db, lost_before=2)
    with db.begin() as session:
        session.execute(
            Attempt.__table__.update()
            .where(Attempt.job_id == job_id, Attempt.number == 1)
            .values(error_class=ErrorClass.DTYPE_MISMATCH)
        )
    assert reap(db, fast, celery).requeued == [str(job_id)]


def test_a_cancel_requested_on_a_lost_worker_is_canceled(
    db: Database, fast: Settings, celery: Celery
) -> None:
    """Cancel asked, then the worker died: canceled, nothing published."""
    job_id = running_job(db, state=JobState.CANCEL_REQUESTED)
    assert reap(db, fast, celery).canceled == [str(job_id)]
    assert load(db, job_id).state is JobState.CANCELED
    assert queued_messages(fast) == []


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_queued_job_the_broker_lost_is_published_once(
    db: Database, fast: Settings, celery: Celery
) -> None:
    """Queued in the database, absent from the broker, older than the grace: published;
    a queued job the broker holds is not published twice; a brand-new one is left alone."""
    lost, held, fresh = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    old = utcnow() - timedelta(minutes=5)
    with db.begin() as session:
        for job_id, when in ((lost, old), (held, old), (fresh, utcnow())):
            session.add(job_row(job_id, queue="svd.cpu.fp32.8g", created_at=when, updated_at=when))
    from svdfarm.celery_app import enqueue_render

    enqueue_render(celery, str(held), "svd.cpu.fp32.8g")
    assert broker_held_ids(fast, celery, ["svd.cpu.fp32.8g"]) == {str(held)}
    reaped = reap(db, fast, celery)
    assert reaped.republished == [str(lost)]
    assert sorted(queued_messages(fast)) == sorted([str(held), str(lost)])
    assert not reap(db, fast, celery)  # both on the broker now


def test_reapers_racing_publish_a_lost_job_once(db: Database, fast: Settings) -> None:
    """Two reapers that read the same stale row: only the first one's conditional update
    wins, so the job gets one new message."""
    job_id = running_job(db)

    with db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        seen = job.updated_at
    with db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (
            settle_lost(session, fast, job, by=By(Actor.REAPER, REAPER), seen_updated_at=seen)
            is JobState.QUEUED
        )
    with db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (
            settle_lost(session, fast, job, by=By(Actor.REAPER, REAPER), seen_updated_at=seen)
            is None
        )
    assert [a.error_class for a in load(db, job_id).attempts] == [ErrorClass.WORKER_LOST]


@pytest.mark.amqp
@needs_amqp
def test_on_rabbitmq_the_database_and_the_queue_counts_say_what_to_publish(
    db: Database, fast: Settings
) -> None:
    """RabbitMQ's messages cannot be read, so the reaper publishes again a queued job whose
    last publish failed, and the waiting jobs of a queue that holds fewer messages than it has
    waiting jobs (here: the queue emptied behind the farm's back); never a fresh job."""
    from kombu import Connection

    from svdfarm.celery_app import enqueue_render
    from svdfarm.lifecycle import record
    from svdfarm.states import EventType
    from tests.processes import private_amqp_vhost

    queue = "svd.cpu.fp32.8g"
    with private_amqp_vhost(AMQP_URL) as url:
        amqp = fast.with_overrides(broker_url=url)
        celery = create_celery(amqp)
        refused, held, fresh = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        old = utcnow() - timedelta(minutes=5)
        by = By(Actor.WEB)
        with db.begin() as session:
            for job_id, when in ((refused, old), (held, old), (fresh, utcnow())):
                session.add(job_row(job_id, queue=queue, created_at=when, updated_at=when))
            session.flush()
            for job_id in (refused, held, fresh):
                record(session, job_id, EventType.PUBLISHED, by)
            record(session, refused, EventType.PUBLISH_FAILED, by, {"error": "OperationalError"})
        enqueue_render(celery, str(held), queue)
        enqueue_render(celery, str(fresh), queue)
        try:
            assert broker_held_ids(amqp, celery, [queue]) is None  # AMQP cannot be read
            # Two messages for two published jobs (one of them fresh): only the refused one.
            assert reap(db, amqp, celery).republished == [str(refused)]
            assert not reap(db, amqp, celery)  # just published: inside the grace period
            with Connection(url) as connection:  # the broker loses what it held
                connection.default_channel.queue_purge(queue)
            with db.begin() as session:  # and time passes
                for job in session.scalars(select(Job)):
                    job.updated_at = old
            republished = sorted(reap(db, amqp, celery).republished)
            assert republished == sorted(str(j) for j in (refused, held, fresh))
            with Connection(url) as connection:
                depth = connection.default_channel.queue_declare(queue, passive=True)
                assert depth.message_count == 3
        finally:
            celery.close()


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_sent_to_a_worker_that_cannot_take_it_goes_on_its_queue(
    db: Database, fast: Settings, celery: Celery
) -> None:
    """Jobs the dispatcher sent to a worker's own queue: the one whose worker went away and
    the one whose worker took another job first are published again on their queue, for any
    consumer; the one whose worker is idle, the one whose worker is claiming it, and one sent a
    moment ago, are left alone."""
    queue = "svd.cpu.fp32.8g.tiny"
    add_worker(db, "gone@host", [queue], heartbeat_age_s=60)
    add_worker(db, "idle@host", [queue])
    other = uuid.uuid4()
    with db.begin() as session:
        session.add(job_row(other, state=JobState.RUNNING, queue=queue))
    add_worker(db, "busy@host", [queue], state=WorkerState.BUSY, current_job_id=other)
    add_worker(db, "busy2@host", [queue], state=WorkerState.BUSY, current_job_id=other)
    then = utcnow() - timedelta(seconds=DIRECT_GRACE_S + 2)
    sent = {}
    for worker, when in (
        ("gone@host", then),
        ("busy@host", then),
        ("idle@host", then),
        ("busy2@host", utcnow()),
    ):
        job_id = sent[worker] = uuid.uuid4()
        with db.begin() as session:
            session.add(
                job_row(job_id, queue=queue, sent_to=worker, created_at=when, updated_at=when)
            )
        enqueue_render(celery, str(job_id), queue, worker=worker)
    # A worker whose heartbeat names the job it is about to claim holds no other job.
    claiming = uuid.uuid4()
    with db.begin() as session:
        session.add(job_row(claiming, queue=queue, sent_to="claiming@host", updated_at=then))
    add_worker(db, "claiming@host", [queue], current_job_id=claiming)
    enqueue_render(celery, str(claiming), queue, worker="claiming@host")
    reaped = reap(db, fast, celery)
    assert sorted(reaped.republished) == sorted(str(sent[w]) for w in ("gone@host", "busy@host"))
    on_queue = {job_id for name, job_id in broker_messages(fast) if name == queue}
    assert on_queue == {str(sent["gone@host"]), str(sent["busy@host"])}
    with db.session() as session:
        assert session.get(Job, sent["gone@host"]).sent_to is None  # type: ignore[union-attr]
        assert session.get(Job, sent["idle@host"]).sent_to == "idle@host"  # type: ignore[union-attr]
    assert not reap(db, fast, celery).republished
