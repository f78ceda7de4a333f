"""Restarting the broker and the database under a live farm, for real.

* The broker restarted while jobs are queued and two render: Redis (empty: no persistence;
  the reaper publishes again what it forgot) and RabbitMQ (``rabbitmqctl stop_app`` and
  ``start_app``: its durable queues keep their messages). Nothing is lost, every job ends with
  exactly one video, and the workers reconnect instead of exiting.
* PostgreSQL stopped while a job renders: the web answers 503 with ``Retry-After`` (never
  500) while it is down and recovers by itself once it is back; the worker retries its
  status writes and the finished video is kept.

The shared PostgreSQL and Redis other tests use are never touched: each test restarts private
ones it owns (:mod:`tests.servers`). RabbitMQ is the local node, restarted with its data, each
test on a virtual host of its own.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from svdfarm.db import Database, upgrade
from svdfarm.settings import Settings
from svdfarm.storage import FileStore
from tests.conftest import (
    AMQP_URL,
    BROKERS,
    fresh_database,
    make_settings,
    needs_postgres,
    needs_redis,
)
from tests.factories import png_bytes
from tests.media import probe_video
from tests.processes import LiveProcess, private_amqp_vhost, start_worker
from tests.rows import wait_for_worker, wait_until
from tests.servers import LocalRabbit, PrivatePostgres, PrivateRedis, ServerUnavailable

pytestmark = [pytest.mark.slow, pytest.mark.postgres, needs_postgres]

TERMINAL = ("succeeded", "failed", "canceled")
#: Worker settings: quick heartbeats (offline after 1.5 s) and a reaper pass every second.
WORKER_ENV = {
    "SVDFARM_HEARTBEAT_INTERVAL": "0.5",
    "SVDFARM_REAP_INTERVAL": "1",
    "SVDFARM_PROGRESS_INTERVAL": "0.2",
}
#: Denoising steps (the tiny model at 8 frames 64x64: about 0.3 s a step on an idle core):
#: the jobs rendering when Redis restarts, the short ones queued behind them, and the job
#: rendering when PostgreSQL stops (its final write should fall inside the outage).
LONG_STEPS, SHORT_STEPS, PG_STEPS = 6, 1, 8
#: PostgreSQL stays down at least this long, and this long after the worker's first failed
#: final write (so it is retrying with a back-off when the database comes back).
OUTAGE_S, FINAL_RETRY_S = 5.0, 4.0
#: Seconds Redis stays down: a restart that takes a while, well past the 1.5 s after which a
#: worker without heartbeats counts as offline here (heartbeats must not need the broker).
REDIS_OUTAGE_S = 8.0
#: One MKL thread per worker too (OpenMP's is one in every worker's environment): test
#: machines are small and shared, and oversubscribed threads make every step many times slower.
THREADS_ENV = {"MKL_NUM_THREADS": "1"}


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A Redis of this test's own, started; stopped and removed afterwards."""
    try:
        server = PrivateRedis()
    except ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
    except ServerUnavailable as exc:
        server.close()
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.close()


@pytest.fixture(params=BROKERS)
def restartable_broker(request: pytest.FixtureRequest) -> Iterator[PrivateRedis | LocalRabbit]:
    """A broker the test may stop and start: a private Redis, or the local RabbitMQ node (on
    a virtual host of the test's own; running again afterwards whatever happened)."""
    if request.param == "redis":
        yield request.getfixturevalue("private_redis")
        return
    with private_amqp_vhost(AMQP_URL) as url:
        rabbit = LocalRabbit(url)
        try:
            yield rabbit
        finally:
            rabbit.close()


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this module's own, started; stopped and removed afterwards."""
    try:
        server = PrivatePostgres()
    except ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
        yield server
    except ServerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        server.close()


