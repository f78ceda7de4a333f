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
from svdfarm.storage import FileStore, Store
from tests.conftest import DATABASES
from tests.factories import png_bytes
from tests.http import form_token, job_id_from
from tests.rows import UNKNOWN_JOB_ID


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
    """POST the form with a valid image and the page's CSRF token."""
    data: dict[str, Any] = {
        "image": (io.BytesIO(png_bytes()), "in.png"),
        "csrf_token": form_token(client),
        **fields,
    }
    return client.post("/", data=data)


def update_job(app: Flask, job_id: str, **values: Any) -> None:
    """Change a job's columns by hand, as a worker would."""
    with app.extensions["svdfarm.db"].begin() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)


def finish_job(app: Flask, settings: Settings, job_id: str, video: bytes) -> str:
    """Store ``video`` as the job's MP4 and mark it succeeded; returns the video's key."""
    key = Store.key(job_id, "video.mp4")
    FileStore(settings.storage_dir).write_bytes(key, video)
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
    assert re.search(r'<progress class="progress" id="bar"[^>]*value="0.0">0%</progress>', html)
    assert '<dt title="num_frames">Frames</dt><dd>10</dd>' in html
    assert '<dt title="precision">Precision</dt><dd>fp32</dd>' in html
    assert "<video" not in html
    assert f'action="/jobs/{job_id}/cancel"' in html


def test_the_status_page_shows_progress(app: Flask, client: FlaskClient) -> None:
    """A running job shows its state, phase with the step, and the bar at its percentage."""
    job_id = job_id_from(submit(client))
    update_job(app, job_id, state=JobState.RUNNING, phase="denoising", step=2, progress=0.42)
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert '<strong id="state">running</strong>' in html
    assert "Denoising (step 2/4)" in html
    assert re.search(r'<progress class="progress" id="bar"[^>]*value="42.0">42%</progress>', html)
    assert "style=" not in html  # the CSP forbids inline styles: the bar needs none
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
    data: dict[str, Any] = {
        "image": (io.BytesIO(png_bytes()), name),
        "csrf_token": form_token(client),
    }
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
    token = form_token(client, f"/jobs/{job_id}")
    response = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
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
    update_job(app, job_id, state=JobState.SUCCEEDED, video_key=Store.key(job_id, "video.mp4"))
    assert client.get(f"/jobs/{job_id}/video.mp4").status_code == 404


def test_the_status_page_shows_an_eta_once_steps_are_measured(
    app: Flask, client: FlaskClient
) -> None:
    """No ETA before a denoising step is done; then elapsed / progress x progress left."""
    from datetime import timedelta

    from svdfarm.models import Attempt
    from svdfarm.states import AttemptOutcome

    job_id = job_id_from(submit(client))
    started = utcnow() - timedelta(seconds=30)
    update_job(app, job_id, state=JobState.RUNNING, phase="denoising", step=0, progress=0.05)
    with app.extensions["svdfarm.db"].begin() as session:
        session.add(
            Attempt(
                job_id=uuid.UUID(job_id),
                number=1,
                worker="w1",
                plan_name="fp32 on cpu",
                plan={},
                started_at=started,
                outcome=AttemptOutcome.RUNNING,
            )
        )
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert body["eta_s"] is None and body["eta_text"] is None
    assert re.search(r'<p class="muted" id="eta"[^>]*></p>', client.get(f"/jobs/{job_id}").text)

    update_job(app, job_id, step=2, progress=0.25)
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert 89 <= body["eta_s"] <= 95  # 30 s for a quarter: about 90 s for the rest
    assert body["eta_text"] == "about 2 min left"
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert re.search(r'<p class="muted" id="eta" data-eta-s="[\d.]+">about 2 min left</p>', html)


def test_eta_text_reads_like_a_person_wrote_it() -> None:
    """Short ETAs in seconds, longer ones in minutes and hours; none when unknown."""
    from web.jobs import eta_text

    assert eta_text(None) is None
    assert eta_text(4) == "a few seconds left"
    assert eta_text(42) == "about 40 s left"
    assert eta_text(600) == "about 10 min left"
    assert eta_text(3 * 3600) == "about 3.0 h left"


