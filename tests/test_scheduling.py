"""The dispatcher for real (svdfarm.dispatch): fair share between owners, priorities (a
priority changed after submit included), per-owner ``--max-running`` limits, a dispatcher
that dies between marking a job sent and sending it, and jobs kept on the worker that has
their model loaded, on real ``svdfarm worker`` processes, Redis and PostgreSQL, with the
product's dispatch margin (0: a queue is sent only as many jobs as it has idle consumers, so
the order is decided when a worker is free).

Jobs are submitted in process (``submit_job``, as the web does: a dispatch pass follows each
submit); the workers run a pass after each job and every 2 s. Start order is read from the
``claimed`` events (their ids increase with every event) and the attempts' ``started_at``.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import func, select

import svdfarm.dispatch
from svdfarm import lifecycle
from svdfarm.celery_app import create_celery
from svdfarm.db import Database, upgrade
from svdfarm.dispatch import dispatch, place_of
from svdfarm.jobs import new_job, submit_job, validate_submission
from svdfarm.lifecycle import By
from svdfarm.models import Attempt, Job, JobEvent, Worker
from svdfarm.reaper import broker_held_ids, reap
from svdfarm.registry import online_queues
from svdfarm.settings import Settings
from svdfarm.states import Actor, EventType, JobState
from svdfarm.storage import open_store
from svdfarm.users import Limits, add_user
from tests.conftest import REDIS_URL, fresh_database, make_settings, needs_postgres, needs_redis
from tests.factories import png_bytes
from tests.processes import LiveProcess, private_redis_db, start_worker
from tests.rows import add_worker, job_row, wait_for_worker, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres, needs_postgres]

#: The farm's settings in this module, in process and in the workers: the product's dispatch
#: margin, beats every 0.5 s (so the reaper's grace is its floor, 5 s), and no reaper in the
#: workers (the dispatcher-death test runs the reaper itself, to see what one pass does).
FARM_ENV = {
    "SVDFARM_DISPATCH_MARGIN": "0",
    "SVDFARM_HEARTBEAT_INTERVAL": "0.5",
    "SVDFARM_PROGRESS_INTERVAL": "0.2",
    "SVDFARM_REAP_INTERVAL": "0",
}
#: A short job (4 frames, 2 steps of the tiny model: about a second on a CPU) and a long one,
#: long enough (several seconds) to look at the database while it runs.
SHORT = {"num_frames": "4", "num_inference_steps": "2"}
LONG = {"num_frames": "4", "num_inference_steps": "5"}
TERMINAL = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


class Farm:
    """One database, one Redis database and one live worker (more on demand), with ways to
    add users, submit jobs as they would, and read in which order the jobs started."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        """Nothing started yet."""
        self.settings, self.folder = settings, folder
        self.db = Database(settings.database_url)
        self.celery: Celery = create_celery(settings)
        self.workers: list[LiveProcess] = []

    def start_worker(self, name: str) -> LiveProcess:
        """Start a worker and wait until it has registered."""
        extra: dict[str, Any] = dict(FARM_ENV)  # the environment, typed for start_worker
        worker = start_worker(self.settings, self.folder, name, **extra)
        self.workers.append(worker)
        wait_for_worker(self.db, worker.hostname, worker.process, lambda: worker.text(None))
        return worker

    def logs(self) -> str:
        """The workers' logs, for failure messages."""
        return "\n".join(f"--- {w.hostname}\n{w.text(4000)}" for w in self.workers)

    def close(self) -> None:
        """Stop the workers and close the database and Celery."""
        for worker in self.workers:
            worker.stop(60)
        self.celery.close()
        self.db.dispose()

    def user(self, name: str, limits: Limits | None = None) -> str:
        """A new user with ``limits`` (none: the defaults); their owner string."""
        with self.db.begin() as session:
            return add_user(session, name, limits=limits or Limits()).owner

    def submit(
        self,
        owner: str,
        fields: dict[str, str] = SHORT,
        priority: int = 0,
        *,
        settings: Settings | None = None,
    ) -> uuid.UUID:
        """Submit a job of ``owner`` as the web does (a dispatch pass follows), with the
        farm's settings unless given (another catalog of models); its id."""
        settings = settings or self.settings
        raw = {"seed": "1", **fields, "priority": str(priority)}
        submission = validate_submission(settings, raw, png_bytes(), "in.png")
        with self.db.session() as session:
            job = submit_job(
                session, self.celery, settings, submission, by=By(Actor.API), owner=owner
            )
            return job.id

    def wait_running(self, job_id: uuid.UUID) -> None:
        """Until the job runs (a worker claimed it)."""

        def running() -> bool:
            """Whether the job runs now."""
            return self.job(job_id).state is JobState.RUNNING

        wait_until(running, f"job {job_id} to run", 120, self.logs)

    def job(self, job_id: uuid.UUID) -> Job:
        """The job row, read now."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def wait_succeeded(self, ids: list[uuid.UUID], timeout_s: float) -> None:
        """Until every job has ended; each must have succeeded."""

        def ended() -> bool:
            """Whether every job is in a terminal state."""
            with self.db.session() as session:
                states = session.scalars(select(Job.state).where(Job.id.in_(ids))).all()
            return len(states) == len(ids) and all(s in TERMINAL for s in states)

        wait_until(ended, f"{len(ids)} jobs to end", timeout_s, self.logs)
        with self.db.session() as session:
            rows = session.execute(select(Job.id, Job.state, Job.error).where(Job.id.in_(ids)))
            failed = [(str(i), s.value, e) for i, s, e in rows if s is not JobState.SUCCEEDED]
        assert not failed, f"jobs did not succeed: {failed}\n{self.logs()}"

    def events(self, ids: list[uuid.UUID], kind: EventType) -> list[uuid.UUID]:
        """The job id of each ``kind`` event of ``ids``, in the order they happened."""
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(JobEvent.job_id)
                    .where(JobEvent.job_id.in_(ids), JobEvent.type == kind)
                    .order_by(JobEvent.id)
                )
            )

    def attempts(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[Attempt]]:
        """Each job's attempts, by number."""
        found: dict[uuid.UUID, list[Attempt]] = {job_id: [] for job_id in ids}
        with self.db.session() as session:
            for attempt in session.scalars(
                select(Attempt).where(Attempt.job_id.in_(ids)).order_by(Attempt.number)
            ):
                found[attempt.job_id].append(attempt)
        return found

    def started_once(self, ids: list[uuid.UUID]) -> list[uuid.UUID]:
        """``ids`` in the order they started, checking each was claimed once and ran one
        attempt, and that the claims and the attempts' ``started_at`` tell the same order."""
        claims = self.events(ids, EventType.CLAIMED)
        assert sorted(claims) == sorted(ids), "each job is claimed exactly once"
        attempts = self.attempts(ids)
        assert all(len(a) == 1 for a in attempts.values()), "each job ran one attempt"
        by_start = sorted(ids, key=lambda i: attempts[i][0].started_at)
        assert by_start == claims, "the attempts started in the order of the claims"
        return claims


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Farm]:
    """PostgreSQL, a Redis database of the module's own and one live worker, shared by the
    tests of this module (each makes its own users, so fair share starts afresh)."""
    if not REDIS_URL:
        pytest.skip("SVDFARM_TEST_REDIS_URL is not set (no Redis configured)")
    folder = tmp_path_factory.mktemp("scheduling")
    with fresh_database("postgresql", folder) as url, private_redis_db(REDIS_URL) as broker:
        settings = make_settings(
            folder / "var", url, tiny_model_dir, SVDFARM_BROKER_URL=broker, **FARM_ENV
        )
        assert settings.dispatch_margin == 0
        upgrade(settings.database_url)
        farm = Farm(settings, folder)
        try:
            farm.start_worker("solo")
            yield farm
        finally:
            farm.close()


