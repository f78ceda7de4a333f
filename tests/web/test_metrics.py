"""``GET /metrics`` parsed with Prometheus' own parser, on real databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from svdfarm.actions import requeue_jobs
from svdfarm.celery_app import create_celery
from svdfarm.db import Database
from svdfarm.lifecycle import By
from svdfarm.settings import Settings
from svdfarm.states import Actor, ErrorClass, JobState, WorkerState
from tests.conftest import DATABASES, REDIS_URL, needs_redis
from tests.rows import QUEUE, add_job, add_worker
from web import create_app

PLAN = "fp16 unet+enc, fp32 vae, chunk 8 on cuda"


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    """The web app with the metrics blueprint (registered here until create_app does)."""
    from web.metrics import bp

    flask_app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
    if bp.name not in flask_app.blueprints:
        flask_app.register_blueprint(bp)
    yield flask_app
    flask_app.extensions["svdfarm.db"].dispose()


def scrape(client: FlaskClient) -> dict[str, list[Sample]]:
    """The samples of each metric family, by family name."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.get_data(True)
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The value of the one sample called ``name`` with exactly ``labels``."""
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def test_metrics_on_an_empty_farm(client: FlaskClient) -> None:
    """Every state at zero, no attempts, an empty histogram, every queue at zero."""
    families = scrape(client)
    for state in JobState:
        assert value(families["svdfarm_jobs"], "svdfarm_jobs", state=state.value) == 0
    assert families["svdfarm_attempts"] == []
    histogram = families["svdfarm_job_duration_seconds"]
    assert value(histogram, "svdfarm_job_duration_seconds_count") == 0
    assert value(histogram, "svdfarm_job_duration_seconds_bucket", le="+Inf") == 0
    assert value(families["svdfarm_queue_depth"], "svdfarm_queue_depth", queue=QUEUE) == 0
    assert value(families["svdfarm_broker_up"], "svdfarm_broker_up") == 1
    assert value(families["svdfarm_workers_online"], "svdfarm_workers_online") == 0


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_metrics_count_jobs_attempts_durations_queues_and_workers(
    client: FlaskClient, db: Database, settings: Settings
) -> None:
    """Counts from the rows inserted; no login is needed."""
    add_job(db, settings, JobState.SUCCEEDED, error_class=None, duration_s=90.0)
    add_job(db, settings, JobState.SUCCEEDED, error_class=None, duration_s=4.0)
    add_job(db, settings)
    add_job(db, settings, error_class=ErrorClass.NON_FINITE)
    requeued = add_job(db, settings)
    add_job(db, settings, JobState.QUEUED)
    celery = create_celery(settings)
    with db.session() as session:
        assert requeue_jobs(session, celery, settings, [requeued], by=By(Actor.ADMIN))[0].done
    celery.close()
    add_worker(db, "gpu1@farm", [QUEUE], state=WorkerState.IDLE)
    add_worker(db, "gone@farm", [QUEUE], heartbeat_age_s=3600)

    families = scrape(client)
    jobs = families["svdfarm_jobs"]
    assert value(jobs, "svdfarm_jobs", state="succeeded") == 2
    assert value(jobs, "svdfarm_jobs", state="failed") == 2
    assert value(jobs, "svdfarm_jobs", state="queued") == 2
    attempts = families["svdfarm_attempts"]
    assert value(attempts, "svdfarm_attempts_total", error_class="none", plan=PLAN) == 2
    assert value(attempts, "svdfarm_attempts_total", error_class="out_of_memory", plan=PLAN) == 2
    assert value(attempts, "svdfarm_attempts_total", error_class="non_finite", plan=PLAN) == 1
    durations = families["svdfarm_job_duration_seconds"]
    name = "svdfarm_job_duration_seconds"
    assert value(durations, f"{name}_bucket", le="5.0") == 1
    assert value(durations, f"{name}_bucket", le="60.0") == 1
    assert value(durations, f"{name}_bucket", le="120.0") == 2
    assert value(durations, f"{name}_bucket", le="+Inf") == 2
    assert value(durations, f"{name}_count") == 2
    assert value(durations, f"{name}_sum") == pytest.approx(94.0, abs=0.01)
    assert value(families["svdfarm_queue_depth"], "svdfarm_queue_depth", queue=QUEUE) == 1
    assert value(families["svdfarm_workers_online"], "svdfarm_workers_online") == 1


def test_metrics_say_when_the_broker_is_down(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No queue depths, and ``svdfarm_broker_up 0``, when the broker cannot be reached."""
    from svdfarm.depths import BrokerUnavailable

    def down(*_: object, **__: object) -> dict[str, int]:
        raise BrokerUnavailable("down")

    monkeypatch.setattr("web.metrics.queue_depths", down)
    families = scrape(client)
    assert value(families["svdfarm_broker_up"], "svdfarm_broker_up") == 0
    assert "svdfarm_queue_depth" not in families
    assert value(families["svdfarm_workers_online"], "svdfarm_workers_online") == 0


def test_queue_depths_fail_fast_on_an_unreachable_broker(settings: Settings) -> None:
    """A broker nobody listens on raises BrokerUnavailable naming the URL, within seconds."""
    import time

    from svdfarm.depths import BrokerUnavailable, queue_depths

    dead = settings.with_overrides(broker_url="redis://127.0.0.1:1/0")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="SVDFARM_BROKER_URL"):
        queue_depths(dead, [QUEUE])
    assert time.monotonic() - started < 15


@pytest.mark.redis
@needs_redis
def test_queue_depths_on_redis(settings: Settings) -> None:
    """Messages sent to a Redis queue are counted; an unknown queue is zero."""
    import uuid

    from svdfarm.depths import queue_depths

    on_redis = settings.with_overrides(broker_url=REDIS_URL)
    queue = f"svd.test.{uuid.uuid4().hex}"
    celery = create_celery(on_redis)
    try:
        for _ in range(2):
            celery.send_task("svdfarm.render", args=["x"], queue=queue)
        assert queue_depths(on_redis, [queue, f"{queue}.empty"]) == {queue: 2, f"{queue}.empty": 0}
    finally:
        with celery.connection_for_write() as connection:
            connection.default_channel.queue_purge(queue)
        celery.close()
