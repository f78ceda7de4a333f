"""Stopping a worker with SIGTERM, for real: the running job finishes within the stop timeout;
past it, the job goes back to the queue (published again: its first message was acknowledged
when it started) and another worker finishes it, with one output, on Redis and RabbitMQ."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from svdfarm.db import Database, upgrade
from svdfarm.settings import Settings
from svdfarm.storage import FileStore
from tests.conftest import BROKERS, fresh_database, make_settings, needs_postgres, private_broker
from tests.factories import png_bytes
from tests.processes import LiveProcess, start_worker
from tests.rows import wait_for_worker, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres, needs_postgres]

REDIS = next(p for p in BROKERS if p.id == "redis")


class Workers:
    """Start ``svdfarm worker`` processes on one database and broker; stop them at the end."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        """Remember where the workers run."""
        self.settings, self.tmp_path = settings, tmp_path
        self.started: list[LiveProcess] = []

    def start(self, name: str, stop_timeout: int) -> tuple[str, subprocess.Popen[bytes], Path]:
        """A worker that gives a running job ``stop_timeout`` seconds after SIGTERM."""
        worker = start_worker(
            self.settings,
            self.tmp_path,
            name,
            SVDFARM_STOP_TIMEOUT=str(stop_timeout),
            SVDFARM_HEARTBEAT_INTERVAL="0.5",
            SVDFARM_PROGRESS_INTERVAL="0.2",
            SVDFARM_REAP_INTERVAL="1",
        )
        self.started.append(worker)
        return worker.hostname, worker.process, worker.log

    def close(self) -> None:
        """Kill whatever is left."""
        for worker in self.started:
            worker.kill()


@pytest.fixture(params=BROKERS)
def stack(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_model_dir: Path
) -> Iterator[tuple[Settings, FlaskClient, Workers]]:
    """The web app on PostgreSQL and a broker of the test's own, and a way to start workers."""
    with fresh_database("postgresql", tmp_path) as url, private_broker(request.param) as broker:
        settings = make_settings(
            tmp_path / "var",
            url,
            tiny_model_dir,
            SVDFARM_BROKER_URL=broker,
            SVDFARM_HEARTBEAT_INTERVAL="0.5",
        )
        upgrade(settings.database_url)
        from web import create_app

        app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
        workers = Workers(settings, tmp_path)
        try:
            yield settings, app.test_client(), workers
        finally:
            workers.close()
            app.extensions["svdfarm.db"].dispose()


def _submit(client: FlaskClient, steps: int) -> str:
    """A job of ``steps`` denoising steps of 8 frames (the tiny model: 0.3 s a step on a fast
    idle core, about 2 s of CPU on the 2-core CI machine)."""
    response = client.post(
        "/api/v1/jobs",
        data={
            "image": (io.BytesIO(png_bytes(64, 64)), "in.png"),
            "num_frames": "8",
            "num_inference_steps": str(steps),
            "seed": "2",
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["id"])


def _job(client: FlaskClient, job_id: str) -> dict:
    """The job as the API shows it."""
    return dict(client.get(f"/api/v1/jobs/{job_id}").get_json())


def _registered(
    settings: Settings, hostname: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    """Until the worker is in the registry."""
    db = Database(settings.database_url)
    try:
        wait_for_worker(db, hostname, process, lambda: log.read_text(errors="replace"))
    finally:
        db.dispose()


@pytest.mark.parametrize("stack", [REDIS], indirect=True)  # the same on any broker
def test_sigterm_lets_the_running_job_finish(
    stack: tuple[Settings, FlaskClient, Workers],
) -> None:
    """SIGTERM mid-job: the job still succeeds on that worker, then the worker exits."""
    settings, client, workers = stack
    hostname, process, log = workers.start("w", stop_timeout=120)
    _registered(settings, hostname, process, log)
    # 8 steps: seconds of denoising left when the signal comes within its first fraction.
    job_id = _submit(client, steps=8)
    wait_until(lambda: _job(client, job_id)["phase"] == "denoising", "denoising", 180)
    process.send_signal(signal.SIGTERM)
    # It exits once the job is done, well before its 120 s stop timeout.
    assert process.wait(timeout=90) == 0, log.read_text()
    job = _job(client, job_id)
    assert job["state"] == "succeeded", (job, log.read_text())
    assert [a["worker"] for a in job["attempts"]] == [hostname]


def test_past_the_stop_timeout_the_job_is_redelivered_once(
    stack: tuple[Settings, FlaskClient, Workers],
) -> None:
    """SIGTERM with a 2 s stop timeout: the job goes back to the queue, a second worker
    finishes it, and there is exactly one video."""
    settings, client, workers = stack
    first, process, log = workers.start("first", stop_timeout=2)
    _registered(settings, first, process, log)
    # 12 steps (3.6 s on a fast core, far longer on the CI machine): still rendering when the 2 s
    # stop timeout passes, and no longer than needed for the second worker to render again.
    job_id = _submit(client, steps=12)
    wait_until(lambda: _job(client, job_id)["phase"] == "denoising", "denoising", 180)
    process.send_signal(signal.SIGTERM)
    # The stop timeout passes, the job is given back (not failed) and the worker then stops
    # at once (a cold shutdown). The second worker starts as soon as the job is back in the
    # queue, while the first is still exiting; whatever the first does meanwhile would show
    # in the job's end state and attempts, checked below.
    wait_until(
        lambda: _job(client, job_id)["state"] != "running",
        "the job to leave the stopping worker",
        120,
        lambda: log.read_text(errors="replace"),
    )
    handed_back = _job(client, job_id)
    assert handed_back["state"] == "queued", handed_back  # given back, not failed

    second, _, log2 = workers.start("second", stop_timeout=120)
    process.wait(timeout=120)
    wait_until(
        lambda: _job(client, job_id)["state"] in ("succeeded", "failed"), "the redelivered job", 300
    )
    job = _job(client, job_id)
    assert job["state"] == "succeeded", (job, log.read_text(), log2.read_text())
    workers_seen = [a["worker"] for a in job["attempts"]]
    assert workers_seen == [first, second], json.dumps(job["attempts"], indent=1)
    first_attempt = job["attempts"][0]
    assert first_attempt["outcome"] == "failed" and "handed back" in first_attempt["message"]
    assert first_attempt["error_class"] == "other"  # a stop, not a lost worker
    outputs = FileStore(settings.storage_dir).list_keys(f"{job_id}/video.")
    assert len(outputs) == 1 and re.fullmatch(rf"{job_id}/video\.[0-9a-f]{{32}}\.mp4", outputs[0])
