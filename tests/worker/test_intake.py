"""A worker consumes nothing while it renders (``worker.tasks._Intake``): it cancels its
subscriptions when a render starts, before the message is acknowledged, subscribes again once
the render has ended, gives back a delivery that reaches it mid-render, and never subscribes
again while it stops. Celery's consumer and requests are stood in for here; the live tests
(tests/test_faults.py, tests/test_restarts.py) run the real ones on Redis and RabbitMQ."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from celery.worker import state as worker_state

from svdfarm.celery_app import RENDER_TASK
from tests.worker.consumers import FakeConsumer, FakeTaskConsumer
from worker import tasks


@dataclass(eq=False)
class FakeRequest:
    """A delivery as Celery's worker holds it (task id = job id)."""

    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    name: str = RENDER_TASK
    rejected: list[bool] = field(default_factory=list)

    def reject(self, requeue: bool = False) -> None:
        self.rejected.append(requeue)


@pytest.fixture
def intake() -> Iterator[tasks._Intake]:
    """An intake on a fake consumer; Celery's worker state left as it was found."""
    saved = set(worker_state.active_requests)
    fresh = tasks._Intake()
    fresh.consumer = FakeConsumer()
    yield fresh
    worker_state.active_requests.clear()
    worker_state.active_requests.update(saved)
    tasks._registry.draining = False


def consumer_of(intake: tasks._Intake) -> FakeTaskConsumer:
    """The fake task consumer the intake follows."""
    task_consumer: FakeTaskConsumer = intake.consumer.task_consumer
    return task_consumer


def test_paused_while_rendering_and_consuming_again_after(intake: tasks._Intake) -> None:
    """Paused when a render starts; ticks leave it paused while it runs, resume after."""
    render = FakeRequest()
    intake.pause()
    worker_state.active_requests.add(render)
    intake.tick()
    assert consumer_of(intake).calls == ["cancel"] and not consumer_of(intake)._active_tags
    worker_state.active_requests.discard(render)
    intake.tick()
    assert consumer_of(intake).calls == ["cancel", "consume"] and not intake.paused
    intake.tick()
    assert consumer_of(intake).calls == ["cancel", "consume"]  # nothing more to do


def test_a_reconnection_mid_render_is_paused_again(intake: tasks._Intake) -> None:
    """After a reconnection the new task consumer subscribes; a tick mid-render cancels it."""
    render = FakeRequest()  # Celery's active requests are a WeakSet: keep it referenced
    worker_state.active_requests.add(render)
    intake.consumer.task_consumer = FakeTaskConsumer()  # the consumer restarted, consuming
    intake.tick()
    assert consumer_of(intake).calls == ["cancel"] and intake.paused


def test_a_delivery_mid_render_is_given_back(intake: tasks._Intake) -> None:
    """A second render delivered while one runs is rejected back to its queue (and the
    consumer paused); with nothing running, a delivery is taken."""
    late = FakeRequest()
    assert intake.bounce(late) is False and late.rejected == []
    render = FakeRequest()
    worker_state.active_requests.add(render)
    worker_state.reserved_requests.add(late)
    assert intake.bounce(late) is True
    assert late.rejected == [True] and consumer_of(intake).calls == ["cancel"]
    assert late not in worker_state.reserved_requests


def test_a_stopping_worker_never_consumes_again(intake: tasks._Intake) -> None:
    """Once the worker is stopping, the end of its render does not resubscribe it."""
    intake.pause()
    tasks._registry.draining = True
    intake.tick()
    assert consumer_of(intake).calls == ["cancel"] and intake.paused
