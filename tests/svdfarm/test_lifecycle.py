"""The job's life: the table of moves, each move with its event, illegal moves refused, no
other module writing ``jobs.state``, and a state machine of concurrent actors that never
reaches a state the table does not allow."""

from __future__ import annotations

import ast
import dataclasses
import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from svdfarm import lifecycle
from svdfarm.db import Database
from svdfarm.lifecycle import MOVES, By, IllegalMove
from svdfarm.models import Job, JobEvent
from svdfarm.settings import Settings
from svdfarm.states import Actor, ClaimOutcome, EventType, JobState, Phase
from tests.conftest import DATABASES
from tests.rows import job_row

ROOT = Path(__file__).resolve().parents[2]
WORKER = By(Actor.WORKER, "w1@test")
OTHER = By(Actor.WORKER, "w2@test")
REAPER = By(Actor.REAPER, "w3@test")
#: A failed event's details when the video could not be stored (the reaper retries those).
STORAGE_FAILURE = {"error_class": "storage"}
ADMIN = By(Actor.ADMIN, "admin")
API = By(Actor.API)


def new_job(db: Database, by: By = API) -> uuid.UUID:
    """Submit a small job through the lifecycle; its id."""
    job_id = uuid.uuid4()
    with db.begin() as session:
        lifecycle.submit(session, job_row(job_id, queue="svd.cpu.fp32.8g"), by=by)
    return job_id


def state_of(db: Database, job_id: uuid.UUID) -> JobState:
    """The job's state, read fresh."""
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state


def event_types(db: Database, job_id: uuid.UUID) -> list[EventType]:
    """The job's event types in order."""
    with db.session() as session:
        return [e.type for e in lifecycle.events_of(session, job_id)]


def claim(db: Database, settings: Settings, job_id: uuid.UUID, by: By = WORKER) -> str:
    """Claim the job for ``by``; its token (the test fails when it was not claimed)."""
    with db.begin() as session:
        taken = lifecycle.claim(session, settings, job_id, by=by)
        assert taken.outcome is ClaimOutcome.CLAIMED, taken.outcome
        return taken.token


# -- The table -------------------------------------------------------------------------------


def test_every_state_is_reachable_and_every_terminal_state_can_be_left_only_by_requeue() -> None:
    """The table reaches every state from submit, and only a requeue (an operator's, or the
    reaper's after a storage failure) leaves a terminal state; expire keeps it."""
    reached = {JobState.QUEUED}
    for _ in MOVES:
        for move in MOVES:
            if any(s in reached for s in move.sources) and move.target is not None:
                reached.add(move.target)
    assert reached == set(JobState)
    for move in MOVES:
        if any(s is not None and s.terminal for s in move.sources) and move.target:
            assert move.name in ("requeue", "retry_storage")