@pytest.fixture
def live(farm: Farm) -> Iterator[Farm]:
    """The module's farm, idle before the test; a job a failed test left is canceled after."""
    yield farm
    from svdfarm.actions import cancel_job

    with farm.db.session() as session:
        left = session.scalars(select(Job.id).where(Job.state.in_(JobState.active_states())))
        for job_id in list(left):
            cancel_job(session, job_id, by=By(Actor.ADMIN))
        session.commit()


@pytest.mark.redis
@needs_redis
def test_fair_share_lets_a_late_owner_in_before_the_early_owners_backlog(live: Farm) -> None:
    """A submits 12 jobs, then B 3, on one worker: every job of B starts before A's 6th.

    In submit order (FIFO) B's first job would start after A's 12th: the assertion fails.
    Fair share puts B's jobs next as soon as A has had more GPU time (A's first runs while
    the others wait), so B's start among A's 2nd to 4th."""
    alice, bob = live.user("alice"), live.user("bob")
    started = time.monotonic()
    a_jobs = [live.submit(alice) for _ in range(12)]
    b_jobs = [live.submit(bob) for _ in range(3)]
    live.wait_succeeded(a_jobs + b_jobs, timeout_s=180)
    order = live.started_once(a_jobs + b_jobs)
    shown = ["A" if i in a_jobs else "B" for i in order]
    print(f"\nfair share: start order {''.join(shown)} in {time.monotonic() - started:.1f} s")
    # Within an owner, the oldest first.
    assert [i for i in order if i in a_jobs] == a_jobs
    assert [i for i in order if i in b_jobs] == b_jobs
    sixth_a = order.index(a_jobs[5])
    assert all(order.index(b) < sixth_a for b in b_jobs), f"start order: {''.join(shown)}"
    attempts = live.attempts(a_jobs + b_jobs)
    assert max(attempts[b][0].started_at for b in b_jobs) < attempts[a_jobs[5]][0].started_at


