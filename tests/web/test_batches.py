"""Batches: several images and seeds in one submit, one job per image and seed sharing the
settings; the batch's JSON, its page, the zip of its outputs, the form's several images, and
the limits counting a batch as its jobs."""

from __future__ import annotations

import io
import re
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from svdfarm.batches import MAX_BATCH_JOBS
from svdfarm.db import upgrade
from svdfarm.models import Batch, Job, utcnow
from svdfarm.settings import Settings
from svdfarm.states import JobState
from svdfarm.storage import FileStore, Store
from tests.conftest import DATABASES, make_settings
from tests.factories import gif_bytes, jpeg_bytes, png_bytes
from tests.http import form_token
from tests.rows import job_count
from web import create_app

#: No 5xx, and every status, content type, header and body as the document says.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def api_schema(app: Flask) -> Any:
    """The served OpenAPI document, loaded by schemathesis, calling ``app`` in-process."""
    document: dict[str, Any] = app.test_client().get("/api/v1/openapi.json").get_json()
    schema = schemathesis.openapi.from_dict(document)
    schema.app = app
    return schema


def post_batch(client: FlaskClient, images: list[tuple[bytes, str]], **fields: Any) -> Any:
    """POST a batch with ``images`` (bytes, file name) and ``fields``."""
    form: dict[str, Any] = {"image": [(io.BytesIO(d), n) for d, n in images], **fields}
    return client.post("/api/v1/batches", data=form, content_type="multipart/form-data")


def jobs_of(app: Flask, batch_id: str) -> list[Job]:
    """The batch's jobs in their order."""
    with app.extensions["svdfarm.db"].session() as session:
        batch = session.get(Batch, uuid.UUID(batch_id))
        assert batch is not None
        return list(batch.jobs)


