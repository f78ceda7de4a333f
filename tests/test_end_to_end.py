"""The farm end to end: a job submitted through the web app, run by a real ``celery worker``
process, polled until it succeeds, and its MP4 checked with ffmpeg.

Once on the embedded setup (SQLite, filesystem broker), and on PostgreSQL with Redis and with
RabbitMQ.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from svdfarm.db import upgrade
from svdfarm.queues import queues_for
from svdfarm.settings import Settings
from tests.conftest import (
    fresh_database,
    make_settings,
    needs_amqp,
    needs_postgres,
    needs_redis,
    private_broker,
)
from tests.factories import png_bytes
from tests.media import probe_video
from tests.rows import wait_for_worker

pytestmark = pytest.mark.slow

SETUPS = [
    pytest.param(("sqlite", "filesystem"), id="sqlite-filesystem"),
    pytest.param(
        ("postgresql", "redis"),
        id="postgresql-redis",
        marks=[pytest.mark.postgres, pytest.mark.redis, needs_postgres, needs_redis],
    ),
    pytest.param(
        ("postgresql", "rabbitmq"),
        id="postgresql-rabbitmq",
        marks=[pytest.mark.postgres, pytest.mark.amqp, needs_postgres, needs_amqp],
    ),
]


@dataclass
class Farm:
    """A running worker process and a web app that share one database and broker."""

    settings: Settings
    app: Flask
    client: FlaskClient
    worker: subprocess.Popen[bytes]
    hostname: str
    log_path: Path

    def log(self) -> str:
        """What the worker has printed so far."""
        return self.log_path.read_text(errors="replace")


def cpu_queues() -> list[str]:
    """The queues this machine's CPU serves for the tiny model, from the real probe."""
    from worker.probe import probe

    return queues_for(probe().as_dict(), ["tiny"])


@pytest.fixture
def farm(request: pytest.FixtureRequest, tmp_path: Path, tiny_model_dir: Path) -> Iterator[Farm]:
    """Start a real worker process against this test's database and broker."""
    db_kind, broker_kind = request.param
    broker = nullcontext("") if broker_kind == "filesystem" else private_broker(broker_kind)
    with fresh_database(db_kind, tmp_path) as database_url, broker as broker_url:
        yield from _run_farm(tmp_path, tiny_model_dir, database_url, broker_url)


def _run_farm(
    tmp_path: Path, tiny_model_dir: Path, database_url: str, broker_url: str
) -> Iterator[Farm]:
    """Set up the app and a worker process on ``database_url`` and ``broker_url`` (empty: the
    embedded broker)."""
    env = {}
    if broker_url:
        env["SVDFARM_BROKER_URL"] = broker_url
    settings = make_settings(tmp_path / "var", database_url, tiny_model_dir, **env)
    upgrade(settings.database_url)
    from web import create_app

    app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
    hostname = f"e2e-{uuid.uuid4().hex[:8]}@localhost"
    worker_env = {
        **os.environ,
        "SVDFARM_DATA_DIR": str(settings.data_dir),
        "SVDFARM_DATABASE_URL": settings.database_url,
        "SVDFARM_BROKER_URL": settings.broker_url,
        "SVDFARM_MODEL": "tiny",
        "SVDFARM_PROGRESS_INTERVAL": "0.2",
    }
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "svdfarm",
                "worker",
                "--loglevel=INFO",
                "--concurrency=1",
                f"--queues={','.join(cpu_queues())}",
                f"--hostname={hostname}",
            ],
            env=worker_env,
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_worker(
            app.extensions["svdfarm.db"],
            hostname,
            worker,
            lambda: log_path.read_text(errors="replace"),
        )
        yield Farm(settings, app, app.test_client(), worker, hostname, log_path)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        app.extensions["svdfarm.db"].dispose()


def _poll_until_done(client: FlaskClient, job_id: str, timeout_s: float = 180) -> dict:
    """Poll the API until the job ends; returns its last JSON and the progress values seen."""
    deadline = time.monotonic() + timeout_s
    seen: list[float] = []
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/jobs/{job_id}").get_json()
        seen.append(body["progress"])
        if body["state"] in ("succeeded", "failed", "canceled"):
            body["progress_seen"] = seen
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s; last: {body}")


@pytest.mark.parametrize("farm", SETUPS, indirect=True)
def test_job_runs_end_to_end(farm: Farm, tmp_path: Path) -> None:
    """Form -> database -> queue -> worker -> MP4 with the frames and size asked for."""
    started = time.monotonic()
    response = farm.client.post(
        "/api/v1/jobs",
        data={
            "image": (io.BytesIO(png_bytes(160, 96)), "input.png"),
            "num_frames": "6",
            "num_inference_steps": "2",  # progress between steps; each costs seconds on a CPU
            "width": "128",
            "height": "64",
            "seed": "7",
            "decode_chunk_size": "4",
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.get_json()
    job_id = response.get_json()["id"]

    body = _poll_until_done(farm.client, job_id)
    elapsed = time.monotonic() - started
    assert body["state"] == "succeeded", f"{body}\n{farm.log()}"
    print(f"\ntiny job submit -> succeeded: {elapsed:.2f} s ({farm.settings.broker_url})")
    assert body["progress"] == 1.0
    assert body["error"] is None
    assert len(body["attempts"]) == 1
    attempt = body["attempts"][0]
    assert attempt["outcome"] == "succeeded"
    assert attempt["worker"] == farm.hostname
    assert attempt["plan_name"]
    assert attempt["duration_s"] > 0
    assert body["queue"].startswith("svd.cpu.fp32.") and body["queue"] in cpu_queues()

    path = tmp_path / "out.mp4"
    with farm.client.get(body["video_url"]) as video:
        assert video.status_code == 200
        assert video.mimetype == "video/mp4"
        path.write_bytes(video.data)
    info = probe_video(path)
    assert info["frames"] == 6
    assert (info["width"], info["height"]) == (128, 64)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert info["moov_before_mdat"]

    with farm.client.get(body["poster_url"]) as poster:
        assert poster.status_code == 200 and poster.mimetype == "image/png"
    page = farm.client.get(f"/jobs/{job_id}")
    assert b"<video" in page.data and body["video_url"].encode() in page.data