@pytest.mark.redis
@needs_redis
def test_a_higher_priority_and_a_raised_one_start_next(live: Farm) -> None:
    """Five jobs queued on one worker, the first running: a job submitted with priority 5
    starts right after the running one, then the last of the five, raised to priority 3
    after submit (while it waited), then the others in submit order.

    In submit order the priority-5 job would start last and the raised one 5th; with the
    raise ignored, the raised one would start last of the five: each fails the assertion."""
    carol = live.user("carol", Limits(max_priority=10))
    first = live.submit(carol, LONG)
    live.wait_running(first)
    rest = [live.submit(carol) for _ in range(4)]
    urgent = live.submit(carol, priority=5)
    with live.db.session() as session:
        assert lifecycle.reprioritize(session, rest[-1], by=By(Actor.ADMIN), priority=3) == 3
        session.commit()
        for job_id in (urgent, rest[-1]):
            job = session.get(Job, job_id)
            assert job is not None and job.published_at is None, "still waiting in the database"
        waiting = session.get(Job, urgent)
        assert waiting is not None
        place = place_of(session, live.settings, waiting)
        assert place is not None and place.position == 1, place
    assert live.job(first).state is JobState.RUNNING, "the first job ended too soon to tell"
    live.wait_succeeded([first, *rest, urgent], timeout_s=120)
    order = live.started_once([first, *rest, urgent])
    durations = [a[0].duration_s for a in live.attempts([first, urgent]).values()]
    print(f"\npriority: the long job and a short one took {durations} s")
    assert order == [first, urgent, rest[-1], *rest[:-1]]