def test_an_illegal_move_names_the_job_its_state_and_the_move(
    db: Database, settings: Settings
) -> None:
    """Succeeding a queued job, or a worker requeueing, raises with the job, state and move."""
    job_id = new_job(db)
    with db.begin() as session, pytest.raises(IllegalMove) as raised:
        lifecycle.requeue(session, job_id, by=ADMIN)
    assert str(raised.value) == (
        f"Job {job_id} is queued: requeue is allowed only from failed, canceled."
    )
    token = claim(db, settings, job_id)
    with db.begin() as session:
        assert lifecycle.fail(session, job_id, by=WORKER, token=token, error="boom")
    with db.begin() as session, pytest.raises(IllegalMove, match="worker may not requeue"):
        lifecycle.requeue(session, job_id, by=WORKER)
    with db.begin() as session, pytest.raises(IllegalMove, match="is failed: request cancel"):
        lifecycle.cancel(session, job_id, by=API)
    assert state_of(db, job_id) is JobState.FAILED


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_life_told_as_events(db: Database, settings: Settings) -> None:
    """Submit, publish, claim, phases, a failed rung, success; then requeue after a failure:
    one event per move and per phase change, in order, with actors and details."""
    job_id = new_job(db)
    with db.begin() as session:
        assert lifecycle.publish(session, job_id, by=API)
    token = claim(db, settings, job_id)
    for phase, step in [(Phase.DENOISING, 0), (Phase.DENOISING, 1), (Phase.DECODING, 2)]:
        with db.begin() as session:
            state = lifecycle.progress(
                session, job_id, by=WORKER, phase=phase, fraction=0.5, step=step
            )
            assert state is JobState.RUNNING
    with db.begin() as session:
        details = {"attempt": 1, "error_class": "out_of_memory"}
        assert lifecycle.attempt_failed(session, job_id, by=WORKER, token=token, details=details)
        assert lifecycle.succeed(
            session, job_id, by=WORKER, token=token, values={"video_key": "v.mp4"}
        )
    with db.session() as session:
        events = lifecycle.events_of(session, job_id)
        job = session.get(Job, job_id)
        assert job is not None and job.state is JobState.SUCCEEDED
        assert (job.phase, job.progress, job.claim_token) == (Phase.DONE, 1.0, None)
    assert [e.type for e in events] == [
        EventType.SUBMITTED,
        EventType.PUBLISHED,
        EventType.CLAIMED,
        EventType.PHASE,
        EventType.PHASE,
        EventType.ATTEMPT_FAILED,
        EventType.SUCCEEDED,
    ]
    assert [e.as_dict()["actor"] for e in events][:3] == ["api", "api", "worker:w1@test"]
    assert events[3].details == {"phase": "denoising", "step": 0}
    assert events[5].details == details
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_requeue_resets_the_run_and_keeps_the_overrides(db: Database, settings: Settings) -> None:
    """A failed job requeued with overrides is queued afresh: no error, token or progress."""
    job_id = new_job(db)
    token = claim(db, settings, job_id)
    with db.begin() as session:
        assert lifecycle.fail(session, job_id, by=WORKER, token=token, error="out of memory")
    with db.begin() as session:
        assert lifecycle.requeue(session, job_id, by=ADMIN, overrides={"casts": False})
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.phase, job.error, job.claim_token) == (
            JobState.QUEUED,
            Phase.QUEUED,
            None,
            None,
        )
        assert job.casts is False and job.finished_at is None
        last = lifecycle.events_of(session, job_id)[-1]
        assert last.type is EventType.REQUEUED
        assert last.details == {"from": "failed", "overrides": {"casts": False}}


def test_cancel_stops_a_queued_job_at_once_and_asks_a_running_one(
    db: Database, settings: Settings
) -> None:
    """Queued -> canceled; running -> cancel requested, then canceled by its worker."""
    waiting, running = new_job(db), new_job(db)
    token = claim(db, settings, running)
    with db.begin() as session:
        assert lifecycle.cancel(session, waiting, by=API) is JobState.CANCELED
        assert lifecycle.cancel(session, running, by=API) is JobState.CANCEL_REQUESTED
        assert lifecycle.cancel(session, running, by=API) is JobState.CANCEL_REQUESTED
    with db.begin() as session:
        assert (
            lifecycle.progress(
                session, running, by=WORKER, phase=Phase.DENOISING, fraction=0.1, step=1
            )
            is JobState.CANCEL_REQUESTED
        )
        assert lifecycle.confirm_cancel(session, running, by=WORKER, token=token)
    assert event_types(db, waiting)[-1] is EventType.CANCELED
    assert event_types(db, running)[-2:] == [EventType.CANCEL_REQUESTED, EventType.CANCELED]
    assert state_of(db, running) is JobState.CANCELED


