"""``GET /metrics`` parsed with Prometheus' own parsers (OpenMetrics, as Prometheus asks for
it, and the classic text format), on real databases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import update

from svdfarm.actions import delete_job, requeue_jobs
from svdfarm.celery_app import create_celery
from svdfarm.db import Database
from svdfarm.lifecycle import By
from svdfarm.models import Attempt
from svdfarm.settings import Settings
from svdfarm.states import Actor, AttemptOutcome, ErrorClass, JobState, WorkerState
from tests.conftest import DATABASES, REDIS_URL, needs_redis
from tests.rows import QUEUE, add_job, add_worker, send_two_cancel_one
from web import create_app

PLAN = "fp16 unet+enc, fp32 vae, chunk 8 on cuda"
#: What Prometheus sends: OpenMetrics first, the classic text format as a fallback.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
#: Metric types whose samples Prometheus takes for counters: they must never fall.
RISING = {"counter", "histogram", "summary"}


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    """The web app with the metrics blueprint (registered here until create_app does)."""
    from web.metrics import bp

    flask_app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
    if bp.name not in flask_app.blueprints:
        flask_app.register_blueprint(bp)
    yield flask_app
    flask_app.extensions["svdfarm.db"].dispose()


def scrape_families(client: FlaskClient, *, openmetrics: bool = True) -> list[Metric]:
    """The metric families of one scrape, asked for in OpenMetrics (as Prometheus asks) or in
    the classic text format, each read with the parser of the format that came back."""
    headers = {"Accept": PROMETHEUS_ACCEPT} if openmetrics else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    text = response.get_data(True)
    if response.headers["Content-Type"].startswith("application/openmetrics-text"):
        return list(openmetrics_families(text))
    assert response.headers["Content-Type"].startswith("text/plain")
    return list(text_string_to_metric_families(text))


def scrape(client: FlaskClient) -> dict[str, list[Sample]]:
    """The samples of each metric family, by family name (OpenMetrics)."""
    return {f.name: f.samples for f in scrape_families(client)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The value of the one sample called ``name`` with exactly ``labels``."""
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def test_metrics_on_an_empty_farm(client: FlaskClient) -> None:
    """Every state at zero, no attempts, an empty histogram, every queue at zero; OpenMetrics
    to a scraper that asks for it, the classic text format to one that does not."""
    asked = client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert asked.headers["Content-Type"].startswith("application/openmetrics-text; version=1")
    assert asked.get_data(True).endswith("# EOF\n")
    assert client.get("/metrics").headers["Content-Type"].startswith("text/plain")
    families = scrape(client)
    for state in JobState:
        assert value(families["svdfarm_jobs"], "svdfarm_jobs", state=state.value) == 0
    assert families["svdfarm_attempts"] == []
    histogram = families["svdfarm_job_duration_seconds"]
    assert value(histogram, "svdfarm_job_duration_seconds_gcount") == 0
    assert value(histogram, "svdfarm_job_duration_seconds_bucket", le="+Inf") == 0
    assert value(families["svdfarm_queue_depth"], "svdfarm_queue_depth", queue=QUEUE) == 0
    assert value(families["svdfarm_queue_messages"], "svdfarm_queue_messages", queue=QUEUE) == 0
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
    name = "svdfarm_attempts"
    assert value(attempts, name, error_class="none", plan=PLAN, outcome="succeeded") == 2
    assert value(attempts, name, error_class="out_of_memory", plan=PLAN, outcome="failed") == 2
    assert value(attempts, name, error_class="non_finite", plan=PLAN, outcome="failed") == 1
    durations = families["svdfarm_job_duration_seconds"]
    name = "svdfarm_job_duration_seconds"
    assert value(durations, f"{name}_bucket", le="5.0") == 1
    assert value(durations, f"{name}_bucket", le="60.0") == 1
    assert value(durations, f"{name}_bucket", le="120.0") == 2
    assert value(durations, f"{name}_bucket", le="+Inf") == 2
    assert value(durations, f"{name}_gcount") == 2
    assert value(durations, f"{name}_gsum") == pytest.approx(94.0, abs=0.01)
    # Two jobs wait (the requeued one and one inserted queued); only the requeued one was sent.
    assert value(families["svdfarm_queue_depth"], "svdfarm_queue_depth", queue=QUEUE) == 2
    assert value(families["svdfarm_queue_messages"], "svdfarm_queue_messages", queue=QUEUE) == 1
    assert value(families["svdfarm_workers_online"], "svdfarm_workers_online") == 1