class Workers:
    """``svdfarm worker`` processes on the given settings; all killed at the end."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        """Remember where the workers run and log."""
        self.settings, self.tmp_path = settings, tmp_path
        self.started: list[LiveProcess] = []

    def start(self, name: str) -> LiveProcess:
        """Start a worker (:meth:`wait_registered` waits until it is ready)."""
        worker = start_worker(self.settings, self.tmp_path, name, **WORKER_ENV, **THREADS_ENV)
        self.started.append(worker)
        return worker

    def wait_registered(self) -> None:
        """Block until every started worker has registered itself."""
        db = Database(self.settings.database_url)
        try:
            for worker in self.started:
                wait_for_worker(db, worker.hostname, worker.process, lambda w=worker: w.text(None))
        finally:
            db.dispose()

    def logs(self) -> str:
        """Every worker's log, for failure messages."""
        return "\n".join(f"===== {w.hostname} =====\n{w.text(None)}" for w in self.started)

    def close(self) -> None:
        """Kill whatever is left."""
        for worker in self.started:
            worker.kill()


def _submit(client: FlaskClient, steps: int, seed: int = 2) -> Any:
    """POST a job of ``steps`` denoising steps (8 frames, 64x64; about 0.3 s a step)."""
    return client.post(
        "/api/v1/jobs",
        data={
            "image": (io.BytesIO(png_bytes(64, 64)), "in.png"),
            "num_frames": "8",
            "num_inference_steps": str(steps),
            "width": "64",
            "height": "64",
            "seed": str(seed),
        },
        content_type="multipart/form-data",
    )


def _created(client: FlaskClient, steps: int, seed: int = 2) -> str:
    """Submit a job that must be accepted; its id."""
    response = _submit(client, steps, seed)
    assert response.status_code == 201, (response.status_code, response.get_json())
    return str(response.get_json()["id"])


def _job(client: FlaskClient, job_id: str) -> dict[str, Any]:
    """The job as the API shows it (the database must be up)."""
    response = client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200, (response.status_code, response.get_data(as_text=True))
    return dict(response.get_json())


def _outputs(settings: Settings, job_id: str) -> list[str]:
    """The names of a job's stored videos, each claim's token shown as ``<token>``."""
    keys = FileStore(settings.storage_dir).list_keys(f"{job_id}/video.")
    return [re.sub(r"\.[0-9a-f]{32}\.", ".<token>.", key.split("/")[1]) for key in keys]


