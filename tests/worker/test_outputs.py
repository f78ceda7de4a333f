"""A job's outputs end to end: the formats it asks for, the loop and its guidance, rendered
by the worker with the tiny model, stored under the claim's names, listed in the job's JSON,
served by the web, and the MP4 carrying the settings to render it again."""

from __future__ import annotations

import io
import uuid
import zipfile

import pytest
from flask import Flask
from PIL import Image

from svdfarm.db import Database
from svdfarm.models import Job
from svdfarm.params import parse_params
from svdfarm.settings import Settings
from svdfarm.states import JobState
from svdfarm.storage import FileStore, Store
from tests.media import probe_video
from tests.rows import job_with_attempts, submit_small_job
from worker.execute import run_job
from worker.video import read_metadata


def _submit(db: Database, settings: Settings, **fields: str) -> uuid.UUID:
    """Record and enqueue a small job with seed 5 as the API does; returns its id."""
    return submit_small_job(db, settings, **{"seed": "5", **fields})


_job = job_with_attempts


@pytest.fixture
def rendered(db: Database, settings: Settings) -> Job:
    """A job asking for every format, looped, with its own guidance, rendered by a worker."""
    job_id = _submit(
        db,
        settings,
        output_formats="gif, frames,webm",
        loop="true",
        min_guidance_scale="1.5",
        max_guidance_scale="2.5",
    )
    assert run_job(db, settings, str(job_id), "w1@test") == "succeeded"
    return _job(db, job_id)


def test_every_format_is_stored_under_the_claims_names(rendered: Job, settings: Settings) -> None:
    """mp4, webm, gif and the frames' zip are stored with the claim's token, each looped
    (4 frames ping-pong to 6); the poster stays a frame of the render."""
    job = rendered
    assert job.state is JobState.SUCCEEDED
    assert job.output_formats == "mp4,webm,gif,frames" and job.loop is True
    token = (job.video_key or "").split(".")[1]
    assert job.output_keys == {
        "mp4": Store.key(job.id, f"video.{token}.mp4"),
        "webm": Store.key(job.id, f"video.{token}.webm"),
        "gif": Store.key(job.id, f"video.{token}.gif"),
        "frames": Store.key(job.id, f"frames.{token}.zip"),
    }
    storage = FileStore(settings.storage_dir)
    assert sorted(storage.list_keys(f"{job.id}/")) == sorted(
        [job.input_key, job.poster_key or "", *job.output_keys.values()]
    )
    assert probe_video(storage.path(job.output_keys["mp4"]))["frames"] == 6
    webm = probe_video(storage.path(job.output_keys["webm"]))
    assert (webm["codec"], webm["frames"]) == ("vp9", 6)
    with Image.open(storage.path(job.output_keys["gif"])) as gif:
        assert getattr(gif, "n_frames", 1) == 6
    with zipfile.ZipFile(storage.path(job.output_keys["frames"])) as archive:
        assert len(archive.namelist()) == 6


def test_the_mp4_renders_again_from_itself(rendered: Job, settings: Settings) -> None:
    """The MP4's metadata holds the model and every parameter of the job; read back and
    validated as a new submission, they are the same render (same seed, same everything)."""
    job = rendered
    found = read_metadata(FileStore(settings.storage_dir).path(job.video_key or ""))
    assert found == {"model": job.model, "params": job.params()}
    again = parse_params(found["params"], (96, 64), found["model"])
    assert again.as_dict() == job.params()


def test_the_json_lists_every_output_and_the_web_serves_each(rendered: Job, app: Flask) -> None:
    """``outputs`` has a URL per format; each answers its file with its type."""
    client = app.test_client()
    info = client.get(f"/api/v1/jobs/{rendered.id}").get_json()
    assert set(info["outputs"]) == {"mp4", "webm", "gif", "frames"}
    assert info["outputs"]["mp4"] == info["video_url"]
    paths = {k: v.removeprefix("http://localhost") for k, v in info["outputs"].items()}
    assert paths == {
        "mp4": f"/jobs/{rendered.id}/video.mp4",
        "webm": f"/jobs/{rendered.id}/video.webm",
        "gif": f"/jobs/{rendered.id}/video.gif",
        "frames": f"/jobs/{rendered.id}/frames.zip",
    }
    types = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}
    for output, path in paths.items():
        with client.get(path) as response:
            assert response.status_code == 200, output
            assert response.mimetype == types.get(output, "application/zip")
    with client.get(paths["frames"] + "?download=1") as saved:
        assert "attachment" in saved.headers["Content-Disposition"]
        assert zipfile.ZipFile(io.BytesIO(saved.data)).namelist()[0] == "frame_0001.png"
    assert info["params"]["min_guidance_scale"] == 1.5
    assert info["params"]["max_guidance_scale"] == 2.5
    assert info["params"]["loop"] is True

    page = client.get(f"/jobs/{rendered.id}").get_data(as_text=True)
    for text in ("Min guidance", "Max guidance", "mp4,webm,gif,frames", "Loop"):
        assert text in page
    assert f'href="{paths["webm"]}?download=1"' in page or "video.webm?download=1" in page


def test_a_format_not_asked_for_is_not_found(db: Database, settings: Settings, app: Flask) -> None:
    """A job that asked for the MP4 alone lists it alone; its WebM address answers 404."""
    job_id = _submit(db, settings)
    assert run_job(db, settings, str(job_id), "w1@test") == "succeeded"
    client = app.test_client()
    info = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert list(info["outputs"]) == ["mp4"]
    assert client.get(f"/jobs/{job_id}/video.webm").status_code == 404
    assert _job(db, job_id).output_keys == {"mp4": _job(db, job_id).video_key}
