"""The idle farm's fast path at submit: a job is marked sent in its own submit's commit, only
when its queue has a free slot and nothing else waits there, and it is never sent twice."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select, update

from svdfarm import lifecycle
from svdfarm.celery_app import direct_queue
from svdfarm.db import Database
from svdfarm.dispatch import Sending, Unmarked, dispatch, mark_at_submit
from svdfarm.jobs import Submission, new_job, submit_job, validate_submission
from svdfarm.lifecycle import By, events_of
from svdfarm.models import Job, Worker, utcnow
from svdfarm.settings import Settings
from svdfarm.states import Actor, EventType, JobState, WorkerState
from svdfarm.users import Limits
from tests.conftest import DATABASES
from tests.factories import png_bytes
from tests.rows import add_worker, broker_messages, job_row

API = By(Actor.API)
WEB = By(Actor.WEB)
SMALL = {"num_frames": "2", "num_inference_steps": "1", "width": "64", "height": "64"}


@pytest.fixture
def submission(calm: Settings) -> Submission:
    """A small job's validated submission."""
    return validate_submission(calm, SMALL, png_bytes(), "in.png")


@pytest.fixture
def queue(calm: Settings, submission: Submission) -> str:
    """The queue :func:`submission` goes to (the one the tests' workers consume)."""
    return new_job(calm, submission, client=None, online=()).queue


def submit(db: Database, settings: Settings, celery: Celery, submission: Submission) -> uuid.UUID:
    """Submit ``submission`` as an API client without a key; the job's id."""
    with db.session() as session:
        job = submit_job(session, celery, settings, submission, by=API, owner="addr:10.0.0.1")
        return job.id


def event_types(db: Database, job_id: uuid.UUID) -> list[EventType]:
    """The job's events, oldest first."""
    with db.session() as session:
        return [e.type for e in events_of(session, job_id)]


def published_at(db: Database, job_id: uuid.UUID) -> object:
    """The job's ``published_at`` (None: it waits in the database)."""
    with db.session() as session:
        return session.scalar(select(Job.published_at).where(Job.id == job_id))


def add_busy_worker(db: Database, hostname: str, queue: str) -> uuid.UUID:
    """A worker of ``queue`` busy with a running job; that job's id."""
    running = uuid.uuid4()
    with db.begin() as session:
        session.add(job_row(running, queue=queue, state=JobState.RUNNING, claim_token="t"))
    add_worker(db, hostname, [queue], state=WorkerState.BUSY, current_job_id=running)
    return running