def test_a_stale_token_changes_nothing(db: Database, settings: Settings) -> None:
    """A worker whose claim was taken over cannot finish or fail the job."""
    job_id = new_job(db)
    token = claim(db, settings, job_id)
    with db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (
            lifecycle.settle_lost(session, settings, job, by=REAPER, seen_updated_at=job.updated_at)
            is JobState.QUEUED
        )
    fresh = claim(db, settings, job_id, OTHER)
    with db.begin() as session:
        assert not lifecycle.succeed(session, job_id, by=WORKER, token=token, values={})
        assert not lifecycle.fail(session, job_id, by=WORKER, token=token, error="late")
    with db.begin() as session:
        assert lifecycle.succeed(session, job_id, by=OTHER, token=fresh, values={})
    assert event_types(db, job_id)[-3:] == [
        EventType.WORKER_LOST,
        EventType.CLAIMED,
        EventType.SUCCEEDED,
    ]


def test_the_poison_rule_fails_a_job_lost_too_often(db: Database, settings: Settings) -> None:
    """Lost ``SVDFARM_MAX_DELIVERIES`` times in a row: failed, with the reason."""
    job_id = new_job(db)
    left = []
    for _ in range(settings.max_deliveries):
        claim(db, settings, job_id)
        with db.begin() as session:
            job = session.get(Job, job_id)
            assert job is not None
            left.append(
                lifecycle.settle_lost(session, settings, job, by=REAPER, seen_updated_at=None)
            )
    assert left == [JobState.QUEUED] * (settings.max_deliveries - 1) + [JobState.FAILED]
    with db.session() as session:
        last = lifecycle.events_of(session, job_id)[-1]
        job = session.get(Job, job_id)
        assert job is not None and job.error and "lost 3 times in a row" in job.error
    assert (last.type, last.details["reason"]) == (EventType.FAILED, "poison")


def test_hand_back_queues_the_job_and_closes_its_attempt(db: Database, settings: Settings) -> None:
    """A stopping worker's job goes back to the queue with a handed_back event."""
    job_id = new_job(db)
    claim(db, settings, job_id)
    with db.begin() as session:
        assert lifecycle.hand_back(session, job_id, by=WORKER, message="stop timeout passed")
        assert not lifecycle.hand_back(session, job_id, by=WORKER, message="again")
    assert state_of(db, job_id) is JobState.QUEUED
    assert event_types(db, job_id)[-1] is EventType.HANDED_BACK


def test_expire_keeps_the_state_and_happens_once(db: Database, settings: Settings) -> None:
    """Expiring an ended job's outputs keeps its state, names the files, and only once."""
    job_id = new_job(db)
    token = claim(db, settings, job_id)
    with db.begin() as session:
        assert lifecycle.succeed(session, job_id, by=WORKER, token=token, values={})
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.finished_at is not None
        ended = job.finished_at
    files = [f"{job_id}/video.mp4"]

    def expire(session: Any, by: By = REAPER) -> bool:
        return lifecycle.expire(
            session, job_id, by=by, outputs=True, inputs=False, files=files, seen_finished_at=ended
        )

    with db.begin() as session:
        assert expire(session)
    with db.begin() as session:
        assert not expire(session)
    assert state_of(db, job_id) is JobState.SUCCEEDED
    with db.session() as session:
        last = lifecycle.events_of(session, job_id)[-1]
        assert replay(lifecycle.events_of(session, job_id)) is JobState.SUCCEEDED
    assert (last.type, last.details["files"]) == (EventType.EXPIRED, files)
    with db.begin() as session, pytest.raises(IllegalMove, match="worker may not expire"):
        expire(session, WORKER)


