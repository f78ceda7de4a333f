"""How the pages and the API describe a job (web/jobs.py): errors without server paths and
shown once, and a time left that never grows while a step runs long."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from svdfarm.db import Database
from svdfarm.models import Job, utcnow
from svdfarm.settings import Settings
from svdfarm.states import ErrorClass, JobState, Phase
from tests.rows import add_job, set_owner
from web.jobs import SERVER_PATH_TEXT, eta_for, eta_seconds, public_text

# ---- errors on the public pages ----------------------------------------------------------


def model_error(kind: str) -> tuple[str, str]:
    """A model error exactly as a worker stores it (``worker.errors.user_message`` of the
    ``ModelUnavailable`` that ``worker.pipeline`` raises), and the server path in it."""
    from huggingface_hub import constants

    from worker.errors import user_message
    from worker.pipeline import ModelUnavailable, _hub_message, resolve_model

    if kind == "hub":
        cause = ConnectionError("Max retries exceeded with url: /api/models/stabilityai/x")
        text = _hub_message("stabilityai/stable-video-diffusion-img2vid-xt", cause, 10)
        return user_message(ErrorClass.MODEL_UNAVAILABLE, ModelUnavailable(text)), str(
            constants.HF_HUB_CACHE
        )
    folder = "/srv/models/svd-xt"
    with pytest.raises(ModelUnavailable) as raised:
        resolve_model(folder, Path("/nonexistent"))
    return user_message(ErrorClass.MODEL_UNAVAILABLE, raised.value), folder


@pytest.mark.parametrize("kind", ["hub", "folder"])
def test_a_model_error_is_shown_once_without_server_paths(
    client: FlaskClient, db: Database, settings: Settings, kind: str
) -> None:
    """The status page and the API never show a server path to anyone who has the job's id;
    the page says the error once (the failed attempt's message is the same text)."""
    error, path = model_error(kind)
    assert path in error  # what the worker stores: the admin pages show all of it
    job_id = set_owner(
        db, add_job(db, settings, error_class=ErrorClass.MODEL_UNAVAILABLE, error=error)
    )

    html = client.get(f"/jobs/{job_id}").text
    assert path not in html
    opening = error.split("'")[0]  # "Could not load model ", "Model folder "
    assert html.count(opening) == 1, html
    alert = re.search(r'<div class="alert" id="error">(.*?)</div>', html, re.DOTALL)
    assert alert and SERVER_PATH_TEXT in alert[1]
    assert "SVDFARM_MODEL" in alert[1]  # what to do is still said
    assert 'class="message' not in html  # no second copy under the attempt

    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert path not in json.dumps(body)
    assert body["error"] == public_text(error) and SERVER_PATH_TEXT in body["error"]
    assert body["attempts"][0]["message"] == public_text(error)


def test_an_earlier_attempts_other_error_is_still_shown(
    app: object, client: FlaskClient, db: Database, settings: Settings
) -> None:
    """Only the message the job's error repeats is left out: another attempt's stays."""
    job_id = set_owner(
        db, add_job(db, settings, error="The worker ran out of memory (CUDA out of memory).")
    )
    with db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.attempts[0].message = "Canceled by request."
    html = client.get(f"/jobs/{job_id}").text
    assert '<td colspan="5">Canceled by request.</td>' in html


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cache /root/.cache/huggingface/hub) or", f"cache {SERVER_PATH_TEXT}) or"),
        ("looked in /srv/models/svd.", f"looked in {SERVER_PATH_TEXT}."),
        ("Model folder '~/models/x' is", f"Model folder '{SERVER_PATH_TEXT}' is"),
        ("in C:\\Users\\me\\hub now", f"in {SERVER_PATH_TEXT} now"),
        ("at file:///var/lib/svdfarm/x", f"at {SERVER_PATH_TEXT}"),
        # Not paths: URLs (and a URL's path in an HTTP library's message), Hub ids, ratios.
        ("Max retries exceeded with url: /api/models/x (Caused", None),
        ("see https://huggingface.co/docs/hub/x", "see https://huggingface.co/docs/hub/x"),
        ("hf download stabilityai/svd, fp16/fp32", "hf download stabilityai/svd, fp16/fp32"),
        ("1024 / 576 and 3/4", "1024 / 576 and 3/4"),
    ],
)
def test_public_text_replaces_server_paths_only(text: str, expected: str | None) -> None:
    """Absolute, home and Windows paths go; URLs, Hub ids and ratios stay (None: as is)."""
    assert public_text(text) == (text if expected is None else expected)


