"""No shared folder: the web and a real worker process run on different data folders and
share only PostgreSQL, Redis and an S3 bucket (moto's server, or the MinIO that
``SVDFARM_TEST_S3_URL`` names). The job succeeds, its input and outputs are in the bucket
under the claim's names, and neither data folder's storage folder holds anything."""

from __future__ import annotations

import io
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from svdfarm.db import Database, upgrade
from svdfarm.settings import Settings
from tests.conftest import (
    REDIS_URL,
    S3Bucket,
    fresh_database,
    make_settings,
    needs_postgres,
    needs_redis,
)
from tests.factories import png_bytes
from tests.processes import private_redis_db, start_worker
from tests.rows import wait_for_worker, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.redis,
    needs_postgres,
    needs_redis,
]


def folder_listing(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, relative, sorted (empty when it is missing)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def machines(
    tmp_path: Path, tiny_model_dir: Path, s3_bucket: S3Bucket
) -> Iterator[tuple[Settings, Settings]]:
    """The web's settings and the worker's: two data folders, one database, broker, bucket."""
    with fresh_database("postgresql", tmp_path) as url, private_redis_db(REDIS_URL) as broker:
        shared = {"SVDFARM_BROKER_URL": broker, "SVDFARM_STORAGE_URL": s3_bucket.url}
        web = make_settings(tmp_path / "web-var", url, tiny_model_dir, **shared)
        worker = make_settings(tmp_path / "worker-var", url, tiny_model_dir, **shared)
        upgrade(url)
        yield web, worker


def test_a_job_renders_with_no_folder_shared(
    machines: tuple[Settings, Settings], s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """Submit on the web, render on a worker elsewhere, download through a presigned URL."""
    from web import create_app

    web, worker_settings = machines
    assert web.data_dir != worker_settings.data_dir
    app = create_app({"SVDFARM_SETTINGS": web, "TESTING": True})
    client = app.test_client()
    db = Database(web.database_url)
    worker = start_worker(
        worker_settings,
        tmp_path,
        "remote",
        SVDFARM_STORAGE_URL=s3_bucket.url,
        SVDFARM_HEARTBEAT_INTERVAL="0.5",
        **s3_bucket.env,
    )
    try:
        wait_for_worker(db, worker.hostname, worker.process, worker.text)
        image = png_bytes(64, 64)
        data = {
            "image": (io.BytesIO(image), "in.png"),
            "num_frames": "4",
            "num_inference_steps": "2",
        }
        answer = client.post("/api/v1/jobs", data=data, content_type="multipart/form-data")
        assert answer.status_code == 201, answer.get_json()
        job_id = answer.get_json()["id"]

        def job() -> dict:
            """The job as the API shows it."""
            return dict(client.get(f"/api/v1/jobs/{job_id}").get_json())

        wait_until(
            lambda: job()["state"] in ("succeeded", "failed", "canceled"),
            "the job to finish",
            300,
            worker.text,
        )
        assert job()["state"] == "succeeded", (job(), worker.text())

        objects = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.name)  # type: ignore[attr-defined]
        names = sorted(o["Key"] for o in objects.get("Contents", []))
        token = next(n for n in names if "/video." in n).split("/")[-1].split(".")[1]
        assert names == [
            f"farm/{job_id}/input.png",
            f"farm/{job_id}/poster.{token}.png",
            f"farm/{job_id}/video.{token}.mp4",
        ]
        redirect = client.get(f"/jobs/{job_id}/video.mp4")
        assert redirect.status_code == 302
        with urllib.request.urlopen(redirect.headers["Location"], timeout=10) as fetched:
            assert fetched.read()[4:8] == b"ftyp"  # an MP4

        for settings in (web, worker_settings):
            listing = folder_listing(settings.data_dir)
            print(f"\n{settings.data_dir}: {listing}")
            assert folder_listing(settings.storage_dir) == [], listing
            assert not any(".mp4" in name or name.endswith(".png") for name in listing), listing
    finally:
        worker.stop()
        db.dispose()
        app.extensions["svdfarm.db"].dispose()
