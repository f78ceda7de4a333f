"""Two real workers with different capability profiles on PostgreSQL, and Redis or RabbitMQ:
jobs routed by size to the worker that can hold them, ``svdfarm queues`` (the jobs waiting and
the broker's messages), the registry's heartbeats and offline detection, and the standard
Celery command line (inspect, control) run as real subprocesses.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from svdfarm.catalog import SVD_XT
from svdfarm.db import Database, upgrade
from svdfarm.models import Worker
from svdfarm.queues import estimate_memory_bytes, parse_queue, tier_of
from svdfarm.registry import effective_state
from svdfarm.settings import Settings
from svdfarm.states import WorkerState
from tests.conftest import BROKERS, fresh_database, make_settings, needs_postgres, private_broker
from tests.factories import png_bytes
from tests.processes import LiveProcess, start_worker, stop_all, worker_env
from tests.rows import wait_for_worker, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres, needs_postgres]

REDIS = next(p for p in BROKERS if p.id == "redis")

SMALL_GB, LARGE_GB = 13, 19  # tiers 12 and 16
HEARTBEAT = 0.5


@dataclass
class Farm:
    """The web app and two live workers on one database and one Redis."""

    settings: Settings
    app: Flask
    client: FlaskClient
    db: Database
    env: dict[str, str]
    small: LiveProcess
    large: LiveProcess
    folder: Path
    #: Every worker process started for the farm, stopped at its end.
    started: list[LiveProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        """The first two workers count as started."""
        self.started += [self.small, self.large]

    def wait_registered(self) -> None:
        """Until both workers are in the registry."""
        for worker in (self.small, self.large):
            wait_for_worker(self.db, worker.hostname, worker.process, worker.text)

    def revive(self) -> None:
        """Start a new worker of the same size for each that has exited; wait until both are
        registered."""
        if self.small.process.poll() is not None:
            self.small = _start(self.settings, "small", SMALL_GB, self.folder)
            self.started.append(self.small)
        if self.large.process.poll() is not None:
            self.large = _start(self.settings, "large", LARGE_GB, self.folder)
            self.started.append(self.large)
        self.wait_registered()

    def row(self, hostname: str) -> Worker | None:
        """The registry row of a worker."""
        with self.db.session() as session:
            return session.get(Worker, hostname)

    def celery(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``celery -A svdfarm ...`` as the operator would."""
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "svdfarm", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


#: The worker settings of this test (also in the environment of the commands it runs).
WORKER_ENV = {
    "SVDFARM_HEARTBEAT_INTERVAL": str(HEARTBEAT),
    "SVDFARM_PROGRESS_INTERVAL": "0.2",
    "SVDFARM_STOP_TIMEOUT": "60",
}


def _start(settings: Settings, name: str, memory_gb: int, tmp_path: Path) -> LiveProcess:
    """Start ``svdfarm worker`` pinned by the probe override to ``memory_gb`` of RAM."""
    override = json.dumps({"total_memory_bytes": memory_gb * 1_000_000_000})
    return start_worker(
        settings, tmp_path, name, cwd=tmp_path, **WORKER_ENV, SVDFARM_CAPABILITIES=override
    )


@pytest.fixture(scope="module", params=BROKERS)
def live_farm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Farm]:
    """The web app and two workers (12 GB and 16 GB tiers) on PostgreSQL and a broker of their
    own (each kind in turn), started once for the module's tests on that broker: each test
    gets them through :func:`farm`, which restarts a worker an earlier test stopped."""
    folder = tmp_path_factory.mktemp(f"farm-{request.param}")
    with fresh_database("postgresql", folder) as url, private_broker(request.param) as broker:
        settings = make_settings(
            folder / "var",
            url,
            tiny_model_dir,
            SVDFARM_BROKER_URL=broker,
            SVDFARM_HEARTBEAT_INTERVAL=str(HEARTBEAT),
            SVDFARM_STOP_TIMEOUT="60",
        )
        upgrade(settings.database_url)
        from web import create_app

        app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
        env = worker_env(settings, **WORKER_ENV)
        db: Database = app.extensions["svdfarm.db"]
        small = _start(settings, "small", SMALL_GB, folder)
        large = _start(settings, "large", LARGE_GB, folder)
        farm = Farm(settings, app, app.test_client(), db, env, small, large, folder)
        try:
            farm.wait_registered()
            yield farm
        finally:
            stop_all(farm.started, 60)  # side by side
            db.dispose()


