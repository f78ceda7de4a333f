"""The pages: the form, submitting it, a job's status page, and its video with range requests."""

from __future__ import annotations

import io
import re
import uuid
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from markupsafe import escape

from svdfarm.models import Job, utcnow
from svdfarm.params import FIELDS, PRECISIONS, defaults_for
from svdfarm.settings import Settings
from svdfarm.states import JobState
from svdfarm.storage import Storage
from tests.conftest import DATABASES
from tests.factories import png_bytes


@pytest.fixture(scope="module")
def mp4_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real 8-frame 64 x 64 H.264 MP4, made once for the module."""
    from worker.video import encode_mp4

    frames = np.zeros((8, 64, 64, 3), dtype=np.uint8)
    for index in range(len(frames)):
        frames[index, :, : 8 * (index + 1)] = (255, 128, 0)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    encode_mp4(frames, 7, path)
    return path.read_bytes()


def submit(client: FlaskClient, **fields: str) -> Any:
    """POST the form with a valid image."""
    data: dict[str, Any] = {"image": (io.BytesIO(png_bytes()), "in.png"), **fields}
    return client.post("/", data=data)


def job_id_from(response: Any) -> str:
    """The job id in a redirect to a status page."""
    match = re.fullmatch(r"/jobs/([0-9a-f-]{36})", response.headers["Location"])
    assert match, response.headers["Location"]
    return match[1]


def update_job(app: Flask, job_id: str, **values: Any) -> None:
    """Change a job's columns by hand, as a worker would."""
    with app.extensions["svdfarm.db"].begin() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)


def finish_job(app: Flask, settings: Settings, job_id: str, video: bytes) -> str:
    """Store ``video`` as the job's MP4 and mark it succeeded; returns the video's key."""
    key = Storage.key(job_id, "video.mp4")
    Storage(settings.storage_dir).write_bytes(key, video)
    update_job(
        app,
        job_id,
        state=JobState.SUCCEEDED,
        phase="done",
        progress=1.0,
        video_key=key,
        finished_at=utcnow(),
    )
    return key