# ---- the time left -------------------------------------------------------------------------


def running(now: datetime, *, started_ago: float, measured_ago: float, step: int) -> Job:
    """A job denoising step ``step + 1`` of 12, half done when its progress was last written
    ``measured_ago`` seconds before ``now``; its attempt started ``started_ago`` before."""
    return Job(
        id=uuid.uuid4(),
        state=JobState.RUNNING,
        phase=Phase.DENOISING,
        progress=0.5,
        step=step,
        num_inference_steps=12,
        started_at=now - timedelta(seconds=started_ago),
        updated_at=now - timedelta(seconds=measured_ago),
    )


def seconds_in(text: str | None) -> int:
    """The number of seconds an ETA text says ("about 25 s left", "a few seconds left": 0)."""
    assert text is not None
    found = re.search(r"about (\d+) s left", text)
    return int(found[1]) if found else 0


def test_the_time_left_never_grows_while_a_step_runs_long() -> None:
    """Half done after 30 s (six 5 s steps), then step 7 runs on and on: the time left counts
    down from 30 s, then the page says which step runs and for how long, never a growing ETA."""
    now = utcnow()
    job = running(now, started_ago=30, measured_ago=0, step=6)
    seen = [eta_seconds(job, now + timedelta(seconds=s)) for s in range(15)]
    assert seen[0] == pytest.approx(30)
    assert all(a is not None and b is not None and b < a for a, b in pairwise(seen))
    texts = [eta_for(job, now + timedelta(seconds=s)) for s in range(15)]
    assert [seconds_in(t) for t in texts] == sorted((seconds_in(t) for t in texts), reverse=True)
    assert texts[0] == "about 30 s left"

    # Three average steps without progress: the step has overrun; no number is given.
    later = now + timedelta(seconds=15)
    assert eta_seconds(job, later) is None
    assert eta_for(job, later) == "Step 7 of 12 running for 15 s"
    assert eta_for(job, now + timedelta(seconds=75)) == "Step 7 of 12 running for 1 min 15 s"

    # The step ends: a fresh estimate from the new measurement.
    job.step, job.progress, job.updated_at = 7, 0.6, now + timedelta(seconds=90)
    assert eta_seconds(job, now + timedelta(seconds=90)) == pytest.approx(80)


def test_short_steps_overrun_only_after_ten_seconds() -> None:
    """Fast steps (the tiny model's) do not turn a brief pause into "running for 1 s"."""
    now = utcnow()
    job = running(now, started_ago=1.2, measured_ago=0, step=6)
    assert eta_for(job, now + timedelta(seconds=9)) == "a few seconds left"
    assert eta_for(job, now + timedelta(seconds=10)) == "Step 7 of 12 running for 10 s"


def test_the_api_and_the_page_say_a_step_has_overrun(
    client: FlaskClient, db: Database, settings: Settings
) -> None:
    """A job whose last progress write is 20 s old, after 5 s steps: no eta_s, and the words
    name the step and how long it has run, on the page and in the API."""
    job_id = set_owner(db, add_job(db, settings, JobState.RUNNING))
    now = utcnow()
    with db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.num_inference_steps, job.step, job.progress = 12, 6, 0.5
        job.started_at = now - timedelta(seconds=50)
        job.attempts.clear()
    with db.begin() as session:  # last, so that no later write moves it
        job = session.get(Job, job_id)
        assert job is not None
        job.updated_at = now - timedelta(seconds=20)
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert body["eta_s"] is None
    assert re.fullmatch(r"Step 7 of 12 running for 2\d s", body["eta_text"]), body["eta_text"]
    html = client.get(f"/jobs/{job_id}").text
    assert re.search(r'<p class="muted" id="eta" data-eta-s="">Step 7 of 12 running for', html)
