"""The JSON API end to end: submit, read, cancel, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from svdfarm.settings import Settings
from svdfarm.states import JobState
from tests.conftest import DATABASES, make_settings
from tests.factories import jpeg_bytes, png_bytes, webp_bytes
from tests.rows import job_count, load_job
from web import create_app


def post_job(client: FlaskClient, data: bytes, filename: str = "in.png", **fields: str) -> Any:
    """POST a multipart job with ``data`` as its image."""
    form: dict[str, Any] = {"image": (io.BytesIO(data), filename), **fields}
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")


def queue_messages(settings: Settings) -> list[dict[str, Any]]:
    """The broker's queued messages, each with its body decoded."""
    messages = []
    for path in sorted((settings.broker_dir / "queue").iterdir()):
        message = json.loads(path.read_bytes())
        message["decoded_body"] = json.loads(base64.b64decode(message["body"]))
        messages.append(message)
    return messages


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_submit_records_stores_and_enqueues(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """POST → 201 with id, state and status URL; the row, the input file, one queue message."""
    image = png_bytes(96, 64)
    response = post_job(client, image, "cat photo.png", num_frames="12", seed="77")
    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"id", "state", "status_url"}
    assert body["state"] == "queued"
    assert body["status_url"].endswith(f"/api/v1/jobs/{body['id']}")
    assert response.headers["Location"] == body["status_url"]

    job = load_job(app, body["id"])
    assert job.state is JobState.QUEUED
    assert job.model == "tiny"
    assert job.input_filename == "cat photo.png"
    assert job.params() == {
        "num_frames": 12,
        "num_inference_steps": 4,
        "fps": 7,
        "motion_bucket_id": 127,
        "noise_aug_strength": 0.02,
        "seed": 77,
        "decode_chunk_size": 8,
        "width": 64,
        "height": 64,
        "precision": "auto",
        "min_guidance_scale": 1.0,
        "max_guidance_scale": 3.0,
        "output_formats": "mp4",
        "loop": False,
    }
    assert job.input_key == f"{body['id']}/input.png"
    assert (settings.storage_dir / job.input_key).read_bytes() == image
    assert job_count(app) == 1

    messages = queue_messages(settings)
    assert len(messages) == 1
    assert messages[0]["headers"]["id"] == body["id"]
    assert messages[0]["headers"]["task"] == "svdfarm.render"
    assert messages[0]["decoded_body"][0] == [body["id"]]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_read_and_cancel_round_trip(client: FlaskClient) -> None:
    """GET shows a queued job; cancel → 202 canceled; cancel again → 409 with an error."""
    job_id = post_job(client, png_bytes()).get_json()["id"]
    response = client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200
    info = response.get_json()
    assert {"id", "state", "progress", "attempts", "video_url", "error"} <= set(info)
    assert info["id"] == job_id
    assert info["state"] == "queued"
    assert info["progress"] == 0
    assert info["attempts"] == []
    assert info["video_url"] is None
    assert info["error"] is None
    assert info["params"]["width"] == 64

    canceled = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert canceled.status_code == 202
    assert canceled.get_json()["state"] == "canceled"
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["state"] == "canceled"

    again = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert "canceled" in again.get_json()["error"]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_events_tell_the_story_in_order(client: FlaskClient) -> None:
    """Submit then cancel: the events answer submitted, published, canceled, in id order,
    each with its actor; the status page shows them as a timeline."""
    job_id = post_job(client, png_bytes()).get_json()["id"]
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    response = client.get(f"/api/v1/jobs/{job_id}/events")
    assert response.status_code == 200
    events = response.get_json()["events"]
    assert [(e["type"], e["actor"]) for e in events] == [
        ("submitted", "api"),
        ("published", "web"),  # sent by the web's dispatch pass after the submit
        ("canceled", "api"),
    ]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert events[0]["details"]["queue"].startswith("svd.")
    assert all(set(e) == {"id", "type", "at", "actor", "details"} for e in events)
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert 'id="timeline"' in page and "Submitted to svd." in page and "Canceled" in page


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
@pytest.mark.parametrize(
    ("method", "job_id", "suffix"),
    [
        ("get", None, ""),
        ("get", None, "/events"),
        ("get", "nope", "/events"),
        ("post", None, "/cancel"),
        ("get", "not-a-job-id", ""),
        ("get", "12345", ""),
        ("post", "nope", "/cancel"),
    ],
    ids=[
        "unknown",
        "events-unknown",
        "events-malformed",
        "cancel-unknown",
        "malformed",
        "number",
        "cancel-malformed",
    ],
)
def test_unknown_and_malformed_ids_are_404_json(
    client: FlaskClient, method: str, job_id: str | None, suffix: str
) -> None:
    """An id that is not a job (None: a fresh UUID), or not a UUID, is 404 JSON naming it."""
    job_id = job_id or str(uuid.uuid4())
    response = getattr(client, method)(f"/api/v1/jobs/{job_id}{suffix}")
    assert response.status_code == 404
    assert response.is_json
    assert job_id in response.get_json()["error"]


