"""Routing through the API: the queue and memory estimate a job is stored with, the broker
queue its id is sent to, refusing jobs no worker class could run, and why a job waits.

Live workers are worker rows with a fresh heartbeat, inserted directly; no worker runs here.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from svdfarm.catalog import SVD_XT as SVD_XT_SHAPE
from svdfarm.celery_app import direct_queue
from svdfarm.models import Job
from svdfarm.queues import estimate_memory_bytes, route
from svdfarm.settings import Settings
from svdfarm.states import JobState
from tests.conftest import DATABASES
from tests.factories import png_bytes
from tests.http import form_token
from tests.rows import CPU_QUEUES, add_worker, job_count, load_job, wait_until
from web import create_app

GB = 1_000_000_000
T4_QUEUES = [f"svd.cuda.{p}.{t}g.tiny" for p in ("fp16", "fp32") for t in (8, 12, 16)]
RTX4090_QUEUES = [
    f"svd.cuda.{p}.{t}g.tiny" for p in ("bf16", "fp16", "fp32") for t in (8, 12, 16, 24)
]
M2_QUEUES = [f"svd.mps.{p}.{t}g.tiny" for p in ("bf16", "fp16", "fp32") for t in (8, 12)]
T4 = {"device": "cuda", "name": "Tesla T4"}
# SVD-XT's defaults at 1024 x 576 (15.2 GB at fp16: over a 16 GB card's 14.4 GB, the 24 GB tier)
# and the same with a 4-frame decode chunk (11.6 GB at fp16: the 16 GB tier, a T4 takes it).
SVD_XT = {"num_frames": "25", "width": "1024", "height": "576"}
SVD_XT_CHUNK4 = {**SVD_XT, "decode_chunk_size": "4"}
MESSAGE_NAME = re.compile(r"\d+_[0-9a-f-]{36}\.(?P<queue>.+)\.msg")


def post_job(client: FlaskClient, **fields: str) -> Any:
    """POST a job with a small PNG (96 x 64: the tiny model renders it at 64 x 64)."""
    form: dict[str, Any] = {"image": (io.BytesIO(png_bytes(96, 64)), "in.png"), **fields}
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")


def submit(client: FlaskClient, **fields: str) -> str:
    """Submit a job that must be accepted; returns its id."""
    response = post_job(client, **fields)
    assert response.status_code == 201, response.get_json()
    job_id: str = response.get_json()["id"]
    return job_id


def messages(settings: Settings) -> dict[str, str]:
    """The embedded broker's queued messages: the job id each carries -> its queue's name.

    Checks that the file name's queue and the message's routing key agree.
    """
    found: dict[str, str] = {}
    folder = settings.broker_dir / "queue"
    for path in sorted(folder.iterdir()) if folder.exists() else []:
        name = MESSAGE_NAME.fullmatch(path.name)
        assert name, f"unexpected broker file {path.name}"
        message = json.loads(path.read_bytes())
        assert message["properties"]["delivery_info"]["routing_key"] == name["queue"]
        args = json.loads(base64.b64decode(message["body"]))[0]
        found[args[0]] = name["queue"]
    return found


def status(client: FlaskClient, job_id: str) -> dict[str, Any]:
    """``GET /api/v1/jobs/<id>``."""
    response = client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200
    body: dict[str, Any] = response.get_json()
    return body


@pytest.fixture(autouse=True)
def _svd_xt_sized(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the tiny model's jobs with SVD-XT's figures, as a farm of SVD-XT would: the tiny
    model's own (svdfarm.catalog) fit every job in the smallest tier."""
    monkeypatch.setattr("svdfarm.jobs.model_shape", lambda *_: SVD_XT_SHAPE)
    monkeypatch.setattr("svdfarm.actions.model_shape", lambda *_: SVD_XT_SHAPE)


@pytest.fixture
def gpu_only(settings: Settings) -> Iterator[tuple[Flask, FlaskClient]]:
    """An app whose farm does not allow the CPU (``SVDFARM_ALLOW_CPU=0``), and its client."""
    overridden = settings.with_overrides(allow_cpu=False)
    app = create_app({"SVDFARM_SETTINGS": overridden, "TESTING": True})
    yield app, app.test_client()
    app.extensions["svdfarm.db"].dispose()