def test_a_storage_failure_is_retried_up_to_the_cap(db: Database, settings: Settings) -> None:
    """A job that failed because its video could not be stored is queued again by the reaper,
    a new life each time, until SVDFARM_MAX_DELIVERIES lives in a row ended that way; other
    failures are not retried."""
    job_id = new_job(db)
    retried = []
    for _ in range(settings.max_deliveries):
        token = claim(db, settings, job_id)
        with db.begin() as session:
            lifecycle.fail(
                session, job_id, by=WORKER, token=token, error="full", details=STORAGE_FAILURE
            )
        with db.begin() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.finished_at is not None
            retried.append(
                lifecycle.retry_storage(
                    session, settings, job_id, by=REAPER, seen_finished_at=job.finished_at
                )
            )
    assert retried == [True] * (settings.max_deliveries - 1) + [False]
    assert state_of(db, job_id) is JobState.FAILED
    with db.session() as session:
        assert replay(lifecycle.events_of(session, job_id)) is JobState.FAILED
    other = new_job(db)
    token = claim(db, settings, other)
    with db.begin() as session:
        lifecycle.fail(session, other, by=WORKER, token=token, error="boom")
    with db.begin() as session:
        job = session.get(Job, other)
        assert job is not None and job.finished_at is not None
        seen = job.finished_at
        assert not lifecycle.retry_storage(
            session, settings, other, by=REAPER, seen_finished_at=seen
        )


# -- Nobody else writes jobs.state -----------------------------------------------------------


def _is_job_state(node: ast.expr) -> bool:
    """True for ``JobState.X`` and for a bare name (a state held in a variable)."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id == "JobState"
    return isinstance(node, ast.Name)


def _state_writes(path: Path) -> list[str]:
    """Places in one module that write a job's state: ``.values(state=...)`` and
    ``Job(state=...)``, ``{"state": JobState.X}``, ``<x>.state = JobState.X`` (also in a
    tuple assignment). Worker states (``WorkerState.X``) are not job states."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            for keyword in node.keywords:
                if keyword.arg != "state":
                    continue
                if name == "Job" or (name == "values" and _is_job_state(keyword.value)):
                    found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "state":
                    if isinstance(value, ast.Attribute) and _is_job_state(value):
                        found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = (
                    list(zip(target.elts, node.value.elts, strict=False))
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                    else [(target, node.value)]
                )
                for left, right in pairs:
                    if isinstance(left, ast.Attribute) and left.attr == "state":
                        if "JobState" in ast.dump(right):
                            found.append(f"{path.name}:{node.lineno}")
    return sorted(found, key=lambda place: int(place.rsplit(":", 1)[1]))


