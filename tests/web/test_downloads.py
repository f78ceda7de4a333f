"""Downloads from an S3 store: a redirect to a presigned URL valid a few minutes, or, with
``SVDFARM_STORAGE_PROXY``, the web sends the bytes itself (ranges too). The API's
``video_url`` stays the farm's own URL either way. (A folder store's ranges are tested with
the pages.)"""

from __future__ import annotations

import io
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from svdfarm.db import upgrade
from svdfarm.models import Job, utcnow
from svdfarm.states import JobState
from svdfarm.storage import Store, open_store
from tests.conftest import S3Bucket, make_settings
from tests.factories import png_bytes

VIDEO = bytes(range(256)) * 40


def s3_app(tmp_path: Path, database_url: str, tiny_model_dir: Path, bucket: S3Bucket, proxy: str):
    """The web app storing in ``bucket``, ``SVDFARM_STORAGE_PROXY=proxy``."""
    from web import create_app

    settings = make_settings(
        tmp_path / "var",
        database_url,
        tiny_model_dir,
        SVDFARM_STORAGE_URL=bucket.url,
        SVDFARM_STORAGE_PROXY=proxy,
    )
    upgrade(settings.database_url)
    return create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})


@pytest.fixture(params=["0", "1"], ids=["redirect", "proxy"])
def app(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    database_url: str,
    tiny_model_dir: Path,
    s3_bucket: S3Bucket,
) -> Iterator[Flask]:
    """The web app on an S3 store, redirecting or proxying downloads."""
    flask_app = s3_app(tmp_path, database_url, tiny_model_dir, s3_bucket, request.param)
    yield flask_app
    flask_app.extensions["svdfarm.db"].dispose()


def succeeded_job(app: Flask, client: FlaskClient) -> str:
    """A job submitted through the API whose video the test stored in S3 and recorded."""
    answer = client.post("/api/v1/jobs", data={"image": (io.BytesIO(png_bytes()), "in.png")})
    assert answer.status_code == 201, answer.get_data(as_text=True)
    job_id = str(answer.get_json()["id"])
    key = Store.key(job_id, f"video.{uuid.uuid4().hex}.mp4")
    open_store(app.config["SVDFARM_SETTINGS"]).write_bytes(key, VIDEO)
    with app.extensions["svdfarm.db"].begin() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.state, job.phase, job.progress, job.finished_at = (
            JobState.SUCCEEDED,
            "done",
            1,
            utcnow(),
        )
        job.video_key = key
    return job_id


def test_s3_downloads_redirect_or_stream(app: Flask, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """The upload went to the bucket, not the data folder; the video and the input come from
    a presigned URL (302, a few minutes) or through the web (200, 206 for a range)."""
    client = app.test_client()
    job_id = succeeded_job(app, client)
    settings = app.config["SVDFARM_SETTINGS"]
    assert not settings.storage_dir.exists() or list(settings.storage_dir.rglob("*")) == []
    api = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert api["video_url"] == f"http://localhost/jobs/{job_id}/video.mp4"

    answer = client.get(f"/jobs/{job_id}/video.mp4?download=1")
    if not settings.storage_proxy:
        assert answer.status_code == 302
        url = answer.headers["Location"]
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        assert query["X-Amz-Expires"] == ["300"]
        assert url.startswith(s3_bucket.env["AWS_ENDPOINT_URL"])
        with urllib.request.urlopen(url, timeout=10) as fetched:
            assert fetched.read() == VIDEO
            assert fetched.headers["Content-Disposition"] == (
                f'attachment; filename="svdfarm-{job_id}.mp4"'
            )
        inline = client.get(f"/jobs/{job_id}/video.mp4").headers["Location"]
        assert "inline" in urllib.parse.unquote(inline)
        image = client.get(f"/jobs/{job_id}/input")
        assert image.status_code == 302
        with urllib.request.urlopen(image.headers["Location"], timeout=10) as fetched:
            assert fetched.read() == png_bytes()
        return
    assert answer.status_code == 200 and answer.data == VIDEO
    assert answer.headers["Content-Disposition"].startswith("attachment")
    with client.get(f"/jobs/{job_id}/video.mp4", headers={"Range": "bytes=0-99"}) as part:
        assert part.status_code == 206 and part.data == VIDEO[:100]
        assert part.headers["Content-Range"] == f"bytes 0-99/{len(VIDEO)}"
    assert client.get(f"/jobs/{job_id}/input").data == png_bytes()


def test_a_missing_object_is_404(app: Flask) -> None:
    """A recorded video that is not in the bucket answers 404, not a redirect to nothing."""
    client = app.test_client()
    job_id = succeeded_job(app, client)
    store = open_store(app.config["SVDFARM_SETTINGS"])
    for key in store.list_keys(f"{job_id}/video."):
        store.delete(key)
    assert client.get(f"/jobs/{job_id}/video.mp4").status_code == 404