@pytest.mark.redis
@needs_redis
def test_an_owner_at_max_running_waits_with_a_worker_idle(live: Farm) -> None:
    """An owner allowed one running job submits two on a farm of two workers: the second
    stays in the database while the first runs (the other worker idle), its place says it is
    held by the owner's limit, and it runs once the first has ended.

    Without the limit the second would go to the idle worker at once: it would be sent
    (``published_at``), not held, and start before the first ended."""
    second_worker = live.start_worker("second")
    try:
        dave = live.user("dave", Limits(max_running=1))
        first = live.submit(dave, LONG)
        held = live.submit(dave)
        live.wait_running(first)
        # Past a periodic pass of each worker (every 2 s) too, not only the submit's.
        time.sleep(svdfarm.dispatch.DISPATCH_INTERVAL_S + 0.5)
        with live.db.session() as session:
            job = session.get(Job, held)
            assert job is not None
            assert job.state is JobState.QUEUED and job.published_at is None
            place = place_of(session, live.settings, job)
            assert place is not None and "your limit" in place.held, place
            idle = session.scalars(
                select(Worker.hostname).where(
                    Worker.hostname.in_([w.hostname for w in live.workers]),
                    Worker.current_job_id.is_(None),
                )
            ).all()
            assert len(idle) == 1, "one of the two workers is idle all along"
        assert live.job(first).state is JobState.RUNNING, "the first job ended too soon to tell"
        live.wait_succeeded([first, held], timeout_s=120)
        assert live.started_once([first, held]) == [first, held]
        attempts = live.attempts([first, held])
        first_end = attempts[first][0].finished_at
        assert first_end is not None and attempts[held][0].started_at >= first_end
    finally:
        second_worker.stop(60)
        live.workers.remove(second_worker)


@pytest.mark.redis
@needs_redis
def test_a_job_marked_sent_but_never_sent_is_published_once_by_the_reaper(live: Farm) -> None:
    """A dispatcher killed between its commit and its send leaves a job marked sent that the
    broker never got: no dispatch pass sends it again (it counts as sent), the reaper
    publishes it once its grace (5 s) has passed, and the worker renders it once."""
    erin = live.user("erin")
    submission = validate_submission(live.settings, {"seed": "1", **SHORT}, png_bytes(), "in.png")
    with live.db.session() as session:
        online = online_queues(session, live.settings, submission.model or None)
        job = new_job(live.settings, submission, client=None, online=online, owner=erin)
        job_id, queue = job.id, job.queue
        lifecycle.submit(session, job, by=By(Actor.API))
        open_store(live.settings).write_bytes(job.input_key, submission.data)
        session.commit()
        # The pass's commit; then the process dies before enqueue_render.
        assert lifecycle.publish(session, job_id, by=By(Actor.WEB), waiting_only=True)
        session.commit()
    marked = time.monotonic()
    grace_s = max(2 * live.settings.offline_after_s, 5.0)
    assert str(job_id) not in (broker_held_ids(live.settings, live.celery, [queue]) or set())

    republished: list[str] = []

    def reap_pass() -> list[str]:
        """One reaper pass; the jobs it published again (kept in ``republished``)."""
        done = reap(live.db, live.settings, live.celery, name="test").republished
        republished.extend(done)
        return done

    assert reap_pass() == [], "inside the grace the reaper leaves the job to its dispatcher"
    # The workers' passes (every 2 s) see it as sent, not taken: none sends it again.
    time.sleep(svdfarm.dispatch.DISPATCH_INTERVAL_S + 0.5)
    assert live.job(job_id).state is JobState.QUEUED
    assert live.events([job_id], EventType.PUBLISHED) == [job_id]
    wait_until(reap_pass, "the reaper to publish the job again", grace_s + 15, live.logs)
    assert time.monotonic() - marked >= grace_s - 0.5
    live.wait_succeeded([job_id], timeout_s=60)
    for _ in range(3):
        reap_pass()
    assert republished == [str(job_id)]
    assert live.started_once([job_id]) == [job_id]  # one claim, one attempt
    assert live.events([job_id], EventType.PUBLISHED) == [job_id, job_id]