def test_only_the_lifecycle_writes_job_states() -> None:
    """A search of every module of the farm for job-state writes finds none outside
    svdfarm/lifecycle.py (which writes through its table, not by these patterns)."""
    writes: dict[str, list[str]] = {}
    for package in ("svdfarm", "web", "worker", "cli", "migrations", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            found = _state_writes(path)
            if found and path.name != "lifecycle.py":
                writes[str(path.relative_to(ROOT))] = found
    assert writes == {}


def test_the_search_finds_state_writes(tmp_path: Path) -> None:
    """The search above is not blind: it finds each kind of write in a sample module."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "update(Job).where(Job.id == 1).values(state=JobState.FAILED)\n"
        "Job(id=1, state=JobState.QUEUED)\n"
        'values = {"state": JobState.CANCELED}\n'
        "job.state = JobState.RUNNING\n"
        "row.state = WorkerState.IDLE\n"
        "job.state, job.phase = JobState.QUEUED, Phase.QUEUED\n"
        "update(Job).values(state=seen)\n"
        "update(Worker).values(state=WorkerState.BUSY)\n"
        'schema = {"state": _ref("JobState")}\n'
    )
    assert _state_writes(sample) == [f"sample.py:{n}" for n in (1, 2, 3, 4, 6, 7)]


# -- The diagram in the docs -----------------------------------------------------------------


def test_the_architecture_diagram_is_the_transition_table() -> None:
    """docs/architecture.md's Mermaid block is exactly what the table draws."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```mermaid\n(.*?)```", text, flags=re.S)
    assert lifecycle.mermaid().strip() in [b.strip() for b in blocks]


# -- Concurrent actors, random sequences -----------------------------------------------------

#: Which moves can write each event type, to replay a job's events through the table.
EVENT_MOVES: dict[EventType, list[str]] = {}
for _move in MOVES:
    if _move.event is not None:
        EVENT_MOVES.setdefault(_move.event, []).append(_move.name)


def replay(events: list[JobEvent]) -> JobState | None:
    """The state the events lead to, asserting each was a move the table allows from the
    state before it, made by an actor it allows, with exactly one terminal event per life."""
    state: JobState | None = None
    terminal_in_life = 0
    for event in events:
        moves = [lifecycle._BY_NAME[n] for n in EVENT_MOVES.get(event.type, [])]
        if event.type is EventType.PUBLISH_FAILED:
            assert state is not None, event
            continue
        allowed = [m for m in moves if state in m.sources and event.actor_kind in m.actors]
        assert allowed, f"{event.type.value} by {event.actor_kind.value} from {state}"
        targets = {m.target or state for m in allowed}
        assert len(targets) == 1, (event.type, state, targets)
        if event.type.new_life:
            assert terminal_in_life == 1
            terminal_in_life = 0
        state = targets.pop()
        if event.type.terminal:
            terminal_in_life += 1
            assert terminal_in_life == 1, "two terminal events in one life"
    assert terminal_in_life == (1 if state is not None and state.terminal else 0)
    return state


@dataclasses.dataclass
class _Tracked:
    """What the test remembers of one job: every claim token it was given."""

    job_id: uuid.UUID
    tokens: list[str] = dataclasses.field(default_factory=list)


def _machine(db: Database, settings: Settings) -> type[RuleBasedStateMachine]:
    """A state machine of users, workers, reapers and operators on ``db``."""

    class JobLives(RuleBasedStateMachine):
        """Random moves by random actors, some raced two at a time on one job."""

        jobs = Bundle("jobs")

        def __init__(self) -> None:
            super().__init__()
            self.tracked: list[_Tracked] = []
            self.max_event_id = 0

        def _attempt(self, action: Callable[[Any], object]) -> None:
            """Run one action in its own transaction; an illegal move changes nothing."""
            try:
                with db.begin() as session:
                    action(session)
            except IllegalMove:
                pass

        def _actions(self, job: _Tracked, choice: int, worker: By) -> Callable[[Any], object]:
            """The ``choice``-th kind of action on ``job`` by ``worker`` (or a user)."""
            token = job.tokens[-1] if job.tokens else "none"
            stale = job.tokens[0] if job.tokens else "none"

            def do_claim(session: Any) -> None:
                taken = lifecycle.claim(session, settings, job.job_id, by=worker)
                if taken.outcome is ClaimOutcome.CLAIMED:
                    job.tokens.append(taken.token)

            def lose(session: Any) -> None:
                found = session.get(Job, job.job_id, with_for_update=True)
                if found is not None:
                    seen = found.updated_at
                    lifecycle.settle_lost(session, settings, found, by=REAPER, seen_updated_at=seen)

            def expire(session: Any) -> None:
                found = session.get(Job, job.job_id)
                if found is not None and found.finished_at is not None:
                    lifecycle.expire(
                        session,
                        job.job_id,
                        by=REAPER,
                        outputs=True,
                        inputs=False,
                        files=[],
                        seen_finished_at=found.finished_at,
                    )

            def retry_storage(session: Any) -> None:
                found = session.get(Job, job.job_id)
                if found is not None and found.finished_at is not None:
                    seen = found.finished_at
                    lifecycle.retry_storage(
                        session, settings, job.job_id, by=REAPER, seen_finished_at=seen
                    )

            actions: list[Callable[[Any], object]] = [
                do_claim,
                lambda s: lifecycle.publish(s, job.job_id, by=API),
                lambda s: lifecycle.cancel(s, job.job_id, by=API),
                lambda s: lifecycle.progress(
                    s, job.job_id, by=worker, phase=Phase.DENOISING, fraction=0.3, step=1
                ),
                lambda s: lifecycle.progress(
                    s, job.job_id, by=worker, phase=Phase.ENCODING, fraction=0.9, step=2
                ),
                lambda s: lifecycle.attempt_failed(
                    s, job.job_id, by=worker, token=token, details={"attempt": 1}
                ),
                lambda s: lifecycle.succeed(s, job.job_id, by=worker, token=token, values={}),
                lambda s: lifecycle.succeed(s, job.job_id, by=worker, token=stale, values={}),
                lambda s: lifecycle.fail(
                    s, job.job_id, by=worker, token=token, error="x", details=STORAGE_FAILURE
                ),
                lambda s: lifecycle.confirm_cancel(s, job.job_id, by=worker, token=token),
                lambda s: lifecycle.hand_back(s, job.job_id, by=worker, message="stopping"),
                lose,
                lambda s: lifecycle.requeue(s, job.job_id, by=ADMIN),
                lambda s: lifecycle.requeue(s, job.job_id, by=worker),  # never allowed
                expire,
                retry_storage,
            ]
            return actions[choice % len(actions)]

        @precondition(lambda self: len(self.tracked) < 3)
        @rule(target=jobs)
        def submit(self) -> _Tracked:
            """A client submits a job (a few per run, so each lives long)."""
            tracked = _Tracked(new_job(db))
            self.tracked.append(tracked)
            return tracked

        @rule(job=jobs, choice=st.integers(0, 15), worker=st.sampled_from([WORKER, OTHER]))
        def act(self, job: _Tracked, choice: int, worker: By) -> None:
            """One actor makes one move (or tries to)."""
            self._attempt(self._actions(job, choice, worker))

        @rule(job=jobs, first=st.integers(0, 15), second=st.integers(0, 15))
        def race(self, job: _Tracked, first: int, second: int) -> None:
            """Two actors move the same job at the same moment, each in its own thread."""
            moves = [self._actions(job, first, WORKER), self._actions(job, second, OTHER)]
            barrier = threading.Barrier(2)
            errors: list[BaseException] = []

            def run(action: Callable[[Any], object]) -> None:
                barrier.wait()
                try:
                    self._attempt(action)
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(m,)) for m in moves]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not errors, errors

        @invariant()
        def every_life_follows_the_table(self) -> None:
            """Each job's events replay through the table to its state; ids only grow."""
            with db.session() as session:
                for tracked in self.tracked:
                    job = session.get(Job, tracked.job_id, populate_existing=True)
                    assert job is not None
                    events = lifecycle.events_of(session, tracked.job_id)
                    assert replay(events) is job.state
                    ids = [e.id for e in events]
                    assert ids == sorted(set(ids))
                    stamps = [e.at for e in events]
                    assert stamps == sorted(stamps)
                newest = session.query(JobEvent.id).order_by(JobEvent.id.desc()).first()
            if newest is not None:
                assert newest[0] >= self.max_event_id
                self.max_event_id = newest[0]

    return JobLives


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_concurrent_actors_never_reach_an_illegal_state(db: Database, settings: Settings) -> None:
    """Random sequences of moves by users, workers, reapers and operators, with races, on
    SQLite and PostgreSQL: every job's story is the table's, one terminal event per life."""
    run_state_machine_as_test(
        _machine(db, settings),
        settings=hypothesis_settings(
            max_examples=25,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_the_replay_catches_an_illegal_story(db: Database, settings: Settings) -> None:
    """The property's check is not blind: a story with a move from the wrong state fails."""
    job_id = new_job(db)
    with db.begin() as session:
        lifecycle.record(session, job_id, EventType.SUCCEEDED, WORKER)
    with db.session() as session, pytest.raises(AssertionError, match="succeeded by worker"):
        replay(lifecycle.events_of(session, job_id))