def _attempts(job: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """Each attempt of a job as (worker, outcome, error class)."""
    return [(a["worker"], a["outcome"], a["error_class"]) for a in job["attempts"]]


@pytest.fixture
def broker_farm(
    tmp_path: Path, tiny_model_dir: Path, restartable_broker: PrivateRedis | LocalRabbit
) -> Iterator[tuple[Settings, Flask, Workers]]:
    """The web app and workers on a fresh PostgreSQL schema and the test's broker."""
    from web import create_app

    with fresh_database("postgresql", tmp_path) as url:
        settings = make_settings(
            tmp_path / "var",
            url,
            tiny_model_dir,
            SVDFARM_BROKER_URL=restartable_broker.url,
            **WORKER_ENV,
        )
        upgrade(settings.database_url)
        app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
        workers = Workers(settings, tmp_path)
        try:
            yield settings, app, workers
        finally:
            workers.close()
            app.extensions["svdfarm.db"].dispose()


@pytest.mark.serial  # restarts the local RabbitMQ node every RabbitMQ test shares
def test_broker_restart_loses_no_job_and_workers_reconnect(
    broker_farm: tuple[Settings, Flask, Workers], restartable_broker: PrivateRedis | LocalRabbit
) -> None:
    """The broker restarts (Redis empty; RabbitMQ with its durable queues), after 8 s, while
    jobs are queued and two render; one more job is submitted while it is down. Every job
    succeeds with exactly one video, and the same worker processes are still there, connected
    again."""
    settings, app, workers = broker_farm
    broker = restartable_broker
    client = app.test_client()
    started = [workers.start("r1"), workers.start("r2")]
    workers.wait_registered()
    # Two longer jobs, one for each worker, are rendering when Redis goes; four short ones wait.
    job_ids = [_created(client, steps=LONG_STEPS, seed=i) for i in range(2)]
    job_ids += [_created(client, steps=SHORT_STEPS, seed=i) for i in range(2, 6)]
    wait_until(
        lambda: any(_job(client, j)["phase"] == "denoising" for j in job_ids),
        "a job to be denoising",
        120,
        workers.logs,
    )
    before = {j: _job(client, j)["state"] for j in job_ids}

    broker.stop()
    down_at = time.monotonic()
    submit_started = time.monotonic()
    response = _submit(client, steps=SHORT_STEPS, seed=99)
    submit_s = time.monotonic() - submit_started
    assert response.status_code == 201, (response.status_code, response.get_json())
    assert response.get_json()["state"] == "queued"
    job_ids.append(str(response.get_json()["id"]))
    time.sleep(max(0.0, REDIS_OUTAGE_S - (time.monotonic() - down_at)))
    broker.start()
    outage_s = time.monotonic() - down_at

    def finished() -> bool:
        """True once every job is terminal."""
        return all(_job(client, j)["state"] in TERMINAL for j in job_ids)

    def details() -> str:
        """The jobs' states and the workers' logs."""
        states = {j: (_job(client, j)["state"], _job(client, j)["phase"]) for j in job_ids}
        return f"jobs: {states}\n{workers.logs()}"

    drain_s = wait_until(finished, "every job to end after the broker restart", 150, details)
    jobs = {j: _job(client, j) for j in job_ids}
    print(
        f"\n{type(broker).__name__} restart: states before {sorted(before.values())}; "
        f"outage {outage_s:.1f} s; "
        f"submit while down took {submit_s:.2f} s; all {len(jobs)} jobs ended "
        f"{drain_s:.1f} s after the broker was back"
    )
    for j, job in jobs.items():
        print(f"  {j}: {job['state']} attempts {_attempts(job)}")
    failed = {
        j: (job["state"], job["error"]) for j, job in jobs.items() if job["state"] != "succeeded"
    }
    assert not failed, f"{failed}\n{workers.logs()}"
    for j in job_ids:
        assert _outputs(settings, j) == ["video.<token>.mp4"], (j, _outputs(settings, j))
    lost = {j: _attempts(job) for j, job in jobs.items() if len(job["attempts"]) != 1}
    assert not lost, f"jobs rendered more than once: {lost}\n{workers.logs()}"

    # The same processes, still running, answer on the restarted broker.
    for worker in started:
        assert worker.process.poll() is None, f"{worker.hostname} exited\n{worker.text(None)}"
    # Addressed to them: the ping returns once both have answered (a broadcast waits out its
    # whole timeout for workers that might exist).
    hostnames = [w.hostname for w in started]
    replies = app.extensions["celery"].control.ping(destination=hostnames, timeout=5)
    answered = {name for reply in replies for name in reply}
    assert answered >= {w.hostname for w in started}, (replies, workers.logs())


def _during_outage(client: FlaskClient, job_id: str) -> dict[str, Any]:
    """The requests a user makes, by name, while the database is down."""
    return {
        "GET /api/v1/jobs/<id>": client.get(f"/api/v1/jobs/{job_id}"),
        "GET /jobs/<id>": client.get(f"/jobs/{job_id}"),
        "GET /?again=<id>": client.get(f"/?again={job_id}"),
        "POST /api/v1/jobs": _submit(client, steps=1, seed=7),
    }


@pytest.mark.redis
@needs_redis
def test_postgres_restart_answers_503_and_keeps_the_video(
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    tmp_path: Path,
    tiny_model_dir: Path,
) -> None:
    """PostgreSQL stops mid-render and stays down until the worker is retrying its final
    write: the web answers 503 with Retry-After, never 500; once it is back the same app
    answers again by itself and the job succeeds with its video, rendered once."""
    from web import create_app

    settings = make_settings(
        tmp_path / "var",
        private_postgres.url,
        tiny_model_dir,
        SVDFARM_BROKER_URL=private_redis.url,
        **WORKER_ENV,
    )
    upgrade(settings.database_url)
    app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
    client = app.test_client()
    workers = Workers(settings, tmp_path)
    try:
        worker = workers.start("pg")
        workers.wait_registered()
        job_id = _created(client, steps=PG_STEPS)
        wait_until(
            lambda: _job(client, job_id)["phase"] == "denoising", "denoising", 120, workers.logs
        )

        private_postgres.stop()
        down_at = time.monotonic()
        during = _during_outage(client, job_id)
        during["GET /healthz"] = client.get("/healthz")
        during["GET /"] = client.get("/")
        for name, response in during.items():
            print(f"\n  while down: {name} -> {response.status_code}", end="")
        print()
        for name in ("GET /api/v1/jobs/<id>", "GET /jobs/<id>", "GET /?again=<id>"):
            response = during[name]
            assert response.status_code == 503, (name, response.status_code)
            assert response.headers.get("Retry-After"), (name, dict(response.headers))
        posted = during["POST /api/v1/jobs"]
        assert posted.status_code == 503, posted.get_data(as_text=True)
        assert posted.headers.get("Retry-After")
        assert "error" in posted.get_json()
        assert during["GET /healthz"].status_code == 503
        assert during["GET /"].status_code == 200  # the bare form needs no database

        # Down until the worker has finished rendering and has been retrying its final
        # writes ("recording how attempt 1 ended: ..." / "recording how it ended: ...") for
        # a few seconds, and at least OUTAGE_S in all.
        final_write = "ended: database unavailable"
        wait_until(
            lambda: final_write in worker.text(None),
            "the worker to retry its final status write",
            120,
            workers.logs,
        )
        retrying_since = time.monotonic()
        time.sleep(max(OUTAGE_S - (retrying_since - down_at), FINAL_RETRY_S))
        starting_at = time.monotonic()
        private_postgres.start()
        up_at = time.monotonic()
        outage_s = up_at - down_at

        def answers() -> bool:
            """True once the API reads the job again."""
            return client.get(f"/api/v1/jobs/{job_id}").status_code == 200

        web_back_s = wait_until(answers, "the web to answer again", 30, workers.logs)
        after = _during_outage(client, job_id)
        for name, response in after.items():
            assert response.status_code in (200, 201), (name, response.status_code)
        second_id = str(after["POST /api/v1/jobs"].get_json()["id"])

        done_s = wait_until(
            lambda: _job(client, job_id)["state"] in TERMINAL, "the job to end", 90, workers.logs
        )
        job = _job(client, job_id)
        print(
            f"PostgreSQL restart: outage {outage_s:.1f} s (pg_ctl start took "
            f"{up_at - starting_at:.2f} s); the web answered 200 again {web_back_s:.2f} s "
            f"after PostgreSQL was up; the job ended {done_s:.1f} s later; "
            f"attempts {_attempts(job)}"
        )
        assert job["state"] == "succeeded", (job, workers.logs())
        assert _attempts(job) == [(worker.hostname, "succeeded", None)], (
            f"the video finished during the outage was not kept: {_attempts(job)}\n{workers.logs()}"
        )
        assert job["attempts"][0]["finished_at"] and job["attempts"][0]["duration_s"], job
        assert _outputs(settings, job_id) == ["video.<token>.mp4"]
        [key] = FileStore(settings.storage_dir).list_keys(f"{job_id}/video.")
        video = probe_video(FileStore(settings.storage_dir).path(key))
        assert (video["frames"], video["width"], video["height"]) == (8, 64, 64), video
        assert video["codec"] == "h264" and video["pix_fmt"] == "yuv420p", video

        # The farm goes on: the job submitted after the restart is rendered too.
        wait_until(
            lambda: _job(client, second_id)["state"] in TERMINAL, "the second job", 90, workers.logs
        )
        assert _job(client, second_id)["state"] == "succeeded", workers.logs()
        assert worker.process.poll() is None, worker.text(None)
    finally:
        workers.close()
        app.extensions["svdfarm.db"].dispose()