def test_concurrent_dispatch_passes_never_send_a_job_twice(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two passes over one queue at once (two threads, a session each), 20 waiting jobs and
    3 idle consumers: 3 jobs are sent, each once (PostgreSQL's per-queue lock).

    The second pass is held 0.5 s between counting the free slots and choosing, the first
    0.05 s: without the lock the second would count 3 free slots before the first commits
    and choose 3 other jobs after, and 6 would be sent."""
    queue = "svd.cpu.fp32.8g"
    with fresh_database("postgresql", tmp_path) as url:
        settings = make_settings(tmp_path / "var", url, tiny_model_dir, SVDFARM_DISPATCH_MARGIN="0")
        upgrade(settings.database_url)
        settings.ensure_dirs()
        db = Database(settings.database_url)
        celery = create_celery(settings)
        try:
            for number in range(3):
                add_worker(db, f"idle{number}@host", [queue], 0.1)
            with db.begin() as session:
                for number in range(20):
                    job_id = uuid.uuid4()
                    owner = f"user:{number % 2 + 1}"
                    session.add(job_row(job_id, queue=queue, owner=owner, published_at=None))
            sent = _race_two_passes(settings, celery, queue, monkeypatch)
            with db.session() as session:
                per_job = dict(
                    session.execute(
                        select(JobEvent.job_id, func.count())
                        .where(JobEvent.type == EventType.PUBLISHED)
                        .group_by(JobEvent.job_id)
                    ).all()
                )
                marked = session.scalar(
                    select(func.count()).select_from(Job).where(Job.published_at.is_not(None))
                )
            assert all(count <= 1 for count in per_job.values()), per_job
            assert sum(per_job.values()) == 3 and marked == 3
            assert sorted(sent) == sorted(per_job)
            messages = list((settings.broker_dir / "queue").glob("*.msg"))
            assert len(messages) == 3
        finally:
            celery.close()
            db.dispose()


def _race_two_passes(
    settings: Settings, celery: Celery, queue: str, monkeypatch: pytest.MonkeyPatch
) -> list[uuid.UUID]:
    """Run two dispatch passes over ``queue`` at once, from two threads with a Database of
    their own each, the second held longer after counting its slots; the ids both sent."""
    delays = {"first": 0.05, "second": 0.5}
    real_free_slots: Callable[..., int] = svdfarm.dispatch.free_slots

    def slow_free_slots(*args: Any, **kwargs: Any) -> int:
        """The real count, then a pause as long as this thread's delay."""
        slots = real_free_slots(*args, **kwargs)
        time.sleep(delays.get(threading.current_thread().name, 0.0))
        return slots

    monkeypatch.setattr(svdfarm.dispatch, "free_slots", slow_free_slots)
    barrier = threading.Barrier(2)
    sent: list[uuid.UUID] = []
    errors: list[BaseException] = []

    def run() -> None:
        """One pass in a session of this thread's own Database."""
        db = Database(settings.database_url)
        try:
            with db.session() as session:
                barrier.wait(10)
                by = By(Actor.WORKER, threading.current_thread().name)
                sent.extend(dispatch(session, celery, settings, queues=[queue], by=by))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=run, name=name) for name in delays]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return sent