def test_a_queued_job_says_why_it_waits(client: FlaskClient) -> None:
    """With no worker online, a queued job's page says which worker it needs."""
    job_id = job_id_from(submit(client))
    html = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert '<span id="phase">Waiting in the queue</span>' in html
    assert re.search(
        r'<p id="waiting">No worker online that can take it \(.+ is needed\)\.</p>', html
    )


def again_form(client: FlaskClient, job_id: str) -> str:
    """The form that the job's "Render again" link opens."""
    html = client.get(f"/jobs/{job_id}").text
    link = re.search(r'<a class="button secondary" id="again" href="([^"]+)"', html)
    assert link
    return client.get(link[1].replace("&amp;", "&")).text


def test_a_finished_job_offers_render_again_which_prefills_the_form(
    app: Flask, client: FlaskClient, settings: Settings, mp4_bytes: bytes
) -> None:
    """ "Render again" links to the form with the job's settings and its stored image (its
    thumbnail shown, a hidden ``again`` field), which a chosen file would replace."""
    job_id = job_id_from(submit(client, num_frames="6", seed="1234", precision="fp32"))
    finish_job(app, settings, job_id, mp4_bytes)
    form = again_form(client, job_id)
    assert re.search(r'<input id="num_frames" name="num_frames"[^>]*value="6"', form, re.DOTALL)
    assert re.search(r'<input id="seed" name="seed"[^>]*value="1234"', form, re.DOTALL)
    assert re.search(r'<option value="fp32"\s+selected>', form)
    assert 'id="again"' in form and "Its image is used again" in form
    assert f'<input type="hidden" name="again" value="{job_id}">' in form
    assert f'<img src="/jobs/{job_id}/input"' in form
    assert "<strong>in.png</strong>, the image of job" in form
    # The image is not required: the stored one is used unless a file is chosen.
    image = re.search(r'<input id="image"[^>]*>', form)
    assert image and "required" not in image[0]


