"""The dispatcher: how many jobs a queue is sent, in which order, and what a refusal leaves."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta

import pytest
from celery import Celery
from sqlalchemy import func, select, update

from svdfarm import lifecycle
from svdfarm.celery_app import direct_queue
from svdfarm.db import Database
from svdfarm.dispatch import (
    Candidate,
    IdleWorker,
    Ledger,
    OrderCache,
    dispatch,
    dispatch_order,
    free_slots,
    ordinal,
    pick_worker,
    place_of,
)
from svdfarm.lifecycle import HANDED_BACK_TYPE, By, events_of
from svdfarm.models import Attempt, Job, JobEvent, utcnow
from svdfarm.reaper import reap
from svdfarm.settings import Settings
from svdfarm.states import Actor, AttemptOutcome, ErrorClass, EventType, JobState, WorkerState
from svdfarm.users import Limits
from tests.conftest import DATABASES
from tests.rows import QUEUE, add_worker, broker_messages, job_row, recorded_statements

BY = By(Actor.WORKER, "test")
T0 = datetime(2026, 11, 30, 12, 0)


def candidate(owner: str, minute: int, priority: int = 0) -> Candidate:
    """A waiting job of ``owner`` submitted ``minute`` minutes after :data:`T0`."""
    return Candidate(uuid.uuid4(), owner, priority, T0 + timedelta(minutes=minute))


def waiting_jobs(db: Database, count: int, *, owner: str = "user:1", **fields: object) -> list:
    """``count`` jobs on :data:`QUEUE` waiting in the database, a second apart, oldest first."""
    ids = []
    start = utcnow() - timedelta(minutes=10)
    with db.begin() as session:
        for n in range(count):
            job_id = uuid.uuid4()
            when = start + timedelta(seconds=n)
            values = {"queue": QUEUE, "owner": owner, "created_at": when, "updated_at": when}
            session.add(job_row(job_id, **{**values, **fields}, published_at=None))
            ids.append(job_id)
    return ids


def sent_ids(db: Database) -> set[uuid.UUID]:
    """Jobs marked sent (queued, ``published_at`` set)."""
    with db.session() as session:
        return set(
            session.scalars(
                select(Job.id).where(Job.state == JobState.QUEUED, Job.published_at.is_not(None))
            )
        )


def failed_attempt(db: Database, job_id: uuid.UUID, worker: str, **fields: object) -> None:
    """Record a first attempt of the job that failed on ``worker`` with an error that is not
    a precision error (``fields`` set or replace any column)."""
    values: dict[str, object] = {
        "job_id": job_id, "number": 1, "worker": worker, "plan_name": "cpu fp32", "plan": {},
        "outcome": AttemptOutcome.FAILED, "error_class": ErrorClass.OTHER, **fields,
    }  # fmt: skip
    with db.begin() as session:
        session.add(Attempt(**values))


# -- The order -------------------------------------------------------------------------------


def test_priority_first_then_the_owner_with_least_time_then_the_oldest() -> None:
    """A later job of higher priority goes first; between owners, the one who used less of
    the farm; within an owner, the oldest; an owner at their running limit waits."""
    old_a, new_a = candidate("a", 0), candidate("a", 1)
    b, urgent = candidate("b", 2), candidate("c", 3, priority=5)
    ledger = Ledger(used_s={"a": 100.0, "b": 0.0}, run_s=60.0)
    order = dispatch_order([new_a, b, old_a, urgent], ledger, 4)
    assert order == [urgent, b, old_a, new_a]
    # With FIFO the first two would be old_a and new_a: "b" overtakes a's backlog.
    full = Ledger(limits={"b": Limits(max_running=1)}, busy={"b": 1})
    assert dispatch_order([b, old_a], full, 2) == [old_a]


def test_fair_share_alternates_owners_and_weighs_their_share() -> None:
    """Two owners with backlogs and no history alternate; one with twice the share gets
    two jobs for each of the other's."""
    a = [candidate("a", n) for n in range(6)]
    b = [candidate("b", 10 + n) for n in range(6)]
    order = dispatch_order(a + b, Ledger(run_s=10.0), 6)
    assert [c.owner for c in order] == ["a", "b", "a", "b", "a", "b"]
    weighted = Ledger(limits={"a": Limits(share=2.0)}, run_s=10.0)
    order = dispatch_order(a + b, weighted, 6)
    assert [c.owner for c in order].count("a") == 4


