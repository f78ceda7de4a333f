"""A model per job: the API's ``model`` field, the default model, routing to workers that serve
it, and the worker rendering the job's own model."""

from __future__ import annotations

import io
import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from svdfarm.db import Database
from tests.factories import png_bytes
from tests.http import form_token, job_id_from
from tests.rows import CPU_QUEUES, add_worker, load_job

XT = "stabilityai/stable-video-diffusion-img2vid-xt"
GPU_QUEUES = [
    f"svd.cuda.{p}.{t}g.svd-xt" for p in ("bf16", "fp16", "fp32") for t in (8, 12, 16, 24)
]


def post_job(client: FlaskClient, **fields: str) -> Any:
    """POST a job with a small PNG (96 x 64)."""
    form: dict[str, Any] = {"image": (io.BytesIO(png_bytes(96, 64)), "in.png"), **fields}
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")


def test_an_unknown_model_is_refused_listing_the_known_ones(client: FlaskClient) -> None:
    response = post_job(client, model="svd-xl")
    assert response.status_code == 400
    message = response.get_json()["fields"]["model"]
    assert message == "Unknown model 'svd-xl': the known models are svd-xt, svd, tiny."


def test_a_job_renders_the_model_it_names(app: Flask, client: FlaskClient) -> None:
    tiny = post_job(client, model="TINY")
    assert tiny.status_code == 201, tiny.get_json()
    job = load_job(app, tiny.get_json()["id"])
    assert (job.model, job.width, job.height, job.num_frames) == ("tiny", 64, 64, 8)
    xt = post_job(client, model="svd-xt")
    assert xt.status_code == 201, xt.get_json()
    job = load_job(app, xt.get_json()["id"])
    # SVD-XT's defaults and native area (768 x 768) and its memory estimate, not the tiny's.
    assert (job.model, job.num_frames) == (XT, 25)
    assert job.width * job.height > 500_000
    assert job.memory_estimate_bytes > 9 * 10**9


def test_the_default_model_is_the_first_a_live_worker_serves(
    app: Flask, client: FlaskClient, db: Database
) -> None:
    add_worker(db, "gpu@a", GPU_QUEUES, capabilities={"device": "cuda", "models": [XT]})
    response = post_job(client)
    assert response.status_code == 201, response.get_json()
    job = load_job(app, response.get_json()["id"])
    assert job.model == XT and job.queue in GPU_QUEUES


def test_a_job_goes_to_a_queue_of_a_worker_that_serves_its_model(
    app: Flask, client: FlaskClient, db: Database
) -> None:
    """A GPU worker serves SVD-XT only, a CPU worker the tiny model only: each job goes to the
    queues of the worker that has its model."""
    add_worker(db, "gpu@a", GPU_QUEUES, capabilities={"device": "cuda", "models": [XT]})
    add_worker(db, "cpu@b", CPU_QUEUES, capabilities={"device": "cpu", "models": ["tiny"]})
    tiny = load_job(app, post_job(client, model="tiny").get_json()["id"])
    xt = load_job(app, post_job(client, model="svd-xt", num_frames="4").get_json()["id"])
    assert tiny.queue in CPU_QUEUES and xt.queue in GPU_QUEUES


def test_the_forms_model_dropdown(app: Flask, client: FlaskClient, db: Database) -> None:
    """The form lists the catalog, the default model selected, and its defaults filled in;
    the model chosen is the job's."""
    page = client.get("/").get_data(as_text=True)
    options = re.findall(r'<option value="([^"]+)"( selected)?>([^<]*)</option>', page)
    assert [(value, text) for value, _, text in options if value in ("svd-xt", "tiny")] == [
        ("svd-xt", "svd-xt (no worker serves it now)"),
        ("tiny", "tiny (no worker serves it now)"),
    ]
    models = [value for value, _, _ in options if value in ("svd-xt", "svd", "tiny")]
    assert models == ["svd-xt", "svd", "tiny"]
    assert ("tiny", " selected", "tiny (no worker serves it now)") in options
    add_worker(db, "gpu@a", GPU_QUEUES, capabilities={"device": "cuda", "models": [XT]})
    page = client.get("/").get_data(as_text=True)
    assert '<option value="svd-xt" selected>svd-xt</option>' in page
    assert "1024 x 576" in page  # SVD-XT's size presets, not the tiny model's 64 x 64

    data: dict[str, Any] = {
        "image": (io.BytesIO(png_bytes()), "in.png"),
        "csrf_token": form_token(client),
        "model": "tiny",
    }
    response = client.post("/", data=data)
    assert response.status_code == 303, response.get_data(as_text=True)[:2000]
    assert load_job(app, job_id_from(response)).model == "tiny"