@pytest.fixture
def farm(live_farm: Farm) -> Farm:
    """The module's farm for one test, both workers running and registered: one that an
    earlier test shut down or killed is replaced by a new process (a new hostname)."""
    live_farm.revive()
    return live_farm


def _submit(client: FlaskClient, **fields: str) -> str:
    """Submit a job through the API; returns its id."""
    response = client.post(
        "/api/v1/jobs",
        data={
            "image": (io.BytesIO(png_bytes(64, 64)), "in.png"),
            "num_inference_steps": "1",
            "seed": "1",
            **fields,
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["id"])


def _wait(client: FlaskClient, job_id: str, states: tuple[str, ...], timeout: float = 300) -> dict:
    """Poll the API until the job is in one of ``states``."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/api/v1/jobs/{job_id}").get_json()
        if body["state"] in states:
            return dict(body)
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def test_jobs_go_to_the_worker_that_can_hold_them(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 16 GB-class job runs on the 16 GB worker; a 12 GB one on a worker serving 12 GB;
    a 40 GB-class job waits and says why (routed with SVD-XT's figures: the tiny model's own
    fit every job in the smallest tier)."""
    monkeypatch.setattr("svdfarm.jobs.model_shape", lambda *_: SVD_XT)
    small_row, large_row = farm.row(farm.small.hostname), farm.row(farm.large.hostname)
    assert small_row is not None and large_row is not None
    assert max(parse_queue(q).tier_gb for q in small_row.queues) == tier_of(SMALL_GB * 10**9)
    assert max(parse_queue(q).tier_gb for q in large_row.queues) == tier_of(LARGE_GB * 10**9)
    assert small_row.capabilities["total_memory_bytes"] == SMALL_GB * 10**9

    # 48 frames of 128x64 decoded in one chunk: more than a 12 GB-class card holds (90% of
    # 12 GB) by the estimate, so the 16 GB class.
    big = dict(num_frames="48", width="128", height="64", decode_chunk_size="48")
    assert 12e9 * 0.9 + 0.3e9 < estimate_memory_bytes(48, 128, 64, 48, "fp32") <= 16e9 * 0.9
    big_id = _submit(farm.client, **big)
    small_id = _submit(farm.client, num_frames="4", width="64", height="64")
    huge_id = _submit(farm.client, num_frames="25", width="1024", height="1024")

    huge = farm.client.get(f"/api/v1/jobs/{huge_id}").get_json()
    assert huge["queue"] == "svd.cpu.fp32.40g.tiny"
    assert huge["waiting"] and ">= 40 GB" in huge["waiting"]
    page = farm.client.get(f"/jobs/{huge_id}").get_data(as_text=True)
    assert "no worker online" in page.lower()

    # The operator's view of the same: the waiting job and who consumes what. Both workers
    # are listed once their heartbeats say so (a beat may lag on a loaded machine).
    both = {farm.small.hostname, farm.large.hostname}
    seen: list[dict[str, dict[str, Any]]] = []

    def operator_view() -> bool:
        shown = subprocess.run(
            [sys.executable, "-m", "cli", "queues", "--json"],
            env=farm.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        view = {row["queue"]: row for row in json.loads(shown.stdout)}
        seen.append(view)
        return set(view["svd.cpu.fp32.12g.tiny"]["workers"]) == both

    wait_until(operator_view, "both workers listed by svdfarm queues", 60)
    rows = seen[-1]
    huge_row = rows["svd.cpu.fp32.40g.tiny"]
    assert huge_row["waiting"] >= 1 and huge_row["workers"] == []
    assert huge_row["messages"] == 1  # the broker's count of its queue
    assert set(rows["svd.cpu.fp32.12g.tiny"]["workers"]) == both
    assert rows["svd.cpu.fp32.16g.tiny"]["workers"] == [farm.large.hostname]

    for job_id, queue, workers in (
        (big_id, "svd.cpu.fp32.16g.tiny", {farm.large.hostname}),
        (small_id, "svd.cpu.fp32.12g.tiny", {farm.small.hostname, farm.large.hostname}),
    ):
        body = _wait(farm.client, job_id, ("succeeded", "failed"))
        assert body["state"] == "succeeded", (body, farm.small.text(None), farm.large.text(None))
        assert body["queue"] == queue
        assert {a["worker"] for a in body["attempts"]} <= workers
    assert farm.client.post(f"/api/v1/jobs/{huge_id}/cancel").status_code == 202


def test_inspect_capabilities_and_control_from_the_celery_command_line(farm: Farm) -> None:
    """``celery inspect capabilities`` lists each live worker's probe; consumers can be changed."""
    # Addressed to both workers, the command returns once both have answered; broadcast to
    # all, it would wait out its whole timeout for workers that might exist.
    both = f"{farm.small.hostname},{farm.large.hostname}"
    done = farm.celery("inspect", "capabilities", "--json", "--timeout", "10", "-d", both)
    assert done.returncode == 0, done.stderr
    replies = json.loads(done.stdout)
    assert set(replies) == {farm.small.hostname, farm.large.hostname}
    small = replies[farm.small.hostname]
    assert small["capabilities"]["device"] == "cpu"
    assert small["capabilities"]["total_memory_bytes"] == SMALL_GB * 10**9
    assert "svd.cpu.fp32.12g.tiny" in small["queues"]
    assert "svd.cpu.fp32.16g.tiny" not in small["queues"]
    # The models it serves: its SVDFARM_MODEL (tiny), and the catalog's that this machine has
    # downloaded, if any; its registry row says the same.
    assert small["models"][0] == "tiny"
    row = farm.row(farm.small.hostname)
    assert row is not None and row.capabilities["models"] == small["models"]
    print("\ninspect capabilities:", json.dumps(small, indent=1)[:1500])

    done = farm.celery(
        "control", "cancel_consumer", "svd.cpu.fp32.12g.tiny", "-d", farm.small.hostname, "--json"
    )
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while "svd.cpu.fp32.12g.tiny" in (farm.row(farm.small.hostname) or Worker()).queues:
        assert time.monotonic() < deadline, "the heartbeat never reported the cancelled queue"
        time.sleep(HEARTBEAT)
    done = farm.celery(
        "control", "add_consumer", "svd.cpu.fp32.12g.tiny", "-d", farm.small.hostname, "--json"
    )
    assert done.returncode == 0, done.stderr
    active = farm.celery("inspect", "active", "--json", "--timeout", "10", "-d", both)
    assert active.returncode == 0 and farm.large.hostname in json.loads(active.stdout)

    # A worker told to shut down does not reply, so the command reports no replies: the
    # process ending is the answer.
    farm.celery("control", "shutdown", "-d", farm.large.hostname)
    farm.large.process.wait(timeout=60)
    row = farm.row(farm.large.hostname)
    assert row is not None and row.state is WorkerState.OFFLINE


@pytest.mark.parametrize("live_farm", [REDIS], indirect=True)  # the database's, on any broker
def test_heartbeats_and_offline_detection(farm: Farm) -> None:
    """Heartbeats advance; a killed worker is offline after three missed beats."""
    first = farm.row(farm.small.hostname)
    assert first is not None
    time.sleep(HEARTBEAT * 3)
    later = farm.row(farm.small.hostname)
    assert later is not None and later.last_heartbeat > first.last_heartbeat
    assert effective_state(later, farm.settings) is not WorkerState.OFFLINE

    farm.small.kill()  # the worker and its pool, at once
    time.sleep(farm.settings.offline_after_s + HEARTBEAT)
    dead = farm.row(farm.small.hostname)
    assert dead is not None and effective_state(dead, farm.settings) is WorkerState.OFFLINE
    alive = farm.row(farm.large.hostname)
    assert alive is not None and effective_state(alive, farm.settings) is not WorkerState.OFFLINE