@pytest.mark.redis
@needs_redis
def test_a_job_goes_only_to_a_worker_that_has_its_model(live: Farm) -> None:
    """A job of a model the live worker does not serve is never sent to it, though it is idle
    and the queue's class is its own: a later job of its model runs first. A worker that
    serves the model (the tiny model's files under another catalog id) then renders it."""
    other = str(live.settings.models_dir / "tiny")
    models = f"tiny=tiny,other={other}"
    settings = live.settings.with_overrides(models=models)
    frank = live.user("frank")

    def submit(model: str) -> uuid.UUID:
        """A short job of ``model`` as the web submits it (a dispatch pass follows)."""
        return live.submit(frank, {**SHORT, "model": model}, settings=settings)

    elsewhere = submit("other")
    assert live.job(elsewhere).queue.endswith(".other")
    mine = submit("tiny")
    live.wait_succeeded([mine], timeout_s=120)
    job = live.job(elsewhere)
    assert job.state is JobState.QUEUED and job.published_at is None, "sent to a tiny worker"
    assert live.attempts([elsewhere])[elsewhere] == []

    extra: dict[str, Any] = {**FARM_ENV, "SVDFARM_MODELS": models, "SVDFARM_WORKER_MODELS": "other"}
    worker = start_worker(live.settings, live.folder, "other", **extra)
    live.workers.append(worker)
    try:
        wait_for_worker(live.db, worker.hostname, worker.process, lambda: worker.text(None))
        live.wait_succeeded([elsewhere], timeout_s=120)
        assert [a.worker for a in live.attempts([elsewhere])[elsewhere]] == [worker.hostname]
    finally:
        worker.stop(60)
        live.workers.remove(worker)


@pytest.mark.redis
@needs_redis
def test_each_model_stays_on_the_worker_that_has_it_loaded(live: Farm) -> None:
    """Two workers serving two models (copies of the tiny model under two catalog ids): the
    first job of each model loads it on a worker of its own, and from then on every job of a
    model runs where that model is loaded, with no worker swapping models. Each worker's row
    names the model it holds."""
    folders = {}
    for key in ("one", "two"):
        folders[key] = live.folder / f"model-{key}"
        if not folders[key].exists():
            shutil.copytree(live.settings.models_dir / "tiny", folders[key])
    models = ",".join(f"{key}={folder}" for key, folder in folders.items())
    settings = live.settings.with_overrides(models=models)
    grace = live.user("grace")

    def submit(model: str) -> uuid.UUID:
        """A short job of ``model`` as the web submits it (a dispatch pass follows)."""
        return live.submit(grace, {**SHORT, "model": model}, settings=settings)

    extra: dict[str, Any] = {
        **FARM_ENV,
        "SVDFARM_MODELS": models,
        "SVDFARM_WORKER_MODELS": "one,two",
    }
    pair = [start_worker(live.settings, live.folder, name, **extra) for name in ("pa", "pb")]
    live.workers.extend(pair)
    try:
        for worker in pair:
            wait_for_worker(live.db, worker.hostname, worker.process, live.logs)
        first = submit("one")
        live.wait_succeeded([first], timeout_s=120)
        second = submit("two")
        live.wait_succeeded([second], timeout_s=120)
        ran_on = {
            a.job_id: a.worker for runs in live.attempts([first, second]).values() for a in runs
        }
        holder = {"one": ran_on[first], "two": ran_on[second]}
        assert holder["one"] != holder["two"], "the second model went to the worker with none"
        with live.db.session() as session:
            loaded = {w.hostname: w.loaded_model for w in session.scalars(select(Worker))}
        assert {loaded[holder["one"]], loaded[holder["two"]]} == {"one", "two"}
        assert loaded[holder["one"]] == "one"
        # Pairs submitted together onto an idle farm: each job goes to its model's holder (the
        # broker alone would hand either job to either worker). Which worker a job waiting
        # behind a busy holder gets is timing (a free worker with no backlog of its own takes
        # it rather than idle): the database tests hold that rule.
        batch = []
        for _ in range(3):
            pair_jobs = [("two", submit("two")), ("one", submit("one"))]
            live.wait_succeeded([job_id for _, job_id in pair_jobs], timeout_s=120)
            batch += pair_jobs
        attempts = live.attempts([job_id for _, job_id in batch])
        placed = [(model, attempts[job_id][0].worker) for model, job_id in batch]
        assert placed == [(model, holder[model]) for model, _ in batch], live.logs()
    finally:
        for worker in pair:
            worker.stop(60)
            live.workers.remove(worker)