TWO = [(png_bytes(96, 64), "cat.png"), (jpeg_bytes(64, 96), "dog.jpg")]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_images_times_seeds_make_one_job_each(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """Two images x seeds 1,2: four jobs in order (image by image, seed by seed), sharing the
    settings, each with its own stored input and queue message; 201 lists them."""
    response = post_batch(client, TWO, seeds="1, 2", num_frames="6", output_formats="gif")
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert response.headers["Location"] == body["status_url"]
    assert body["status_url"].endswith(f"/api/v1/batches/{body['id']}")
    assert body["page_url"].endswith(f"/batches/{body['id']}")
    assert [(j["input_filename"], j["seed"], j["state"]) for j in body["jobs"]] == [
        ("cat.png", 1, "queued"),
        ("cat.png", 2, "queued"),
        ("dog.jpg", 1, "queued"),
        ("dog.jpg", 2, "queued"),
    ]
    jobs = jobs_of(app, body["id"])
    assert [str(j.id) for j in jobs] == [j["id"] for j in body["jobs"]]
    assert [j.batch_index for j in jobs] == [0, 1, 2, 3]
    assert {(j.num_frames, j.output_formats) for j in jobs} == {(6, "mp4,gif")}
    assert (jobs[0].width, jobs[0].height) == (jobs[1].width, jobs[1].height)
    storage = FileStore(settings.storage_dir)
    assert storage.read_bytes(jobs[2].input_key) == TWO[1][0]
    assert len(list((settings.broker_dir / "queue").iterdir())) == 4

    info = client.get(body["status_url"]).get_json()
    assert [j["id"] for j in info["jobs"]] == [j["id"] for j in body["jobs"]]
    assert info["counts"] == {"queued": 4} and info["done"] is False
    assert info["progress"] == 0


def test_count_renders_seeds_upwards_from_the_seed(app: Flask, client: FlaskClient) -> None:
    """count=3 with seed 10: seeds 10, 11, 12; count without a seed: random distinct ones."""
    body = post_batch(client, TWO[:1], count="3", seed="10").get_json()
    assert [j["seed"] for j in body["jobs"]] == [10, 11, 12]
    drawn = post_batch(client, TWO[:1], count="3").get_json()
    assert len({j["seed"] for j in drawn["jobs"]}) == 3


def test_without_seeds_or_count_each_image_is_one_job(client: FlaskClient) -> None:
    """Neither seeds nor count: one job per image, with the seed field's seed."""
    body = post_batch(client, TWO, seed="7").get_json()
    assert [(j["input_filename"], j["seed"]) for j in body["jobs"]] == [
        ("cat.png", 7),
        ("dog.jpg", 7),
    ]


@pytest.mark.parametrize(
    ("fields", "field", "phrase"),
    [
        ({"seeds": "1,2", "count": "2"}, "seeds", "seeds or count, not both"),
        ({"seeds": "1,2", "seed": "4"}, "seeds", "seeds or seed, not both"),
        ({"seeds": "1,x"}, "seeds", "whole numbers from 0"),
        ({"seeds": "-1"}, "seeds", "whole numbers from 0"),
        ({"count": "0"}, "count", f"from 1 to {MAX_BATCH_JOBS}"),
        ({"count": str(MAX_BATCH_JOBS)}, "seeds", f"at most {MAX_BATCH_JOBS} jobs"),
        ({"num_frames": "1"}, "num_frames", "between"),
        ({"frames": "4"}, "frames", "did you mean"),
    ],
)
def test_a_bad_batch_is_refused_whole(
    app: Flask, client: FlaskClient, fields: dict[str, str], field: str, phrase: str
) -> None:
    """Bad seeds, count, fields or too many jobs: 400 naming the field; nothing written."""
    response = post_batch(client, TWO, **fields)
    assert response.status_code == 400, response.get_json()
    assert phrase in response.get_json()["fields"][field]
    assert job_count(app) == 0


def test_one_bad_image_refuses_the_batch_and_names_it(app: Flask, client: FlaskClient) -> None:
    """A GIF among PNGs: the batch is refused (415) with that image named; nothing written."""
    response = post_batch(client, [TWO[0], (gif_bytes(), "anim.gif")])
    assert response.status_code == 415
    assert "Image 2 (anim.gif)" in response.get_json()["fields"]["image 2"]
    assert job_count(app) == 0
    empty = post_batch(client, [])
    assert empty.status_code == 400 and "one or more images" in empty.get_json()["error"]


def test_a_batch_counts_as_its_jobs_against_the_client_limit(
    tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    """With 3 submits a minute: a batch of 4 is refused (429, nothing written); after one
    single job, a batch of 3 is too; a batch of 2 passes, then nothing more."""
    limited = make_settings(tmp_path / "l", database_url, tiny_model_dir, SVDFARM_SUBMIT_RATE="3")
    upgrade(limited.database_url)
    app = create_app({"SVDFARM_SETTINGS": limited, "TESTING": True})
    try:
        client = app.test_client()
        too_big = post_batch(client, TWO, seeds="1,2")
        assert too_big.status_code == 429 and "Send a smaller batch" in too_big.get_json()["error"]
        assert job_count(app) == 0
        one = client.post(
            "/api/v1/jobs",
            data={"image": (io.BytesIO(png_bytes()), "a.png")},
            content_type="multipart/form-data",
        )
        assert one.status_code == 201
        over = post_batch(client, TWO[:1], count="3")
        assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
        assert post_batch(client, TWO).status_code == 201
        assert post_batch(client, TWO[:1]).status_code == 429
        assert job_count(app) == 3
    finally:
        app.extensions["svdfarm.db"].dispose()


def finish(app: Flask, settings: Settings, job_id: str, formats: dict[str, bytes]) -> None:
    """Store ``formats`` (format -> bytes) as the job's outputs and mark it succeeded."""
    names = {"mp4": "video.t.mp4", "webm": "video.t.webm", "gif": "video.t.gif"}
    keys = {f: Store.key(job_id, names[f]) for f in formats}
    storage = FileStore(settings.storage_dir)
    for output, data in formats.items():
        storage.write_bytes(keys[output], data)
    with app.extensions["svdfarm.db"].begin() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.state, job.phase, job.progress = JobState.SUCCEEDED, "done", 1.0
        job.video_key, job.output_keys, job.finished_at = keys["mp4"], keys, utcnow()


def test_the_batch_page_shows_every_job_and_zips_the_outputs(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """The page lists each job with its seed, state and progress, and refreshes itself while
    jobs run; the zip holds each succeeded job's outputs named by place and seed."""
    body = post_batch(client, TWO, seeds="5").get_json()
    batch_id, first, second = body["id"], body["jobs"][0]["id"], body["jobs"][1]["id"]
    assert client.get(f"/batches/{batch_id}/outputs.zip").status_code == 404
    finish(app, settings, first, {"mp4": b"mp4 bytes", "gif": b"gif bytes"})

    html = client.get(f"/batches/{batch_id}").text
    rows = re.findall(r'<tr class="state-(\w+)" data-job-id="([^"]+)">', html)
    assert rows == [("succeeded", first), ("queued", second)]
    assert '<meta http-equiv="refresh"' in html
    assert f'href="/batches/{batch_id}/outputs.zip"' in html
    assert f'href="http://localhost/jobs/{first}/video.gif"' in html
    info = client.get(f"/api/v1/batches/{batch_id}").get_json()
    assert info["counts"] == {"succeeded": 1, "queued": 1} and info["progress"] == 0.5

    with client.get(f"/batches/{batch_id}/outputs.zip") as response:
        assert response.status_code == 200 and response.mimetype == "application/zip"
        assert "attachment" in response.headers["Content-Disposition"]
        archive = zipfile.ZipFile(io.BytesIO(response.data))
    assert archive.namelist() == ["01-seed5-video.mp4", "01-seed5-video.gif"]
    assert archive.read("01-seed5-video.gif") == b"gif bytes"
    finish(app, settings, second, {"mp4": b"other"})
    assert '<meta http-equiv="refresh"' not in client.get(f"/batches/{batch_id}").text


def test_unknown_batches_are_404(client: FlaskClient) -> None:
    """An unknown or malformed batch id: 404 from the API (JSON) and the pages."""
    for path in (f"/api/v1/batches/{uuid.uuid4()}", "/api/v1/batches/nope"):
        response = client.get(path)
        assert response.status_code == 404 and "No batch" in response.get_json()["error"]
    assert client.get(f"/batches/{uuid.uuid4()}").status_code == 404
    assert client.get(f"/batches/{uuid.uuid4()}/outputs.zip").status_code == 404


def test_several_images_on_the_form_make_a_batch(app: Flask, client: FlaskClient) -> None:
    """The form's file input takes several images; two chosen make a batch of two jobs with
    the form's settings, shown on the batch page and remembered in My jobs."""
    html = client.get("/").text
    assert re.search(r'<input id="image" name="image" type="file"[^>]*multiple', html)
    data: dict[str, Any] = {
        "image": [(io.BytesIO(d), n) for d, n in TWO],
        "csrf_token": form_token(client),
        "num_frames": "5",
    }
    response = client.post("/", data=data)
    assert response.status_code == 303
    batch_id = re.search(r"/batches/([0-9a-f-]{36})$", response.headers["Location"])
    assert batch_id
    jobs = jobs_of(app, batch_id[1])
    assert [(j.input_filename, j.num_frames) for j in jobs] == [("cat.png", 5), ("dog.jpg", 5)]
    recent = client.get("/jobs").text
    assert all(str(j.id) in recent for j in jobs)


def test_the_forms_seeds_and_count_make_a_batch(app: Flask, client: FlaskClient) -> None:
    """The form takes ``seeds`` or ``count`` as the API does: one image with seeds 7,9 makes
    a batch of two jobs with those seeds; two images with count 2 from seed 40, four jobs; a
    bad count comes back on the form beside the field, with nothing queued; seeds without an
    image chosen (a render again of a stored one) are refused, not ignored."""
    html = client.get("/").text
    assert '<input id="seeds" name="seeds"' in html and '<input id="count" name="count"' in html
    one = {"image": (io.BytesIO(png_bytes()), "cat.png"), "csrf_token": form_token(client)}
    response = client.post("/", data={**one, "seeds": "7, 9", "num_frames": "5"})
    assert response.status_code == 303, response.text
    batch_id = re.search(r"/batches/([0-9a-f-]{36})$", response.headers["Location"])
    assert batch_id
    assert [(j.seed, j.num_frames) for j in jobs_of(app, batch_id[1])] == [(7, 5), (9, 5)]

    data: dict[str, Any] = {
        "image": [(io.BytesIO(d), n) for d, n in TWO],
        "csrf_token": form_token(client),
        "count": "2",
        "seed": "40",
    }
    response = client.post("/", data=data)
    assert response.status_code == 303, response.text
    batch_id = re.search(r"/batches/([0-9a-f-]{36})$", response.headers["Location"])
    assert batch_id
    jobs = jobs_of(app, batch_id[1])
    assert sorted((j.input_filename, j.seed) for j in jobs) == [
        ("cat.png", 40),
        ("cat.png", 41),
        ("dog.jpg", 40),
        ("dog.jpg", 41),
    ]

    before = job_count(app)
    one = {"image": (io.BytesIO(png_bytes()), "cat.png"), "csrf_token": form_token(client)}
    refused = client.post("/", data={**one, "count": "0"})
    assert refused.status_code == 400
    assert f"Count must be a whole number from 1 to {MAX_BATCH_JOBS}" in refused.text
    assert 'id="count" name="count" type="number"' in refused.text and 'value="0"' in refused.text
    no_image = client.post("/", data={"csrf_token": form_token(client), "seeds": "1,2"})
    assert no_image.status_code == 400 and "Seeds and count make a batch" in no_image.text
    assert job_count(app) == before


def test_the_batch_answers_are_as_documented(app: Flask) -> None:
    """201, 400, 404 and the batch's JSON, each checked against the OpenAPI document."""
    schema = api_schema(app)
    submit = next(
        r.ok() for r in schema.get_all_operations() if r.ok().label == "POST /api/v1/batches"
    )
    read = next(
        r.ok()
        for r in schema.get_all_operations()
        if r.ok().label == "GET /api/v1/batches/{batch_id}"
    )
    created = submit.Case(
        body={"image": [png_bytes(), png_bytes(64, 64)], "seeds": "1,2", "loop": "true"},
        media_type="multipart/form-data",
    ).call_and_validate(checks=CHECKS)
    assert created.status_code == 201
    assert len(created.json()["jobs"]) == 4
    refused = submit.Case(
        body={"image": [png_bytes()], "count": "0"}, media_type="multipart/form-data"
    ).call_and_validate(checks=[response_schema_conformance])
    assert refused.status_code == 400
    found = read.Case(path_parameters={"batch_id": created.json()["id"]}).call_and_validate(
        checks=CHECKS
    )
    assert found.status_code == 200 and len(found.json()["jobs"]) == 4
    missing = read.Case(path_parameters={"batch_id": str(uuid.uuid4())}).call_and_validate(
        checks=CHECKS
    )
    assert missing.status_code == 404


def test_seeds_are_ascii_whole_numbers(app: Flask, client: FlaskClient) -> None:
    """Digits of other scripts (which Python's isdigit takes and int refuses) are refused."""
    for seeds in ("²", "1,٣"):
        response = post_batch(client, TWO[:1], seeds=seeds)
        assert response.status_code == 400 and "whole numbers" in response.get_json()["error"]
    assert post_batch(client, TWO[:1], count="²").status_code == 400
    assert job_count(app) == 0