def post_again(client: FlaskClient, job_id: str, image: Any = None, **fields: str) -> Any:
    """Submit the render-again form of ``job_id``, with a file (``(bytes, name)``) or none."""
    data: dict[str, Any] = {"csrf_token": form_token(client), "again": job_id, **fields}
    data["image"] = (io.BytesIO(image[0]), image[1]) if image else (io.BytesIO(b""), "")
    return client.post("/", data=data)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_render_again_copies_the_stored_image_or_takes_a_new_one(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """Without a chosen file the new job gets a copy of the first job's stored image (under
    its own id); with one, that file replaces it."""
    first = job_id_from(submit(client, num_frames="6"))
    stored = (settings.storage_dir / first / "input.png").read_bytes()

    again = post_again(client, first, num_frames="8")
    assert again.status_code == 303, again.text
    copy = job_id_from(again)
    assert copy != first
    assert (settings.storage_dir / copy / "input.png").read_bytes() == stored
    job = client.get(f"/api/v1/jobs/{copy}").get_json()
    assert (job["input_filename"], job["params"]["num_frames"]) == ("in.png", 8)

    other = png_bytes(64, 64, (0, 0, 255))
    replaced = job_id_from(post_again(client, first, (other, "blue.png")))
    assert (settings.storage_dir / replaced / "input.png").read_bytes() == other
    assert client.get(f"/api/v1/jobs/{replaced}").get_json()["input_filename"] == "blue.png"


def test_render_again_of_a_job_without_its_image_asks_for_one(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """A job whose files are gone, or an id no job has: the form asks for an image, nothing
    is recorded."""
    first = job_id_from(submit(client))
    FileStore(settings.storage_dir).delete_job(first)
    assert "Its image is no longer stored" in client.get(f"/?again={first}").text
    gone = post_again(client, first)
    assert gone.status_code == 400
    assert f"The image of job {first} is no longer stored: choose an image." in gone.text
    unknown = post_again(client, str(uuid.uuid4()))
    assert unknown.status_code == 400 and "does not exist any more" in unknown.text
    assert client.get("/jobs").text.count("data-job-id") == 1


def test_a_refused_render_again_keeps_offering_the_stored_image(client: FlaskClient) -> None:
    """A bad field on the render-again form: the errors, and the stored image still offered."""
    first = job_id_from(submit(client))
    refused = post_again(client, first, num_inference_steps="999")
    assert refused.status_code == 400
    html = refused.text
    assert "Steps must be between 1 and 200" in html
    assert f'<input type="hidden" name="again" value="{first}">' in html
    assert "Your settings and the stored image are kept below." in html


def test_width_and_height_step_by_64_with_the_models_sizes(
    client: FlaskClient, settings: Settings
) -> None:
    """Width and height step by 64 (the only sizes accepted); the size menu offers the tiny
    model's 64 x 64, and SVD's three sizes on a farm that runs SVD."""
    from web import create_app

    html = client.get("/").text
    for name in ("width", "height"):
        tag = re.search(rf'<input id="{name}"[^>]*>', html, re.DOTALL)
        assert tag and 'step="64"' in tag[0], tag
    assert re.findall(r'<option value="(\d+x\d+)">', html) == ["64x64"]
    assert "64 x 64 (square)" in html

    svd = create_app(
        {
            "SVDFARM_SETTINGS": settings.with_overrides(
                model="stabilityai/stable-video-diffusion-img2vid-xt"
            ),
            "TESTING": True,
        }
    )
    try:
        page = svd.test_client().get("/").text
    finally:
        svd.extensions["svdfarm.db"].dispose()
    assert re.findall(r'<option value="(\d+x\d+)">([^<]+)</option>', page) == [
        ("1024x576", "1024 x 576 (landscape)"),
        ("576x1024", "576 x 1024 (portrait)"),
        ("768x768", "768 x 768 (square)"),
    ]


def test_the_form_ignores_unknown_or_bad_prefill(client: FlaskClient) -> None:
    """Unknown names and a malformed job id in the query string change nothing."""
    html = client.get("/?again=nope&evil=1&num_frames=%22%3E").get_data(as_text=True)
    assert 'id="again"' not in html
    assert "evil" not in html
    assert 'value="&#34;&gt;"' in html  # shown escaped; the validator refuses it on submit


def test_my_jobs_lists_the_callers_jobs_newest_first(
    app: Flask, client: FlaskClient, settings: Settings, mp4_bytes: bytes
) -> None:
    """/jobs lists, from the database, this session's form jobs and the key-less API jobs of
    its address, newest first, with thumbnails; another session sees only the address's API
    jobs, another address nothing (web.owners)."""
    assert "have not submitted a job yet" in client.get("/jobs").get_data(as_text=True)
    first = job_id_from(submit(client))
    second = job_id_from(submit(client))
    FileStore(settings.storage_dir).write_bytes(Store.key(first, "poster.png"), png_bytes())
    finish_job(app, settings, first, mp4_bytes)
    update_job(app, first, poster_key=Store.key(first, "poster.png"))
    api = client.post("/api/v1/jobs", data={"image": (io.BytesIO(png_bytes()), "api.png")})
    assert api.status_code == 201
    api_id = api.get_json()["id"]

    html = client.get("/jobs").get_data(as_text=True)
    listed = re.findall(r'data-job-id="([0-9a-f-]{36})"', html)
    assert listed == [api_id, second, first]
    assert f'<img src="/jobs/{first}/poster.png"' in html
    assert f'<img src="/jobs/{second}/input"' in html
    other_session = app.test_client().get("/jobs").get_data(as_text=True)
    assert re.findall(r'data-job-id="([0-9a-f-]{36})"', other_session) == [api_id]
    elsewhere = app.test_client().get("/jobs", environ_base={"REMOTE_ADDR": "10.0.0.9"})
    assert elsewhere.get_data(as_text=True).count("data-job-id") == 0


def test_my_jobs_keeps_no_list_in_the_cookie(client: FlaskClient) -> None:
    """The session holds the browser's anonymous owner id, not a list of job ids: it does not
    grow with the jobs submitted."""
    job_id_from(submit(client))
    job_id_from(submit(client))
    with client.session_transaction() as session:
        assert session["anon"].startswith("anon:")
        assert set(session) <= {"anon", "csrf", "_permanent"}


def test_the_nav_links_admin_only_when_its_blueprint_exists(settings: Settings) -> None:
    """New video and My jobs always; Admin only where an ``admin.index`` endpoint exists."""
    from flask import Blueprint

    from web import create_app

    def nav(with_admin: bool) -> str:
        """The form page's nav of a fresh app, with or without an admin endpoint."""
        app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
        try:
            if not with_admin:
                app.view_functions.pop("admin.index", None)
            elif "admin.index" not in app.view_functions:
                admin = Blueprint("admin", __name__, url_prefix="/admin")
                admin.add_url_rule("/", "index", lambda: "admin")
                app.register_blueprint(admin)
            html = app.test_client().get("/").get_data(as_text=True)
        finally:
            app.extensions["svdfarm.db"].dispose()
        found = re.search(r"<nav[^>]*>(.*?)</nav>", html, re.DOTALL)
        assert found
        return re.sub(r"\s+", " ", found[1])

    plain = nav(with_admin=False)
    assert '<a href="/" aria-current="page">New video</a>' in plain
    assert re.search(r'<a href="/jobs"\s*>My jobs</a>', plain)
    assert "Admin" not in plain
    assert re.search(r'<a href="/admin/?"\s*>Admin</a>', nav(with_admin=True))


def test_the_favicon_is_a_small_icon(client: FlaskClient) -> None:
    """``/favicon.ico``, where browsers ask, is an icon (not a 404), and pages link it."""
    from PIL import Image

    with client.get("/favicon.ico") as response:
        assert response.status_code == 200
        assert response.mimetype == "image/vnd.microsoft.icon"
        assert len(response.data) < 10_000
        with Image.open(io.BytesIO(response.data)) as icon:
            assert icon.format == "ICO"
            assert (32, 32) in icon.info["sizes"]
    assert '<link rel="icon" href="/favicon.ico"' in client.get("/").text


@pytest.mark.parametrize(
    ("path", "status", "phrase"),
    [
        ("/no/such/page", 404, "404 Not Found"),
        (f"/jobs/{UNKNOWN_JOB_ID}", 404, "No job with id"),
        ("/jobs/not-a-uuid/cancel", 400, "security token is missing"),
    ],
)
def test_error_pages_are_the_sites_pages(
    client: FlaskClient, path: str, status: int, phrase: str
) -> None:
    """A 404 or 400 is a page of the site: its header, its styles, the reason and a way back."""
    response = client.post(path) if path.endswith("/cancel") else client.get(path)
    assert response.status_code == status
    assert response.mimetype == "text/html"
    html = response.text
    assert '<link rel="stylesheet" href="/static/style.css">' in html
    assert '<header class="top">' in html
    assert f'id="error-page" data-status="{status}"' in html
    assert phrase in html
    assert '<a href="/">Animate an image</a>' in html


def test_a_server_error_is_the_sites_page_without_the_exception(settings: Settings) -> None:
    """An unexpected exception answers the styled 500 page, which never shows its text."""
    from web import create_app

    app = create_app({"SVDFARM_SETTINGS": settings})  # not TESTING: errors are handled

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("secret detail at /srv/svdfarm/var")

    try:
        response = app.test_client().get("/boom")
    finally:
        app.extensions["svdfarm.db"].dispose()
    assert response.status_code == 500
    html = response.text
    assert "500 Internal Server Error" in html and 'id="error-page"' in html
    assert '<link rel="stylesheet" href="/static/style.css">' in html
    assert "secret detail" not in html and "/srv/" not in html


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("delete", "/", {"GET", "HEAD", "OPTIONS", "POST"}),
        ("get", "/jobs/{job}/cancel", {"OPTIONS", "POST"}),
        ("post", "/jobs/{job}/video.mp4", {"GET", "HEAD", "OPTIONS"}),
    ],
)
def test_a_405_page_names_the_allowed_methods(
    client: FlaskClient, method: str, path: str, allowed: set[str]
) -> None:
    """A method a page does not take: 405 with ``Allow``, on the site's error page."""
    response = getattr(client, method)(path.format(job=uuid.uuid4()))
    assert response.status_code == 405
    assert set(response.headers["Allow"].replace(" ", "").split(",")) == allowed
    assert 'id="error-page" data-status="405"' in response.text