def test_the_form_has_every_field(client: FlaskClient) -> None:
    """GET / shows the image input, every numeric field with its range and default, precision."""
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'enctype="multipart/form-data"' in html
    assert re.search(r'<input id="image" name="image" type="file"', html)
    defaults = defaults_for("tiny")
    for name, field in FIELDS.items():
        tag = re.search(rf'<input id="{name}" name="{name}" type="number"[^>]*>', html, re.DOTALL)
        assert tag, name
        assert f'min="{field.minimum}"' in tag[0]
        assert f'max="{field.maximum}"' in tag[0]
        assert f'value="{defaults.get(name, "")}"' in tag[0]
        assert f'<label for="{name}">{field.label}</label>' in html
    select = re.search(r'<select id="precision" name="precision">(.*?)</select>', html, re.DOTALL)
    assert select
    assert re.findall(r'<option value="(\w+)"', select[1]) == list(PRECISIONS)
    assert re.search(r'<option value="auto"\s+selected>', select[1])
    assert 'class="error"' not in html


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_valid_form_redirects_to_the_status_page(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """POST / valid → 303 to /jobs/<id>, whose page shows the queued state and a progress bar."""
    response = submit(client, num_frames="10", precision="fp32")
    assert response.status_code == 303
    job_id = job_id_from(response)
    assert (settings.storage_dir / job_id / "input.png").is_file()
    assert len(list((settings.broker_dir / "queue").iterdir())) == 1
    page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert f"<code>{job_id}</code>" in html
    assert '<strong id="state">queued</strong>' in html
    assert 'role="progressbar"' in html
    assert 'aria-valuenow="0"' in html
    assert "<dt>num_frames</dt><dd>10</dd>" in html
    assert "<dt>precision</dt><dd>fp32</dd>" in html
    assert "<video" not in html
    assert f'action="/jobs/{job_id}/cancel"' in html


def test_the_status_page_shows_progress(app: Flask, client: FlaskClient) -> None:
    """A running job shows its state, phase with the step, and the bar at its percentage."""
    job_id = job_id_from(submit(client))
    update_job(app, job_id, state=JobState.RUNNING, phase="denoising", step=2, progress=0.42)
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert '<strong id="state">running</strong>' in html
    assert "Denoising (step 2/4)" in html
    assert 'aria-valuenow="42"' in html
    assert 'style="width: 42.0%"' in html
    assert ">42%</p>" in html


def test_a_finished_job_shows_and_serves_its_video(
    app: Flask, client: FlaskClient, settings: Settings, mp4_bytes: bytes
) -> None:
    """A succeeded job's page has a <video> of the MP4 and a download link; the URL serves it."""
    job_id = job_id_from(submit(client))
    finish_job(app, settings, job_id, mp4_bytes)
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    video_url = f"http://localhost/jobs/{job_id}/video.mp4"
    assert re.search(r"<video id=\"video\"[^>]*>", html)
    assert f'<source src="{video_url}" type="video/mp4">' in html
    download = re.search(r'<a class="button" id="download" href="([^"]+)"', html)
    assert download
    assert download[1] == f"/jobs/{job_id}/video.mp4?download=1"
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["video_url"] == video_url
    assert "Cancel</button>" not in html

    with client.get(f"/jobs/{job_id}/video.mp4") as response:
        assert response.status_code == 200
        assert response.mimetype == "video/mp4"
        assert response.headers["Accept-Ranges"] == "bytes"
        assert response.data == mp4_bytes
        assert response.data[4:8] == b"ftyp"
        assert "attachment" not in response.headers.get("Content-Disposition", "")

    with client.get(download[1]) as saved:
        assert saved.status_code == 200
        assert saved.headers["Content-Disposition"].startswith("attachment")
        assert f"svdfarm-{job_id}.mp4" in saved.headers["Content-Disposition"]
        assert saved.data == mp4_bytes


def test_the_video_supports_range_requests(
    app: Flask, client: FlaskClient, settings: Settings, mp4_bytes: bytes
) -> None:
    """Seeking works: a byte range is answered 206 with exactly those bytes."""
    job_id = job_id_from(submit(client))
    finish_job(app, settings, job_id, mp4_bytes)
    size = len(mp4_bytes)
    url = f"/jobs/{job_id}/video.mp4"
    with client.get(url, headers={"Range": "bytes=0-99"}) as first:
        assert first.status_code == 206
        assert first.mimetype == "video/mp4"
        assert first.headers["Content-Range"] == f"bytes 0-99/{size}"
        assert first.data == mp4_bytes[:100]
    with client.get(url, headers={"Range": "bytes=100-"}) as rest:
        assert rest.status_code == 206
        assert rest.data == mp4_bytes[100:]
    with client.get(url, headers={"Range": "bytes=-50"}) as tail:
        assert tail.status_code == 206
        assert tail.data == mp4_bytes[-50:]
    with client.get(url, headers={"Range": f"bytes={size + 10}-"}) as outside:
        assert outside.status_code == 416


def test_no_video_until_the_job_succeeded(app: Flask, client: FlaskClient) -> None:
    """A queued job has no video, no poster and no video_url: 404, not an empty file."""
    job_id = job_id_from(submit(client))
    assert client.get(f"/jobs/{job_id}/video.mp4").status_code == 404
    assert client.get(f"/jobs/{job_id}/poster.png").status_code == 404
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["video_url"] is None


def test_the_input_image_is_served(client: FlaskClient) -> None:
    """The status page links the uploaded image, which is served as it was sent."""
    job_id = job_id_from(submit(client))
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert f'<a href="/jobs/{job_id}/input">in.png</a>' in html
    with client.get(f"/jobs/{job_id}/input") as response:
        assert response.status_code == 200
        assert response.mimetype == "image/png"
        assert response.data == png_bytes()


def test_the_file_name_is_escaped_on_the_page(client: FlaskClient) -> None:
    """A file name with markup is shown as text, never as HTML."""
    name = "<script>alert(1)</script>.png"
    data: dict[str, Any] = {"image": (io.BytesIO(png_bytes()), name)}
    job_id = job_id_from(client.post("/", data=data))
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "<script>alert" not in html
    assert str(escape(name)) in html


def test_a_failed_job_shows_its_error(app: Flask, client: FlaskClient) -> None:
    """The error of a failed job is shown on its page, escaped."""
    job_id = job_id_from(submit(client))
    update_job(app, job_id, state=JobState.FAILED, error="Out of memory <at 64 x 64>.")
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert '<div class="alert" id="error">Out of memory &lt;at 64 x 64&gt;.</div>' in html
    assert '<strong id="state">failed</strong>' in html


def test_cancel_from_the_page(app: Flask, client: FlaskClient) -> None:
    """The page's Cancel button cancels a queued job and shows the page again."""
    job_id = job_id_from(submit(client))
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 303
    assert response.headers["Location"] == f"/jobs/{job_id}"
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert '<strong id="state">canceled</strong>' in html
    assert "Cancel</button>" not in html


@pytest.mark.parametrize("path", ["/jobs/{unknown}", "/jobs/not-a-uuid", "/jobs/{unknown}/input"])
def test_unknown_jobs_are_404_pages(client: FlaskClient, path: str) -> None:
    """An unknown or malformed job id in a page URL is a 404 HTML page, not JSON."""
    response = client.get(path.format(unknown=uuid.uuid4()))
    assert response.status_code == 404
    assert not response.is_json


def test_a_recorded_but_missing_video_is_404(app: Flask, client: FlaskClient) -> None:
    """A succeeded job whose MP4 is missing from storage answers 404, not a server error."""
    job_id = job_id_from(submit(client))
    update_job(app, job_id, state=JobState.SUCCEEDED, video_key=Storage.key(job_id, "video.mp4"))
    assert client.get(f"/jobs/{job_id}/video.mp4").status_code == 404
