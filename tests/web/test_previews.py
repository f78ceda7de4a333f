"""A running job's preview on the web: ``preview_url`` in its JSON, the status page's <img>
and ``GET /jobs/<id>/preview.jpg``, its owner's only; from a real tiny render in process."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image

from svdfarm.db import Database
from svdfarm.settings import Settings
from tests.rows import submit_small_job
from worker.execute import run_job
from worker.previews import PreviewWriter

#: Another anonymous owner than the test client's (open mode: owners by address).
ELSEWHERE = {"REMOTE_ADDR": "10.0.0.2"}


def test_a_running_jobs_preview_is_served_to_its_owner_only(
    db: Database, settings: Settings, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the tiny model denoises (a preview due at every step), the job's JSON names the
    latest preview, the status page shows it in a plain <img>, and the route serves a JPEG to
    the owner and 404 to anyone else; once the job ended there is no preview any more."""
    job_id = submit_small_job(db, settings, num_inference_steps="4")
    seen: list[dict[str, Any]] = []
    original = PreviewWriter.write

    def look(self: PreviewWriter, step: int, image: Image.Image) -> bool:
        held = original(self, step, image)
        body = client.get(f"/api/v1/jobs/{job_id}").get_json()
        page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
        url = body["preview_url"]
        path = url.removeprefix("http://localhost")
        with client.get(path) as mine, client.get(path, environ_base=ELSEWHERE) as theirs:
            served = (mine.status_code, mine.mimetype, mine.get_data(), theirs.status_code)
        seen.append(
            {
                "step": step,
                "state": body["state"],
                "url": url,
                "img": re.search(r'<img id="preview"[^>]*\ssrc="([^"]+)"', page),
                "served": served,
                "their_json": client.get(f"/api/v1/jobs/{job_id}", environ_base=ELSEWHERE),
            }
        )
        return held

    monkeypatch.setattr(PreviewWriter, "write", look)
    fast = settings.with_overrides(preview_interval_s=0.01)
    assert run_job(db, fast, str(job_id), "w1@test") == "succeeded"
    assert [s["step"] for s in seen] == [2, 3]
    for s in seen:
        assert s["state"] == "running"
        assert s["url"] == f"http://localhost/jobs/{job_id}/preview.jpg?step={s['step']}"
        assert s["img"] is not None and s["img"].group(1).replace("&amp;", "&") == s["url"]
        status, mimetype, data, theirs = s["served"]
        assert status == 200 and mimetype == "image/jpeg"
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.format == "JPEG" and image.size == (256, 256)
        assert theirs == 404
        assert s["their_json"].status_code == 404
    done = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert done["state"] == "succeeded" and done["preview_url"] is None
    assert client.get(f"/jobs/{job_id}/preview.jpg").status_code == 404
    assert 'id="preview"' not in client.get(f"/jobs/{job_id}").get_data(as_text=True)


def test_a_job_without_a_preview_has_none(
    db: Database, settings: Settings, client: FlaskClient
) -> None:
    """A queued job: ``preview_url`` null, the route 404, and the page's preview hidden."""
    job_id = submit_small_job(db, settings)
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["preview_url"] is None
    assert client.get(f"/jobs/{job_id}/preview.jpg").status_code == 404
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert re.search(r'<figure class="preview" id="preview-figure" hidden>', page)
    assert re.search(r'<img id="preview"[^>]*>', page) and " src=" not in re.search(
        r'<img id="preview"[^>]*>', page
    ).group(0)  # type: ignore[union-attr]