# ---- where a job goes ----------------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_is_stored_with_its_route_and_sent_to_that_queue(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """Nobody online, CPU allowed: the job's row has the CPU queue and estimate; the id is
    on that queue and no other."""
    job_id = submit(client)
    job = load_job(app, job_id)
    expected = route(8, 64, 64, 8, "auto", allow_cpu=True, model_key="tiny")
    assert job.queue == expected.queue == "svd.cpu.fp32.12g.tiny"
    assert job.memory_estimate_bytes == estimate_memory_bytes(8, 64, 64, 8, "fp32")
    assert messages(settings) == {job_id: "svd.cpu.fp32.12g.tiny"}

    body = status(client, job_id)
    assert body["queue"] == "svd.cpu.fp32.12g.tiny"
    assert body["memory_estimate_bytes"] == job.memory_estimate_bytes


def test_the_route_follows_the_parameters(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """A larger job gets a larger estimate and tier: SVD-XT's defaults (21.3 GB in fp32, within
    a 24 GB box's 21.6) need the 24 GB CPU."""
    small = submit(client)
    large = submit(client, **SVD_XT, decode_chunk_size="8")
    job = load_job(app, large)
    assert job.queue == "svd.cpu.fp32.24g.tiny"
    assert job.memory_estimate_bytes == estimate_memory_bytes(25, 1024, 576, 8, "fp32")
    assert job.memory_estimate_bytes > load_job(app, small).memory_estimate_bytes
    assert messages(settings) == {small: "svd.cpu.fp32.12g.tiny", large: "svd.cpu.fp32.24g.tiny"}


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_live_gpu_worker_gets_the_job(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """With a fresh T4 row online, auto jobs go to the smallest fp16 GPU tier whose smallest
    card holds them when the T4 consumes it; SVD-XT's defaults need the 24 GB tier, which the
    T4 does not consume, so (CPU allowed) they go to the CPU."""
    add_worker(
        app.extensions["svdfarm.db"], "t4@gpu-1", T4_QUEUES, heartbeat_age_s=2, capabilities=T4
    )
    small = submit(client)
    chunk4 = submit(client, **SVD_XT_CHUNK4)
    svd_xt = submit(client, **SVD_XT)
    assert load_job(app, small).queue == "svd.cuda.fp16.8g.tiny"
    assert load_job(app, small).memory_estimate_bytes == estimate_memory_bytes(8, 64, 64, 8, "fp16")
    assert load_job(app, chunk4).queue == "svd.cuda.fp16.16g.tiny"
    assert load_job(app, chunk4).memory_estimate_bytes == estimate_memory_bytes(
        25, 1024, 576, 4, "fp16"
    )
    assert load_job(app, svd_xt).queue == "svd.cpu.fp32.24g.tiny"
    # The first to the idle T4 itself (its own queue); the next, beyond it, on its queue.
    assert messages(settings) == {
        small: direct_queue("t4@gpu-1"),
        chunk4: "svd.cuda.fp16.16g.tiny",
        svd_xt: "svd.cpu.fp32.24g.tiny",
    }


def test_a_live_24_gb_worker_gets_svd_xt_defaults(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """With a 24 GB card online (RTX 4090 queues), SVD-XT's defaults go to its fp16 24 GB
    queue, and bf16 to the 16 GB one."""
    add_worker(app.extensions["svdfarm.db"], "4090@gpu-2", RTX4090_QUEUES, heartbeat_age_s=1)
    auto = submit(client, **SVD_XT)
    bf16 = submit(client, **SVD_XT, precision="bf16")
    assert load_job(app, auto).queue == "svd.cuda.fp16.24g.tiny"
    assert load_job(app, auto).memory_estimate_bytes == estimate_memory_bytes(
        25, 1024, 576, 8, "fp16"
    )
    assert load_job(app, bf16).queue == "svd.cuda.bf16.16g.tiny"
    assert messages(settings) == {auto: direct_queue("4090@gpu-2"), bf16: "svd.cuda.bf16.16g.tiny"}


def test_a_gpu_worker_that_missed_its_beats_gets_nothing(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """A T4 row whose heartbeat is older than three intervals is ignored: the CPU takes it."""
    add_worker(
        app.extensions["svdfarm.db"],
        "t4@gpu-1",
        T4_QUEUES,
        settings.offline_after_s + 5,
        capabilities=T4,
    )
    job_id = submit(client)
    assert load_job(app, job_id).queue == "svd.cpu.fp32.12g.tiny"
    assert messages(settings) == {job_id: "svd.cpu.fp32.12g.tiny"}


def test_a_gpu_worker_without_the_class_does_not_take_it(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """A bf16 job is not sent to a T4 (no bf16 there); with the CPU allowed, it goes there."""
    add_worker(
        app.extensions["svdfarm.db"], "t4@gpu-1", T4_QUEUES, heartbeat_age_s=1, capabilities=T4
    )
    job_id = submit(client, precision="bf16")
    assert load_job(app, job_id).queue == "svd.cpu.fp32.12g.tiny"


def test_without_cpu_a_job_waits_on_the_smallest_gpu_tier(
    gpu_only: tuple[Flask, FlaskClient], settings: Settings
) -> None:
    """CPU not allowed and nobody online: the smallest fitting GPU queue, where it waits."""
    app, client = gpu_only
    auto = submit(client)
    bf16 = submit(client, precision="bf16", **SVD_XT)
    svd_xt = submit(client, **SVD_XT)
    assert load_job(app, auto).queue == "svd.cuda.fp16.8g.tiny"
    assert load_job(app, bf16).queue == "svd.cuda.bf16.16g.tiny"
    assert load_job(app, svd_xt).queue == "svd.cuda.fp16.24g.tiny"
    assert messages(settings) == {
        auto: "svd.cuda.fp16.8g.tiny",
        bf16: "svd.cuda.bf16.16g.tiny",
        svd_xt: "svd.cuda.fp16.24g.tiny",
    }


def test_a_live_mac_gets_the_jobs_its_tier_holds(
    gpu_only: tuple[Flask, FlaskClient], settings: Settings
) -> None:
    """CPU not allowed, only a Mac (mps, 12 GB tier) online: a small job goes to its mps queue;
    SVD-XT's defaults do not fit its tier and wait on the CUDA class."""
    app, client = gpu_only
    m2 = {"device": "mps", "name": "Apple M2"}
    add_worker(
        app.extensions["svdfarm.db"], "m2@mac-1", M2_QUEUES, heartbeat_age_s=1, capabilities=m2
    )
    small = submit(client)
    svd_xt = submit(client, **SVD_XT)
    assert load_job(app, small).queue == "svd.mps.fp16.8g.tiny"
    assert load_job(app, svd_xt).queue == "svd.cuda.fp16.24g.tiny"
    assert messages(settings) == {small: direct_queue("m2@mac-1"), svd_xt: "svd.cuda.fp16.24g.tiny"}
    assert status(client, small)["waiting"] == (
        "waiting: in queue svd.mps.fp16.8g.tiny; 1 worker(s) can take it, 0 busy"
    )
    assert status(client, svd_xt)["waiting"] == (
        "waiting: no worker online that can take it "
        "(a cuda worker with fp16 and >= 24 GB that has the model tiny is needed)"
    )


# ---- jobs no class could run ---------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_job_too_big_for_any_class_is_refused(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """128 frames at 2048 x 2048 in fp32 with a 64-frame decode chunk: 400 with the reason
    under "job", and no row, no file, no message."""
    need = estimate_memory_bytes(128, 2048, 2048, 64, "fp32")
    assert need > 141 * GB
    response = post_job(
        client,
        num_frames="128",
        width="2048",
        height="2048",
        precision="fp32",
        decode_chunk_size="64",
        num_inference_steps="1",
    )
    assert response.status_code == 400
    body = response.get_json()
    assert set(body["fields"]) == {"job"}
    message = body["fields"]["job"]
    assert f"about {need / GB:.0f} GB" in message
    assert "141 GB" in message
    assert body["error"] == message
    assert job_count(app) == 0
    assert list(settings.storage_dir.rglob("*")) == []
    assert messages(settings) == {}


def test_the_refusal_holds_even_with_workers_online(app: Flask, client: FlaskClient) -> None:
    """Live workers change where a job goes, never whether an impossible job is accepted."""
    add_worker(
        app.extensions["svdfarm.db"], "t4@gpu-1", T4_QUEUES, heartbeat_age_s=1, capabilities=T4
    )
    response = post_job(
        client, num_frames="128", width="2048", height="2048", decode_chunk_size="64"
    )
    assert response.status_code == 400
    assert "job" in response.get_json()["fields"]
    assert job_count(app) == 0


def test_the_form_shows_the_refusal(app: Flask, client: FlaskClient, settings: Settings) -> None:
    """The same reason is on the form (status 400), and nothing is queued."""
    form: dict[str, Any] = {
        "image": (io.BytesIO(png_bytes(96, 64)), "in.png"),
        "num_frames": "128",
        "width": "2048",
        "height": "2048",
        "precision": "fp32",
        "decode_chunk_size": "64",
    }
    form["csrf_token"] = form_token(client)
    response = client.post("/", data=form, content_type="multipart/form-data")
    assert response.status_code == 400
    assert "the largest worker class (141 GB cards) holds about 127 GB" in html.unescape(
        response.get_data(as_text=True)
    )
    assert job_count(app) == 0 and messages(settings) == {}


# ---- why a job waits -----------------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_waiting_says_no_worker_can_take_it(client: FlaskClient) -> None:
    """Nobody online: ``waiting`` (and ``phase_text``) name the class the job needs."""
    job_id = submit(client)
    body = status(client, job_id)
    expected = (
        "waiting: no worker online that can take it "
        "(a cpu worker with fp32 and >= 12 GB that has the model tiny is needed)"
    )
    assert body["state"] == "queued"
    assert body["waiting"] == expected
    assert body["phase_text"] == expected


def test_waiting_names_the_queue_and_its_workers(app: Flask, client: FlaskClient) -> None:
    """With a live consumer, each job says its queue and who could take it (its place in line
    is the dispatcher's: svdfarm.dispatch.place_of)."""
    add_worker(
        app.extensions["svdfarm.db"], "t4@gpu-1", T4_QUEUES, heartbeat_age_s=1, capabilities=T4
    )
    first, second = submit(client), submit(client)
    other = submit(client, **SVD_XT_CHUNK4)  # another queue the T4 consumes
    assert status(client, first)["waiting"] == (
        "waiting: in queue svd.cuda.fp16.8g.tiny; 1 worker(s) can take it, 0 busy"
    )
    assert status(client, second)["waiting"] == (
        "waiting: in queue svd.cuda.fp16.8g.tiny; 1 worker(s) can take it, 0 busy"
    )
    assert status(client, other)["waiting"] == (
        "waiting: in queue svd.cuda.fp16.16g.tiny; 1 worker(s) can take it, 0 busy"
    )


def test_a_running_job_is_not_waiting(app: Flask, client: FlaskClient) -> None:
    """Once running, ``waiting`` is null and ``phase_text`` is the phase again."""
    job_id = submit(client)
    with app.extensions["svdfarm.db"].begin() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.state, job.phase, job.step = JobState.RUNNING, "denoising", 2
    body = status(client, job_id)
    assert body["waiting"] is None
    assert body["phase_text"] == "Denoising (step 2/4)"
    assert body["queue"] == "svd.cpu.fp32.12g.tiny"  # still says where it went


def test_the_status_page_shows_why_it_waits(app: Flask, client: FlaskClient) -> None:
    """The job's page shows the waiting reason where the phase goes."""
    job_id = submit(client)
    page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 200
    text = html.unescape(page.get_data(as_text=True))
    assert '<span id="phase">Waiting in the queue</span>' in text
    assert (
        '<p id="waiting">No worker online that can take it '
        "(a cpu worker with fp32 and >= 12 GB that has the model tiny is needed).</p>"
    ) in text

    add_worker(app.extensions["svdfarm.db"], "cpu@box-1", CPU_QUEUES, heartbeat_age_s=1)

    def shows_the_worker() -> bool:
        """True once the page counts the new worker (within a second: web.recent_workers)."""
        text = html.unescape(client.get(f"/jobs/{job_id}").get_data(as_text=True))
        return "In queue svd.cpu.fp32.12g.tiny; 1 worker(s) can take it" in text

    wait_until(shows_the_worker, "the page to count the new worker", 5)


def test_the_status_page_of_a_gpu_only_farm(gpu_only: tuple[Flask, FlaskClient]) -> None:
    """Without CPU and without GPUs, the page names the GPU class the job waits for."""
    _, client = gpu_only
    job_id = submit(client)
    text = html.unescape(client.get(f"/jobs/{job_id}").get_data(as_text=True))
    assert "(a cuda worker with fp16 and >= 8 GB that has the model tiny is needed)" in text