def submit_counting_passes(
    db: Database,
    settings: Settings,
    celery: Celery,
    submission: Submission,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[uuid.UUID, int]:
    """:func:`submit`, counting the dispatch passes run after it (none is run for real)."""
    passes: list[object] = []

    def counted(*args: object, **kwargs: object) -> list[uuid.UUID]:
        passes.append(args)
        return []

    with monkeypatch.context() as patch:
        patch.setattr("svdfarm.dispatch.dispatch", counted)
        job_id = submit(db, settings, celery, submission)
    return job_id, len(passes)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_for_an_idle_queue_is_sent_in_its_submits_commit_and_never_again(
    db: Database,
    calm: Settings,
    celery: Celery,
    submission: Submission,
    queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An idle worker and nothing waiting: the submit marks the job sent and sends it (to
    that worker's own queue), with no dispatch pass; a later pass, even with room for many
    more, sends it no second time."""
    add_worker(db, "idle@farm", [queue])
    job_id, passes = submit_counting_passes(db, calm, celery, submission, monkeypatch)
    assert passes == 0
    assert event_types(db, job_id) == [EventType.SUBMITTED, EventType.PUBLISHED]
    assert published_at(db, job_id) is not None
    assert broker_messages(calm) == [(direct_queue("idle@farm"), str(job_id))]
    roomy = calm.with_overrides(dispatch_margin=1000)
    with db.session() as session:
        assert dispatch(session, celery, roomy, by=WEB) == []
        assert dispatch(session, celery, roomy, queues=[queue], by=WEB) == []
    assert broker_messages(calm) == [(direct_queue("idle@farm"), str(job_id))]
    assert event_types(db, job_id).count(EventType.PUBLISHED) == 1


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_refused_send_gives_the_job_back_to_the_next_pass(
    db: Database,
    calm: Settings,
    celery: Celery,
    submission: Submission,
    queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker refuses the fast path's send: the submit still succeeds, the job waits in
    the database again with the reason in its events, and the next pass sends it once."""

    def refuse(*_: object, **__: object) -> None:
        raise ConnectionError("broker down")

    add_worker(db, "idle@farm", [queue])
    with monkeypatch.context() as patch:
        patch.setattr("svdfarm.dispatch.enqueue_render", refuse)
        job_id = submit(db, calm, celery, submission)
    assert published_at(db, job_id) is None and broker_messages(calm) == []
    assert event_types(db, job_id)[-2:] == [EventType.PUBLISHED, EventType.PUBLISH_FAILED]
    with db.session() as session:
        assert dispatch(session, celery, calm, by=WEB) == [job_id]
        assert dispatch(session, celery, calm, by=WEB) == []
    assert broker_messages(calm) == [(direct_queue("idle@farm"), str(job_id))]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_not_taken_when_another_job_waits_in_the_queue(
    db: Database, calm: Settings, celery: Celery, submission: Submission, queue: str
) -> None:
    """An older job waits in the same queue: the new one does not overtake it; the pass
    after the submit sends the older one (the order decides) and the new one waits."""
    older = uuid.uuid4()
    when = utcnow() - timedelta(minutes=5)
    with db.begin() as session:
        session.add(
            job_row(
                older, queue=queue, owner="addr:10.0.0.2", created_at=when, updated_at=when,
                published_at=None,
            )
        )  # fmt: skip
    add_worker(db, "idle@farm", [queue])
    job_id = submit(db, calm, celery, submission)
    assert published_at(db, job_id) is None
    assert event_types(db, job_id) == [EventType.SUBMITTED]
    assert broker_messages(calm) == [(direct_queue("idle@farm"), str(older))]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_not_taken_when_no_consumer_of_the_queue_is_idle(
    db: Database,
    calm: Settings,
    celery: Celery,
    submission: Submission,
    queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its only worker is busy (or a worker is idle on another queue only): the job waits in
    the database, unsent, and no pass runs after the submit (it could send nothing)."""
    add_busy_worker(db, "busy@farm", queue)
    add_worker(db, "elsewhere@farm", [queue + ".other"])
    add_worker(db, "leaving@farm", [queue], state=WorkerState.DRAINING)
    job_id, passes = submit_counting_passes(db, calm, celery, submission, monkeypatch)
    assert passes == 0
    assert published_at(db, job_id) is None
    assert event_types(db, job_id) == [EventType.SUBMITTED]
    assert broker_messages(calm) == []


@pytest.mark.parametrize("database_url", DATABASES[1:], indirect=True)
def test_a_worker_freed_between_the_submits_look_and_its_commit_gets_the_job(
    db: Database,
    calm: Settings,
    celery: Celery,
    submission: Submission,
    queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL: the submit finds the queue's only worker busy and takes no lock; before
    it commits, the worker frees itself and runs its pass, which cannot see the uncommitted
    job and sends nothing. The submit's look after its commit sees the free worker and
    runs the pass that sends the job at once (not at the next periodic pass)."""
    running = add_busy_worker(db, "busy@farm", queue)
    worker_pass: list[list[uuid.UUID]] = []
    real_mark = mark_at_submit

    def mark_then_free_the_worker(*args: Any, **kwargs: Any) -> Sending | Unmarked:
        marked = real_mark(*args, **kwargs)
        assert marked is Unmarked.NO_SLOT
        with db.begin() as worker:  # as worker.execute frees it, committed before its pass
            worker.execute(
                update(Worker)
                .where(Worker.hostname == "busy@farm")
                .values(current_job_id=None, state=WorkerState.IDLE)
            )
            worker.execute(update(Job).where(Job.id == running).values(state=JobState.SUCCEEDED))
        with db.session() as worker:
            worker_pass.append(dispatch(worker, celery, calm, by=WEB))
        return marked

    with monkeypatch.context() as patch:
        patch.setattr("svdfarm.jobs.mark_at_submit", mark_then_free_the_worker)
        job_id = submit(db, calm, celery, submission)
    assert worker_pass == [[]]  # the worker's own pass ran before the submit's commit
    assert published_at(db, job_id) is not None
    assert broker_messages(calm) == [(direct_queue("busy@farm"), str(job_id))]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_without_any_idle_worker_only_the_margin_makes_room(
    db: Database, calm: Settings, submission: Submission, queue: str
) -> None:
    """No worker at all: with margin 0 nothing is marked; with a margin of 1 the job is, as
    a pass would send it (for an autoscaler that reads queue lengths)."""
    with db.session() as session:
        job = new_job(calm, submission, client=None, online=(), owner="addr:a")
        lifecycle.submit(session, job, by=API)
        assert mark_at_submit(session, calm, job, Limits(), by=WEB) is Unmarked.NO_SLOT
        roomy = calm.with_overrides(dispatch_margin=1)
        marked = mark_at_submit(session, roomy, job, by=WEB)
        assert isinstance(marked, Sending) and marked.worker is None  # on the queue itself
        session.rollback()


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_an_owner_with_a_running_limit_goes_by_the_pass(
    db: Database, calm: Settings, submission: Submission, queue: str
) -> None:
    """The fast path counts no jobs at work: an owner with ``--max-running`` is left to the
    pass (which does); the same job of an owner without one is marked."""
    add_worker(db, "idle@farm", [queue])
    with db.session() as session:
        job = new_job(calm, submission, client=None, online=[queue], owner="user:1")
        lifecycle.submit(session, job, by=API)
        limited = mark_at_submit(session, calm, job, Limits(max_running=1), by=WEB)
        assert limited is Unmarked.FOR_PASS
        assert isinstance(mark_at_submit(session, calm, job, Limits(), by=WEB), Sending)
        again = mark_at_submit(session, calm, job, Limits(), by=WEB)  # already marked
        assert not isinstance(again, Sending)
        session.rollback()


@pytest.mark.parametrize("database_url", DATABASES[1:], indirect=True)
def test_two_submits_never_both_take_one_idle_worker(
    db: Database, calm: Settings, celery: Celery, submission: Submission, queue: str
) -> None:
    """PostgreSQL: the first submit holds the queue's dispatch lock until its commit; the
    second waits for it, then sees the first job sent and the worker's slot taken."""
    add_worker(db, "idle@farm", [queue])
    first, second = db.session(), db.session()
    try:
        job_a = new_job(calm, submission, client=None, online=[queue], owner="addr:a")
        lifecycle.submit(first, job_a, by=API)
        assert isinstance(mark_at_submit(first, calm, job_a, Limits(), by=WEB), Sending)
        job_b = new_job(calm, submission, client=None, online=[queue], owner="addr:b")
        lifecycle.submit(second, job_b, by=API)
        second.commit()  # b is recorded; its own mark comes next, in a new transaction
        found: dict[str, bool] = {}

        def mark_b() -> None:
            job = second.get(Job, job_b.id)
            assert job is not None
            found["b"] = isinstance(mark_at_submit(second, calm, job, Limits(), by=WEB), Sending)
            second.commit()

        racer = threading.Thread(target=mark_b)
        racer.start()
        racer.join(0.5)
        assert racer.is_alive(), "the second mark did not wait for the queue's lock"
        first.commit()
        racer.join(10)
        assert found == {"b": False}
    finally:
        first.close()
        second.close()
    assert published_at(db, job_a.id) is not None and published_at(db, job_b.id) is None
    with db.session() as session:
        assert dispatch(session, celery, calm, by=WEB) == []  # the one slot is a's