def test_ordinals() -> None:
    """Places read as people say them."""
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th",
    ]  # fmt: skip


# -- Passes against the database -------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_queue_gets_as_many_jobs_as_it_has_idle_workers(
    db: Database, calm: Settings, celery: Celery
) -> None:
    """Five waiting, two idle workers and a busy one: two are sent (the oldest); the next
    pass sends nothing until a worker is free again; a draining worker takes nothing."""
    ids = waiting_jobs(db, 5)
    add_worker(db, "idle1@farm", [QUEUE])
    add_worker(db, "idle2@farm", [QUEUE])
    add_worker(db, "busy@farm", [QUEUE], state=WorkerState.BUSY, current_job_id=ids[4])
    add_worker(db, "leaving@farm", [QUEUE], state=WorkerState.DRAINING)
    add_worker(db, "gone@farm", [QUEUE], heartbeat_age_s=3600)
    with db.session() as session:
        assert free_slots(session, calm, QUEUE) == 2
        assert dispatch(session, celery, calm, by=BY) == ids[:2]
        assert dispatch(session, celery, calm, by=BY) == []
    # Each to an idle worker's own queue (none holds a model: in name order).
    assert sorted(broker_messages(calm)) == [
        (direct_queue("idle1@farm"), str(ids[0])),
        (direct_queue("idle2@farm"), str(ids[1])),
    ]
    with db.begin() as session:  # one of the two is taken: its worker is busy with it
        session.execute(
            update(Job).where(Job.id == ids[0]).values(state=JobState.RUNNING, published_at=None)
        )
    with db.session() as session:
        assert free_slots(session, calm, QUEUE) == 1
        assert dispatch(session, celery, calm, by=BY) == [ids[2]]
        assert [e.type for e in events_of(session, ids[2])][-1] is EventType.PUBLISHED


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_margin_holds_even_without_a_worker(
    db: Database, calm: Settings, celery: Celery
) -> None:
    """No worker: with margin 0 nothing is sent (the jobs wait in the database); a margin of
    2 keeps two messages on the queue for an autoscaler to see."""
    ids = waiting_jobs(db, 4)
    with db.session() as session:
        assert dispatch(session, celery, calm, by=BY) == []
        assert dispatch(session, celery, calm.with_overrides(dispatch_margin=2), by=BY) == ids[:2]
    assert len(broker_messages(calm)) == 2


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_refused_send_leaves_the_job_waiting_for_the_next_pass(
    db: Database, calm: Settings, celery: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker refuses: the job waits in the database again, its events say so, and the
    next pass sends it."""
    (job_id,) = waiting_jobs(db, 1)
    add_worker(db, "idle@farm", [QUEUE])

    def refuse(*_: object, **__: object) -> None:
        raise ConnectionError("broker down")

    with monkeypatch.context() as patch:
        patch.setattr("svdfarm.dispatch.enqueue_render", refuse)
        with db.session() as session:
            assert dispatch(session, celery, calm, by=BY) == []
    assert sent_ids(db) == set() and broker_messages(calm) == []
    with db.session() as session:
        types = [e.type for e in events_of(session, job_id)]
        assert types[-2:] == [EventType.PUBLISHED, EventType.PUBLISH_FAILED]
        assert dispatch(session, celery, calm, by=BY) == [job_id]
    assert broker_messages(calm) == [(direct_queue("idle@farm"), str(job_id))]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_waiting_jobs_place_follows_the_order(
    db: Database, calm: Settings, celery: Celery
) -> None:
    """Places count from 1 in dispatch order; a sent job is next (0); a later job of higher
    priority is 1st; an owner at their running limit is told why."""
    a_jobs = waiting_jobs(db, 3, owner="addr:a")
    (urgent,) = waiting_jobs(db, 1, owner="addr:b", priority=3)
    add_worker(db, "busy@farm", [QUEUE], state=WorkerState.BUSY, current_job_id=a_jobs[0])
    with db.begin() as session:
        session.execute(update(Job).where(Job.id == a_jobs[0]).values(published_at=utcnow()))
    with db.session() as session:
        places = [place_of(session, calm, session.get(Job, i)) for i in (*a_jobs, urgent)]
    assert [p.position if p else None for p in places] == [0, 2, 3, 1]
    assert places[1] is not None and places[1].describe().startswith("2nd in line")


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_reaper_fails_jobs_that_waited_past_max_wait(
    db: Database, calm: Settings, celery: Celery
) -> None:
    """SVDFARM_MAX_WAIT: a job of a class no worker serves fails after it, with the reason;
    one whose class has a worker keeps waiting (its turn will come); 0 waits forever."""
    (orphan,) = waiting_jobs(db, 1, queue="svd.cuda.fp32.80g")
    (served,) = waiting_jobs(db, 1)
    add_worker(db, "busy@farm", [QUEUE], state=WorkerState.BUSY, current_job_id=served)
    assert reap(db, calm, celery).gave_up == []
    reaped = reap(db, calm.with_overrides(max_wait_s=60.0), celery)
    assert reaped.gave_up == [str(orphan)]
    with db.session() as session:
        job = session.get(Job, orphan)
        assert job is not None and job.state is JobState.FAILED
        assert job.error is not None and "SVDFARM_MAX_WAIT" in job.error
        kept = session.get(Job, served)
        assert kept is not None and kept.state is JobState.QUEUED


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_an_owners_gpu_time_decides_between_owners(
    db: Database, calm: Settings, celery: Celery
) -> None:
    """An owner who rendered for an hour waits behind one who has not, whoever came first."""
    (heavy,) = waiting_jobs(db, 1, owner="addr:heavy")
    (light,) = waiting_jobs(db, 1, owner="addr:light")
    (done,) = waiting_jobs(db, 1, owner="addr:heavy", state=JobState.SUCCEEDED)
    now = utcnow()
    with db.begin() as session:
        session.add(
            Attempt(
                job_id=done,
                number=1,
                worker="w",
                plan_name="p",
                plan={},
                started_at=now - timedelta(minutes=30),
                finished_at=now - timedelta(minutes=1),
            )
        )
    add_worker(db, "idle@farm", [QUEUE])
    with db.session() as session:
        assert dispatch(session, celery, calm, by=BY) == [light]
        published = session.scalar(
            select(func.count())
            .select_from(JobEvent)
            .where(JobEvent.job_id == heavy, JobEvent.type == EventType.PUBLISHED)
        )
    assert published == 0


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_worker_without_the_jobs_model_is_not_a_free_slot(
    db: Database, calm: Settings, celery: Celery
) -> None:
    """A queue is per class and model: an idle worker of the same class that serves another
    model (it consumes that model's queue) is no slot for the job, and nothing is sent; an
    idle worker with the job's model is, and the job goes to it (its own queue)."""
    other = QUEUE.rsplit(".", 1)[0] + ".svd-xt"
    ids = waiting_jobs(db, 1)
    add_worker(db, "xt@farm", [other])
    with db.session() as session:
        assert free_slots(session, calm, QUEUE) == 0
        assert dispatch(session, celery, calm, by=BY) == []
    add_worker(db, "tiny@farm", [QUEUE])
    with db.session() as session:
        assert free_slots(session, calm, QUEUE) == 1 and free_slots(session, calm, other) == 1
        assert dispatch(session, celery, calm, by=BY) == ids
    assert broker_messages(calm) == [(direct_queue("tiny@farm"), str(ids[0]))]


# -- Which worker ----------------------------------------------------------------------------


def test_a_job_goes_to_a_worker_with_its_model_loaded_then_to_one_without_any() -> None:
    """The model's holder first; else a worker holding no model (nobody's model is
    dropped); else the first by name; never one spoken for or one the job failed on."""
    holders = [IdleWorker("a", "svd-xt"), IdleWorker("b", "tiny"), IdleWorker("c", None)]
    assert pick_worker(holders, "tiny") == "b"
    assert pick_worker(holders, "svd") == "c"
    assert pick_worker(holders, "tiny", avoid=["b"]) == "c"
    assert pick_worker(holders[:2], "svd") == "a"
    spoken_for = [IdleWorker("b", "tiny", awaiting=True), IdleWorker("a", "svd-xt")]
    assert pick_worker(spoken_for, "tiny") == "a"
    assert pick_worker([IdleWorker("b", "tiny", awaiting=True)], "tiny") is None
    assert pick_worker(holders, "tiny", avoid=["a", "b", "c"]) is None


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_two_models_on_two_workers_each_stay_where_they_are_loaded(
    db: Database, calm: Settings, celery: Celery
) -> None:
    """Two workers serve both models, each holding one loaded: each model's job goes to its
    holder's own queue (whatever the names' order), with the worker in its ``published``
    event; a worker spoken for is no slot for the next job, which waits."""
    xt_queue = QUEUE.rsplit(".", 1)[0] + ".svd-xt"
    both = [QUEUE, xt_queue]
    add_worker(db, "a@farm", both, loaded_model="svd-xt")
    add_worker(db, "b@farm", both, loaded_model="tiny")
    (tiny_job,) = waiting_jobs(db, 1)
    (xt_job,) = waiting_jobs(db, 1, queue=xt_queue, model="svd-xt")
    with db.session() as session:
        assert set(dispatch(session, celery, calm, by=BY)) == {tiny_job, xt_job}
    assert sorted(broker_messages(calm)) == [
        (direct_queue("a@farm"), str(xt_job)),
        (direct_queue("b@farm"), str(tiny_job)),
    ]
    with db.session() as session:
        sent = {j.id: j.sent_to for j in session.scalars(select(Job))}
        assert sent == {tiny_job: "b@farm", xt_job: "a@farm"}
        published = [e for e in events_of(session, tiny_job) if e.type is EventType.PUBLISHED]
        assert published[-1].details == {"queue": QUEUE, "worker": "b@farm"}
    (later,) = waiting_jobs(db, 1)
    with db.session() as session:
        assert free_slots(session, calm, QUEUE) == 0
        assert dispatch(session, celery, calm, by=BY) == []


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_that_failed_on_the_models_holder_goes_to_another_worker(
    db: Database, calm: Settings, celery: Celery
) -> None:
    """The job's blocklist beats the loaded model: a job whose attempt failed on the
    worker holding its model (not a precision error) goes to the other idle worker."""
    add_worker(db, "holder@farm", [QUEUE], loaded_model="tiny")
    add_worker(db, "other@farm", [QUEUE])
    (job_id,) = waiting_jobs(db, 1)
    failed_attempt(db, job_id, "holder@farm")
    with db.session() as session:
        assert dispatch(session, celery, calm, by=BY) == [job_id]
    assert broker_messages(calm) == [(direct_queue("other@farm"), str(job_id))]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_free_worker_keeps_to_its_model_while_its_jobs_wait_and_another_holds_the_other(
    db: Database, calm: Settings, celery: Celery
) -> None:
    """A free worker holding svd-xt, with an svd-xt job waiting, is not given the tiny job
    while another (busy) worker holds tiny: it takes the svd-xt job and the tiny job waits
    for the tiny worker. With no svd-xt job waiting it takes the tiny job rather than idle."""
    xt_queue = QUEUE.rsplit(".", 1)[0] + ".svd-xt"
    both = [QUEUE, xt_queue]
    (running,) = waiting_jobs(db, 1, state=JobState.RUNNING)
    add_worker(db, "xt@farm", both, loaded_model="svd-xt")
    add_worker(
        db, "tiny@farm", both, state=WorkerState.BUSY, current_job_id=running, loaded_model="tiny"
    )
    (tiny_job,) = waiting_jobs(db, 1)
    (xt_job,) = waiting_jobs(db, 1, queue=xt_queue, model="svd-xt")
    with db.session() as session:
        assert free_slots(session, calm, QUEUE) == 1  # the count alone would send it
        assert dispatch(session, celery, calm, queues=[QUEUE], by=BY) == []
        assert dispatch(session, celery, calm, by=BY) == [xt_job]
    assert broker_messages(calm) == [(direct_queue("xt@farm"), str(xt_job))]
    with db.begin() as session:  # the svd-xt job ran and ended; its worker is free again
        session.execute(
            update(Job)
            .where(Job.id == xt_job)
            .values(state=JobState.SUCCEEDED, published_at=None, sent_to=None)
        )
    with db.session() as session:
        assert dispatch(session, celery, calm, by=BY) == [tiny_job]
    assert (direct_queue("xt@farm"), str(tiny_job)) in broker_messages(calm)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_queues_order_is_read_again_only_after_a_job_event(db: Database, calm: Settings) -> None:
    """The web's cache of a queue's order answers from what it read while no job event was
    recorded; a priority change (an event) makes the next read see the new order, and an
    entry older than its age limit is read again too."""
    ids = waiting_jobs(db, 3)
    cache = OrderCache(max_age_s=60, check_s=0)
    with db.session() as session:
        first = cache.get(session, calm, QUEUE)
        assert [first.positions[i] for i in ids] == [1, 2, 3]
        assert cache.get(session, calm, QUEUE) is first
    with db.begin() as session:
        lifecycle.reprioritize(session, ids[2], by=By(Actor.ADMIN), priority=5)
    with db.session() as session:
        moved = cache.get(session, calm, QUEUE)
        assert moved is not first and [moved.positions[i] for i in ids] == [2, 3, 1]
        assert cache.get(session, calm, QUEUE) is moved
        assert OrderCache(max_age_s=0).get(session, calm, QUEUE) is not moved


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_queues_order_looks_for_job_events_at_most_every_check_interval(
    db: Database, calm: Settings
) -> None:
    """Within ``check_s`` of its last look the cache answers without reading anything, even
    after an event; once the interval has passed it looks again and sees the new order."""
    ids = waiting_jobs(db, 3)
    cache = OrderCache(max_age_s=60, check_s=0.5)
    with db.session() as session:
        first = cache.get(session, calm, QUEUE)
    with db.begin() as session:
        lifecycle.reprioritize(session, ids[2], by=By(Actor.ADMIN), priority=5)
    with recorded_statements(db.engine) as statements, db.session() as session:
        assert cache.get(session, calm, QUEUE) is first
        assert statements == []
        time.sleep(0.5)
        moved = cache.get(session, calm, QUEUE)
    assert [moved.positions[i] for i in ids] == [2, 3, 1]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_its_stopping_holder_handed_back_goes_to_the_holder_again(
    db: Database, calm: Settings, celery: Celery
) -> None:
    """The blocklist is the one worker health keeps (svdfarm.worker_health): an attempt its
    worker closed because it was stopping does not count against it, so the job still goes
    to the worker holding its model."""
    add_worker(db, "holder@farm", [QUEUE], loaded_model="tiny")
    add_worker(db, "other@farm", [QUEUE])
    (job_id,) = waiting_jobs(db, 1)
    failed_attempt(db, job_id, "holder@farm", error_type=HANDED_BACK_TYPE)
    with db.session() as session:
        assert dispatch(session, celery, calm, by=BY) == [job_id]
    assert broker_messages(calm) == [(direct_queue("holder@farm"), str(job_id))]