def test_unknown_api_route_is_json(client: FlaskClient) -> None:
    """Even a route that does not exist answers JSON under /api/."""
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert "error" in response.get_json()


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_healthz(client: FlaskClient) -> None:
    """/healthz answers 200 ok when the database answers."""
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok"}


def test_healthz_reports_an_unreachable_database(tmp_path: Path, tiny_model_dir: Path) -> None:
    """With a database server that does not answer, /healthz is 503 with the reason."""
    closed_port = "postgresql+psycopg://nobody@127.0.0.1:1/nothing?connect_timeout=2"
    settings = make_settings(tmp_path / "var", closed_port, tiny_model_dir)
    app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
    try:
        response = app.test_client().get("/healthz")
    finally:
        app.extensions["svdfarm.db"].dispose()
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "error"
    assert body["database"].startswith("unreachable")


@pytest.mark.parametrize(
    ("data", "filename", "extension"),
    [
        (jpeg_bytes(96, 64), "photo.jpg", "jpg"),
        (webp_bytes(96, 64), "photo.webp", "webp"),
        (png_bytes(96, 64), "really-a-png.jpg", "png"),
        (jpeg_bytes(96, 64), "no-extension", "jpg"),
    ],
    ids=["jpeg", "webp", "png-named-jpg", "jpeg-no-extension"],
)
def test_the_content_decides_the_type(
    app: Flask, client: FlaskClient, settings: Settings, data: bytes, filename: str, extension: str
) -> None:
    """JPEG and WebP are accepted; the stored file's extension follows the content, not the name."""
    response = post_job(client, data, filename)
    assert response.status_code == 201
    job = load_job(app, response.get_json()["id"])
    assert job.input_key.endswith(f"/input.{extension}")
    assert job.input_filename == filename
    assert (settings.storage_dir / job.input_key).read_bytes() == data


@pytest.mark.parametrize(
    ("size", "expected"),
    [((96, 64), (64, 64)), ((128, 32), (128, 64)), ((32, 128), (64, 128)), ((64, 64), (64, 64))],
)
def test_blank_sizes_fit_the_image_to_the_model(
    app: Flask, client: FlaskClient, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    """Blank width and height fit the image's aspect to the tiny model's 64 x 64 area."""
    response = post_job(client, png_bytes(*size), width="", height="")
    job = load_job(app, response.get_json()["id"])
    assert (job.width, job.height) == expected


def test_exif_rotation_is_fitted_upright(app: Flask, client: FlaskClient) -> None:
    """A landscape JPEG turned to portrait by EXIF is fitted as portrait."""
    response = post_job(client, jpeg_bytes(128, 32, orientation=6), "turned.jpg")
    job = load_job(app, response.get_json()["id"])
    assert (job.width, job.height) == (64, 128)


def test_every_field_is_recorded(app: Flask, client: FlaskClient) -> None:
    """Explicit values of every field end up in the job's columns."""
    fields = {
        "num_frames": "14",
        "num_inference_steps": "2",
        "fps": "12",
        "motion_bucket_id": "255",
        "noise_aug_strength": "0.1",
        "seed": str(2**63 - 1),
        "decode_chunk_size": "3",
        "width": "128",
        "height": "192",
        "precision": "fp32",
        "min_guidance_scale": "1.5",
        "max_guidance_scale": "7.5",
        "output_formats": "mp4,webm,gif,frames",
        "loop": "True",
    }
    response = post_job(client, png_bytes(), **(fields | {"loop": "true"}))
    assert response.status_code == 201
    params = load_job(app, response.get_json()["id"]).params()
    assert {k: str(v) for k, v in params.items()} == fields


def test_each_submission_is_its_own_job(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """Two submissions: two rows, two input folders, two messages, random seeds drawn for each."""
    first = post_job(client, png_bytes()).get_json()["id"]
    second = post_job(client, png_bytes()).get_json()["id"]
    assert first != second
    assert job_count(app) == 2
    assert sorted(p.name for p in settings.storage_dir.iterdir()) == sorted([first, second])
    assert sorted(m["headers"]["id"] for m in queue_messages(settings)) == sorted([first, second])
    assert 0 <= load_job(app, first).seed < 2**63