def test_metrics_say_when_the_broker_is_down(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No message counts, and ``svdfarm_broker_up 0``, when the broker cannot be reached; the
    waiting jobs still come from the database."""
    from svdfarm.depths import BrokerUnavailable

    def down(*_: object, **__: object) -> dict[str, int]:
        raise BrokerUnavailable("down")

    monkeypatch.setattr("web.metrics.queue_depths", down)
    families = scrape(client)
    assert value(families["svdfarm_broker_up"], "svdfarm_broker_up") == 0
    assert "svdfarm_queue_messages" not in families
    assert value(families["svdfarm_queue_depth"], "svdfarm_queue_depth", queue=QUEUE) == 0
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


def rising_samples(
    families: list[Metric], *, openmetrics: bool = True
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample Prometheus reads as a counter, by name and labels: of counter, histogram
    and summary families, and any named ``..._total`` or ``..._count``.

    The classic text format has no gauge histogram: it writes one as a ``histogram`` (with
    ``_gcount`` and ``_gsum`` beside it, never ``_count``), so there only the names count.
    """
    types = RISING if openmetrics else RISING - {"histogram"}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families
        for s in family.samples
        if family.type in types or s.name.endswith(("_total", "_count"))
    }


def assert_nothing_fell(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> None:
    """No counter-like sample of the first scrape is lower, or gone, in the second."""
    fell = {key: (was, after.get(key)) for key, was in before.items() if after.get(key, -1) < was}
    assert not fell, f"counters that fell (a reset to Prometheus): {fell}"


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_no_counter_falls_when_a_job_is_deleted_or_an_attempt_fails(
    client: FlaskClient, db: Database, settings: Settings
) -> None:
    """Two scrapes around a deleted job (with its attempt and its duration) and a running
    attempt that gets its error class: nothing Prometheus takes for a counter falls, in either
    exposition format. The attempts are still counted, by outcome, as a gauge."""
    deleted = add_job(db, settings, JobState.SUCCEEDED, error_class=None)
    add_job(db, settings, JobState.SUCCEEDED, error_class=None)
    running = add_job(db, settings, JobState.RUNNING)
    with db.begin() as session:
        session.execute(
            update(Attempt)
            .where(Attempt.job_id == running)
            .values(outcome=AttemptOutcome.RUNNING, finished_at=None)
        )
    before = {
        om: rising_samples(scrape_families(client, openmetrics=om), openmetrics=om)
        for om in (True, False)
    }
    first = scrape(client)

    with db.session() as session:
        assert delete_job(session, settings, deleted).done
    with db.begin() as session:
        session.execute(
            update(Attempt)
            .where(Attempt.job_id == running)
            .values(outcome=AttemptOutcome.FAILED, error_class=ErrorClass.OUT_OF_MEMORY)
        )
    for om in (True, False):
        after = rising_samples(scrape_families(client, openmetrics=om), openmetrics=om)
        assert_nothing_fell(before[om], after)
    name = "svdfarm_attempts"
    assert value(first[name], name, error_class="none", plan=PLAN, outcome="running") == 1
    assert value(first[name], name, error_class="none", plan=PLAN, outcome="succeeded") == 2
    families = scrape(client)
    attempts = families[name]
    assert value(attempts, name, error_class="none", plan=PLAN, outcome="succeeded") == 1
    assert value(attempts, name, error_class="out_of_memory", plan=PLAN, outcome="failed") == 1
    duration = "svdfarm_job_duration_seconds"
    assert value(families[duration], f"{duration}_gcount") == 1


def test_a_canceled_jobs_message_is_not_waiting(
    client: FlaskClient, db: Database, settings: Settings
) -> None:
    """Two jobs sent to a queue, one canceled while queued: its message stays in the broker
    until a worker drops it, but one job waits."""
    kept, canceled = send_two_cancel_one(db, settings)
    families = scrape(client)
    assert value(families["svdfarm_queue_depth"], "svdfarm_queue_depth", queue=QUEUE) == 1
    assert value(families["svdfarm_queue_messages"], "svdfarm_queue_messages", queue=QUEUE) == 2
    assert value(families["svdfarm_jobs"], "svdfarm_jobs", state="canceled") == 1


def kept_and_recounted(
    db: Database,
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """The counts the triggers kept, and the same counted from every row (as the scrape did
    before the counts were kept), zeros left out of both."""
    from sqlalchemy import func, select

    from svdfarm.counts import DURATION_BUCKETS
    from svdfarm.models import METRIC_LABEL_SEP, Job, MetricCount

    with db.session() as session:
        kept = {
            (m.name, m.labels): round(m.value, 3)
            for m in session.scalars(select(MetricCount))
            if round(m.value, 3)
        }
        recount: dict[tuple[str, str], float] = {}
        for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
            if state.terminal:
                recount[("jobs", state.value)] = n
        for job in session.scalars(select(Job).where(Job.state == JobState.SUCCEEDED)):
            if job.started_at and job.finished_at:
                seconds = (job.finished_at - job.started_at).total_seconds()
                bound = next((str(b) for b in DURATION_BUCKETS if seconds <= b), "+Inf")
                key = ("duration_count", bound)
                recount[key] = recount.get(key, 0) + 1
                total = recount.get(("duration_sum", ""), 0.0) + seconds
                recount[("duration_sum", "")] = round(total, 3)
        for attempt in session.scalars(select(Attempt)):
            labels = [
                attempt.error_class.value if attempt.error_class else "none",
                attempt.plan_name,
                attempt.outcome.value,
            ]
            key = ("attempts", METRIC_LABEL_SEP.join(labels))
            recount[key] = recount.get(key, 0) + 1
    return kept, recount


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_kept_counts_match_a_full_count(db: Database, settings: Settings) -> None:
    """Whatever writes the rows (inserts, state moves, a requeue, deletes with their attempts,
    an attempt's outcome changed in place), the counts the database keeps equal a count of
    every row."""
    from datetime import timedelta

    from svdfarm.models import Job, utcnow

    jobs = [add_job(db, settings, state) for state in JobState for _ in range(2)]
    jobs.append(add_job(db, settings, JobState.SUCCEEDED, duration_s=4000.0))
    kept, recount = kept_and_recounted(db)
    assert kept == pytest.approx(recount, abs=0.005) and ("jobs", "succeeded") in kept
    with db.begin() as session:
        session.execute(
            update(Job).where(Job.id == jobs[4]).values(state=JobState.QUEUED, finished_at=None)
        )
        session.execute(
            update(Job)
            .where(Job.id == jobs[0])
            .values(
                state=JobState.SUCCEEDED,
                started_at=utcnow() - timedelta(seconds=20),
                finished_at=utcnow(),
            )
        )
        session.execute(
            update(Attempt)
            .where(Attempt.job_id == jobs[2])
            .values(outcome=AttemptOutcome.FAILED, error_class=ErrorClass.NON_FINITE)
        )
        session.execute(update(Job).where(Job.id == jobs[5]).values(expired_at=utcnow()))
    with db.session() as session:
        for job_id in (jobs[-1], jobs[6]):
            assert delete_job(session, settings, job_id).done
    kept, recount = kept_and_recounted(db)
    # SQLite's date functions read timestamps to the millisecond: a duration kept there may
    # differ from Python's microsecond count by up to 1 ms per job.
    assert kept == pytest.approx(recount, abs=0.005)
    # Counted again from every row (svdfarm db recount): the same.
    from svdfarm.counts import recount as count_again

    with db.begin() as session:
        count_again(session)
    assert kept_and_recounted(db) == (kept, recount)


def test_the_migration_counts_what_the_scrape_reads() -> None:
    """The migration froze the histogram's bounds and the finished states: the same as the
    scrape's."""
    import importlib.util
    from pathlib import Path

    from svdfarm.counts import DURATION_BUCKETS

    versions = Path(__file__).resolve().parents[2] / "migrations" / "versions"
    path = next(versions.glob("*_metric_counts.py"))
    spec = importlib.util.spec_from_file_location("metric_counts_migration", path)
    assert spec and spec.loader
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert migration.DURATION_BUCKETS == DURATION_BUCKETS
    assert set(migration.FINISHED) == {s.value for s in JobState.terminal_states()}
    from svdfarm.models import METRIC_LABEL_SEP

    assert migration.SEP == METRIC_LABEL_SEP
