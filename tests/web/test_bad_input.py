"""A corpus of bad requests sent to the real app, through the API and the form: each is answered
with the exact 4xx expected and a message that names the problem, never a 5xx, and nothing is
written (no job row, no file under the data folder's jobs/, no queue message).

Client file names are never used as paths: hostile names (path traversal, NUL, right-to-left
override, 10,000 characters) are accepted, stored under ``<job id>/input.<type>``, and kept
as display text only.

One app per database serves the whole module (refusals write nothing, which each test checks
against a snapshot taken just before its request).
"""

from __future__ import annotations

import html
import io
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from svdfarm.db import upgrade
from svdfarm.models import Job, utcnow
from svdfarm.settings import Settings
from svdfarm.states import JobState
from tests.conftest import DATABASES, fresh_database, make_settings
from tests.factories import (
    gif_bytes,
    jpeg_bytes,
    noisy_png_bytes,
    png_bytes,
    png_header_bytes,
    truncated,
    webp_bytes,
)
from tests.http import form_token
from tests.rows import UNKNOWN_JOB_ID, job_count, load_job
from web import create_app

LIMIT = 65_536
NOT_AN_IMAGE = "not a PNG, JPEG or WebP image"
DAMAGED = "damaged or truncated"
CHOOSE = "Choose an image to animate"


def _encoded(mode: str, fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    """A real image of another type (BMP, TIFF, ICO): Pillow can write it, the farm refuses it."""
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, format=fmt)
    return buffer.getvalue()


def _broken_png() -> bytes:
    """A PNG whose compressed pixel data is overwritten: the header reads, decoding fails."""
    data = bytearray(png_bytes())
    start = data.index(b"IDAT") + 10
    data[start : start + 20] = bytes(20)
    return bytes(data)


@dataclass(frozen=True)
class Upload:
    """A multipart submission: fields, the image parts (data, file name), headers."""

    fields: dict[str, Any] = field(default_factory=dict)
    images: tuple[tuple[bytes, str], ...] = ((b"", ""),)
    headers: dict[str, str] = field(default_factory=dict)


def upload(data: bytes | None = None, name: str = "in.png", **fields: Any) -> Upload:
    """A submission with one image (a valid PNG unless ``data``), or none when ``data`` is b""
    and ``name`` is ""."""
    images = () if data == b"" and name == "" else ((png_bytes() if data is None else data, name),)
    return Upload(fields=fields, images=images)


#: (submission, status, a phrase of the message, the field it is about): sent to both the API
#: and the form.
REFUSED: list[Any] = [
    # wrong file types, checked by content whatever the name says
    pytest.param(
        upload(b"just some text\n", "picture.png"), 415, NOT_AN_IMAGE, "image", id="text-named-png"
    ),
    pytest.param(
        upload(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "doc.pdf"),
        415,
        NOT_AN_IMAGE,
        "image",
        id="pdf",
    ),
    pytest.param(upload(gif_bytes(), "anim.gif"), 415, NOT_AN_IMAGE, "image", id="gif"),
    pytest.param(
        upload(b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>', "v.svg"),
        415,
        NOT_AN_IMAGE,
        "image",
        id="svg",
    ),
    pytest.param(upload(_encoded("RGB", "BMP"), "b.bmp"), 415, NOT_AN_IMAGE, "image", id="bmp"),
    pytest.param(upload(_encoded("RGB", "TIFF"), "t.tif"), 415, NOT_AN_IMAGE, "image", id="tiff"),
    pytest.param(
        upload(_encoded("RGB", "ICO"), "favicon.ico"), 415, NOT_AN_IMAGE, "image", id="ico"
    ),
    pytest.param(
        upload(b"<html><body><script>alert(1)</script></body></html>", "x.png"),
        415,
        NOT_AN_IMAGE,
        "image",
        id="html-named-png",
    ),
    pytest.param(upload(b"PK\x03\x04" + bytes(200), "x.zip"), 415, NOT_AN_IMAGE, "image", id="zip"),
    pytest.param(
        upload(b"\x89PNG\r\n\x1a\n" + os.urandom(300), "sig.png"),
        415,
        NOT_AN_IMAGE,
        "image",
        id="png-signature-then-garbage",
    ),
    pytest.param(upload(b"", "empty.png"), 400, "The upload is empty", "image", id="empty-file"),
    # damaged, truncated, tiny and huge images
    pytest.param(
        upload(truncated(png_bytes(96, 64)), "cut.png"), 400, DAMAGED, "image", id="truncated-png"
    ),
    pytest.param(
        upload(truncated(jpeg_bytes(96, 64)), "cut.jpg"), 400, DAMAGED, "image", id="truncated-jpeg"
    ),
    pytest.param(
        upload(truncated(webp_bytes(96, 64)), "cut.webp"),
        400,
        DAMAGED,
        "image",
        id="truncated-webp",
    ),
    pytest.param(upload(_broken_png(), "broken.png"), 400, DAMAGED, "image", id="corrupt-png-data"),
    pytest.param(
        upload(png_bytes(8, 64), "thin.png"),
        400,
        "each side must be at least 16",
        "image",
        id="too-small",
    ),
    pytest.param(
        upload(png_header_bytes(20000, 20000), "bomb.png"),
        413,
        "40,000,000",
        "image",
        id="bomb-20000x20000",
    ),
    pytest.param(
        upload(png_header_bytes(200000, 1000), "wide.png"),
        413,
        "40,000,000",
        "image",
        id="bomb-200000x1000",
    ),
    pytest.param(
        upload(noisy_png_bytes(160, 160), "big.png"),
        413,
        "the limit is 65,536 bytes",
        "image",
        id="image-over-limit",
    ),
    # wrong types and out-of-range numbers
    pytest.param(
        upload(num_frames="abc"),
        400,
        "Frames must be a whole number, got 'abc'",
        "num_frames",
        id="frames-text",
    ),
    pytest.param(
        upload(num_frames="²"),
        400,
        "Frames must be a whole number",
        "num_frames",
        id="frames-superscript",
    ),
    pytest.param(
        upload(num_frames="4\x00"),
        400,
        "Frames must be a whole number",
        "num_frames",
        id="frames-nul",
    ),
    pytest.param(
        upload(num_frames="1"),
        400,
        "Frames must be between 2 and 128, got 1",
        "num_frames",
        id="frames-1",
    ),
    pytest.param(
        upload(num_inference_steps="1.5"),
        400,
        "Steps must be a whole number, got '1.5'",
        "num_inference_steps",
        id="steps-1.5",
    ),
    pytest.param(
        upload(num_inference_steps="201"),
        400,
        "Steps must be between 1 and 200",
        "num_inference_steps",
        id="steps-201",
    ),
    pytest.param(upload(seed="-1"), 400, "Seed must be between 0 and", "seed", id="seed-negative"),
    pytest.param(
        upload(seed=str(2**63)), 400, "Seed must be between 0 and", "seed", id="seed-2**63"
    ),
    pytest.param(
        upload(seed="9" * 5000), 400, "Seed must be a whole number", "seed", id="seed-5000-digits"
    ),
    pytest.param(upload(fps="0"), 400, "FPS must be between 1 and 60, got 0", "fps", id="fps-0"),
    pytest.param(
        upload(motion_bucket_id="1024"),
        400,
        "Motion must be between 0 and 1023, got 1024",
        "motion_bucket_id",
        id="motion-1024",
    ),
    pytest.param(
        upload(motion_bucket_id="-1"),
        400,
        "Motion must be between 0 and 1023, got -1",
        "motion_bucket_id",
        id="motion-negative",
    ),
    pytest.param(
        upload(noise_aug_strength="nan"),
        400,
        "Noise must be a number, got 'nan'",
        "noise_aug_strength",
        id="noise-nan",
    ),
    pytest.param(
        upload(noise_aug_strength="inf"),
        400,
        "Noise must be a number, got 'inf'",
        "noise_aug_strength",
        id="noise-inf",
    ),
    pytest.param(
        upload(noise_aug_strength="-0.5"),
        400,
        "Noise must be between 0 and 1, got -0.5",
        "noise_aug_strength",
        id="noise-negative",
    ),
    pytest.param(
        upload(decode_chunk_size="0"),
        400,
        "Decode chunk must be between 1 and 128, got 0",
        "decode_chunk_size",
        id="decode-chunk-0",
    ),
    pytest.param(
        upload(width="100", height="64"),
        400,
        "Width must be a multiple of 64, got 100",
        "width",
        id="width-not-multiple",
    ),
    pytest.param(
        upload(width="4096", height="4096"),
        400,
        "Width must be between 64 and 2048, got 4096",
        "width",
        id="size-too-big",
    ),
    pytest.param(
        upload(width="128"), 400, "Give both width and height", "height", id="width-without-height"
    ),
    pytest.param(
        upload(precision="fp8"),
        400,
        "Precision must be one of auto, bf16, fp16, fp32, got 'fp8'",
        "precision",
        id="precision-fp8",
    ),
    pytest.param(
        upload(
            num_frames="128", width="2048", height="2048", precision="fp32", decode_chunk_size="64"
        ),
        400,
        "largest worker class",
        "job",
        id="job-too-big-for-any-worker",
    ),
    # unknown or misspelled fields: refused, never ignored (frames=14 rendered the default 8)
    pytest.param(
        upload(frames="14"),
        400,
        "Unknown field 'frames' (did you mean num_frames?): the accepted fields are image, "
        "num_frames, num_inference_steps, fps, motion_bucket_id, noise_aug_strength, seed, "
        "decode_chunk_size, width, height, min_guidance_scale, max_guidance_scale, precision",
        "frames",
        id="misspelled-frames",
    ),
    pytest.param(
        upload(num_frames="4", Width="512", height="512"),
        400,
        "Unknown field 'Width' (did you mean width?)",
        "Width",
        id="field-in-the-wrong-case",
    ),
    pytest.param(
        upload(steps="10", guidance_scale="3"),
        400,
        "Unknown field 'guidance_scale' (did you mean min_guidance_scale?): the accepted "
        "fields are image, num_frames",
        "guidance_scale",
        id="two-unknown-fields",
    ),
    pytest.param(
        upload(**{"num_frames ": "4"}),
        400,
        "Unknown field 'num_frames ' (did you mean num_frames?)",
        "num_frames ",
        id="field-with-a-trailing-space",
    ),
    # missing pieces
    pytest.param(upload(b"", ""), 400, CHOOSE, "image", id="empty-form"),
    pytest.param(
        upload(b"", "", num_frames="8", precision="fp32"),
        400,
        CHOOSE,
        "image",
        id="fields-without-image",
    ),
    pytest.param(
        Upload(fields={"image": "not a file"}, images=()),
        400,
        CHOOSE,
        "image",
        id="image-as-text-field",
    ),
]

#: Refusals of a field or the image sent twice (the form takes several images as a batch).
REPEATED: list[Any] = [
    pytest.param(
        upload(num_frames=["4", "abc"]),
        400,
        "Frames was sent 2 times",
        "num_frames",
        id="field-repeated",
    ),
    pytest.param(
        Upload(images=((png_bytes(), "a.png"), (b"other", "b.png"))),
        400,
        "Send one image",
        "image",
        id="two-images",
    ),
]


#: The form takes several images as a batch: two images, the second not an image, are refused
#: whole, the bad one named.
REPEATED_ON_THE_FORM: list[Any] = [
    REPEATED[0],
    pytest.param(
        Upload(images=((png_bytes(), "a.png"), (b"other", "b.png"))),
        415,
        "Image 2 (b.png)",
        "image 2",
        id="two-images-one-bad",
    ),
]


@dataclass
class Farm:
    """The module's app on one database, its settings, a finished and a canceled job."""

    app: Flask
    settings: Settings
    finished: str
    canceled: str


@pytest.fixture(scope="module", params=DATABASES)
def farm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Farm]:
    """One app per database for the corpus: a 64 KB upload limit, no per-client limit."""
    tmp = tmp_path_factory.mktemp(f"bad-{request.param}")
    with fresh_database(request.param, tmp) as url:
        settings = make_settings(
            tmp / "var",
            url,
            tiny_model_dir,
            SVDFARM_MAX_UPLOAD_BYTES=str(LIMIT),
            SVDFARM_SUBMIT_RATE="0",
        )
        upgrade(settings.database_url)
        app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
        client = app.test_client()
        ids = [
            post_api(client, upload()).get_json()["id"],
            post_api(client, upload()).get_json()["id"],
        ]
        assert client.post(f"/api/v1/jobs/{ids[1]}/cancel").status_code == 202
        with app.extensions["svdfarm.db"].begin() as session:
            done = session.get(Job, uuid.UUID(ids[0]))
            assert done is not None
            done.state, done.phase, done.finished_at = JobState.SUCCEEDED, "done", utcnow()
        try:
            yield Farm(app, settings, ids[0], ids[1])
        finally:
            app.extensions["svdfarm.db"].dispose()


def snapshot(farm: Farm) -> tuple[int, list[str], list[str]]:
    """What a request could write: job rows, files under jobs/, queued messages."""
    files = sorted(
        str(p.relative_to(farm.settings.storage_dir)) for p in farm.settings.storage_dir.rglob("*")
    )
    queue = sorted(p.name for p in (farm.settings.broker_dir / "queue").iterdir())
    return job_count(farm.app), files, queue


def _multipart(sent: Upload) -> dict[str, Any]:
    """The test client's form data for a submission."""
    data: dict[str, Any] = dict(sent.fields)
    if sent.images:
        data["image"] = [(io.BytesIO(content), name) for content, name in sent.images]
    return data


def post_api(client: FlaskClient, sent: Upload) -> Any:
    """POST a submission to the API."""
    return client.post(
        "/api/v1/jobs",
        data=_multipart(sent),
        headers=sent.headers,
        content_type="multipart/form-data",
    )


def post_form(client: FlaskClient, sent: Upload) -> Any:
    """POST a submission through the form, with the page's CSRF token."""
    data = {**_multipart(sent), "csrf_token": form_token(client)}
    return client.post("/", data=data, content_type="multipart/form-data")


def message_of(response: Any) -> str:
    """The refusal's text: the API's ``error`` and ``fields``, or the form page's text."""
    if response.is_json:
        body = response.get_json()
        return " ".join([body["error"], *body.get("fields", {}).values()])
    return html.unescape(response.get_data(as_text=True))


def assert_refused(farm: Farm, send: Callable[[], Any], status: int, phrase: str) -> Any:
    """Send a request; it must get ``status`` with ``phrase`` in its message, and write nothing."""
    before = snapshot(farm)
    response = send()
    assert response.status_code == status, message_of(response)[:500]
    assert phrase in message_of(response)
    assert snapshot(farm) == before
    return response


@pytest.mark.parametrize(("sent", "status", "phrase", "name"), REFUSED)
def test_the_api_refuses(farm: Farm, sent: Upload, status: int, phrase: str, name: str) -> None:
    """The API answers the exact status, with the problem named under its field."""
    response = assert_refused(farm, lambda: post_api(farm.app.test_client(), sent), status, phrase)
    assert response.is_json
    assert name in response.get_json()["fields"]


@pytest.mark.parametrize(("sent", "status", "phrase", "name"), REFUSED)
def test_the_form_refuses(farm: Farm, sent: Upload, status: int, phrase: str, name: str) -> None:
    """The form answers the same status, and shows the message on the page."""
    client = farm.app.test_client()
    response = assert_refused(farm, lambda: post_form(client, sent), status, phrase)
    assert response.mimetype == "text/html"
    assert 'class="alert"' in response.get_data(as_text=True)


@pytest.mark.parametrize(("sent", "status", "phrase", "name"), REPEATED_ON_THE_FORM)
def test_the_form_refuses_repeated_fields(
    farm: Farm, sent: Upload, status: int, phrase: str, name: str
) -> None:
    """A field or the image sent twice is refused rather than one copy silently chosen."""
    client = farm.app.test_client()
    assert_refused(farm, lambda: post_form(client, sent), status, phrase)


@pytest.mark.parametrize(("sent", "status", "phrase", "name"), REPEATED)
def test_the_api_refuses_repeated_fields(
    farm: Farm, sent: Upload, status: int, phrase: str, name: str
) -> None:
    """The API refuses a field or the image sent twice, as the form does."""
    assert_refused(farm, lambda: post_api(farm.app.test_client(), sent), status, phrase)


def _raw(body: bytes, content_type: str, **headers: str) -> Callable[[FlaskClient], Any]:
    """A POST to the API with a body built by hand."""

    def send(client: FlaskClient) -> Any:
        return client.post("/api/v1/jobs", data=body, content_type=content_type, headers=headers)

    return send


def _many_parts(count: int) -> bytes:
    """A multipart body of ``count`` empty fields: far under the size limit, over Flask's
    1,000 parts."""
    part = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\n\r\n'
    return part * count + b"--b--\r\n"


UNKNOWN = UNKNOWN_JOB_ID
_HEADER_START = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'

#: (how to send it, status, phrase): requests only the API gets.
API_ONLY: list[Any] = [
    pytest.param(
        lambda c: c.post("/api/v1/jobs", json={"image": "aGk=", "num_frames": 4}),
        415,
        "The API takes multipart/form-data",
        id="json-body",
    ),
    pytest.param(
        lambda c: c.post("/api/v1/jobs", data={"num_frames": "4"}),
        400,
        CHOOSE,
        id="urlencoded-body",
    ),
    pytest.param(_raw(b"xx", "multipart/form-data"), 400, CHOOSE, id="multipart-without-boundary"),
    pytest.param(
        _raw(b"garbage\r\n", "multipart/form-data; boundary=b"), 400, CHOOSE, id="multipart-garbage"
    ),
    pytest.param(
        _raw(
            _HEADER_START + b"Content-Type: image/png\r\n\r\n" + png_bytes(),
            "multipart/form-data; boundary=b",
        ),
        400,
        CHOOSE,
        id="multipart-unterminated",
        # werkzeug drops the unfinished part's spooled file without closing it (its leak, freed
        # by the garbage collector): not ours to fix, so its ResourceWarning is let through.
        marks=pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    ),
    pytest.param(
        lambda c: c.post(
            "/api/v1/jobs", data={"image": (io.BytesIO(os.urandom(2 * LIMIT + 1)), "a.png")}
        ),
        413,
        "larger than the 65,536 bytes limit",
        id="body-over-limit",
    ),
    pytest.param(
        _raw(_many_parts(1001), "multipart/form-data; boundary=b"),
        413,
        "more than 1,000 parts",
        id="too-many-parts",
    ),
    pytest.param(
        lambda c: post_api(
            c,
            Upload(
                fields={}, images=((png_bytes(), "a.png"),), headers={"Idempotency-Key": "k" * 256}
            ),
        ),
        400,
        "Idempotency-Key header must be 1 to 255",
        id="idempotency-key-too-long",
    ),
    pytest.param(
        lambda c: post_api(
            c,
            Upload(fields={}, images=((png_bytes(), "a.png"),), headers={"Idempotency-Key": "clé"}),
        ),
        400,
        "printable ASCII",
        id="idempotency-key-not-ascii",
    ),
    pytest.param(
        lambda c: post_api(c, upload(csrf_token="abc")),
        400,
        "Unknown field 'csrf_token'",
        id="csrf-token-sent-to-the-api",
    ),
    pytest.param(
        lambda c: c.post(
            "/api/v1/jobs",
            data={
                "image": (io.BytesIO(png_bytes()), "a.png"),
                "video": (io.BytesIO(b"x"), "v.mp4"),
            },
        ),
        400,
        "Unknown field 'video'",
        id="unknown-file-part",
    ),
    pytest.param(
        lambda c: c.post(
            "/api/v1/jobs",
            data={"image": (io.BytesIO(png_bytes()), "a.png"), **{f"f{i}": "1" for i in range(50)}},
        ),
        400,
        "Unknown field 'f9'",
        id="fifty-unknown-fields",
    ),
    pytest.param(lambda c: c.put("/api/v1/jobs"), 405, "method is not allowed", id="put-jobs"),
    pytest.param(
        lambda c: c.delete(f"/api/v1/jobs/{UNKNOWN}"), 405, "method is not allowed", id="delete-job"
    ),
    pytest.param(
        lambda c: c.get("/api/v1/jobs/not-a-uuid"), 404, "job ids are UUIDs", id="get-not-a-uuid"
    ),
    pytest.param(
        lambda c: c.get(f"/api/v1/jobs/{UNKNOWN}"),
        404,
        f"No job with id {UNKNOWN}",
        id="get-unknown-uuid",
    ),
    pytest.param(
        lambda c: c.get("/api/v1/jobs/..%2F..%2Fsecret_key"), 404, "not found", id="get-dotdot"
    ),
    pytest.param(
        lambda c: c.get("/api/v1/jobs/" + "a" * 10000),
        404,
        "job ids are UUIDs",
        id="get-10000-char-id",
    ),
    pytest.param(
        lambda c: c.get("/api/v1/jobs/%E2%80%AEfdp"), 404, "job ids are UUIDs", id="get-rtl-id"
    ),
    pytest.param(
        lambda c: c.post("/api/v1/jobs/not-a-uuid/cancel"),
        404,
        "job ids are UUIDs",
        id="cancel-not-a-uuid",
    ),
    pytest.param(
        lambda c: c.post(f"/api/v1/jobs/{UNKNOWN}/cancel"),
        404,
        f"No job with id {UNKNOWN}",
        id="cancel-unknown-uuid",
    ),
    pytest.param(lambda c: c.get("/api/v1/nothing-here"), 404, "not found", id="unknown-api-route"),
]


@pytest.mark.parametrize(("send", "status", "phrase"), API_ONLY)
def test_the_api_refuses_bad_requests(
    farm: Farm, send: Callable[[FlaskClient], Any], status: int, phrase: str
) -> None:
    """Wrong bodies, methods and ids: the exact status, a JSON error that says why."""
    client = farm.app.test_client()
    with assert_refused(farm, lambda: send(client), status, phrase) as response:
        assert response.is_json


def test_unknown_fields_are_named_at_most_ten_at_a_time(farm: Farm) -> None:
    """Fifty unknown fields: the answer names ten of them, not fifty lists of fields."""
    fields = {f"f{i}": "1" for i in range(50)}
    response = post_api(farm.app.test_client(), upload(**fields))
    assert response.status_code == 400
    assert list(response.get_json()["fields"]) == [f"f{i}" for i in range(10)]


def test_the_form_takes_its_own_fields_and_no_other(farm: Farm) -> None:
    """The form's csrf_token and again are its own; an unknown field is refused by name."""
    client = farm.app.test_client()
    response = assert_refused(
        farm, lambda: post_form(client, upload(frames="14", again="")), 400, "Unknown field"
    )
    html = message_of(response)
    assert "Unknown field 'frames' (did you mean num_frames?)" in html
    assert "Unknown field 'again'" not in html and "Unknown field 'csrf_token'" not in html


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("put", "/api/v1/jobs", {"GET", "HEAD", "OPTIONS", "POST"}),
        ("delete", f"/api/v1/jobs/{UNKNOWN}", {"GET", "HEAD", "OPTIONS"}),
        ("put", f"/api/v1/jobs/{UNKNOWN}/cancel", {"OPTIONS", "POST"}),
    ],
)
def test_a_405_names_the_allowed_methods(
    farm: Farm, method: str, path: str, allowed: set[str]
) -> None:
    """405 from the API carries ``Allow`` (RFC 9110 requires it), with its JSON error."""
    response = getattr(farm.app.test_client(), method)(path)
    assert response.status_code == 405
    assert set(response.headers["Allow"].replace(" ", "").split(",")) == allowed
    assert "method is not allowed" in response.get_json()["error"]


@pytest.mark.parametrize("which", ["finished", "canceled"])
def test_canceling_an_ended_job_is_a_conflict(farm: Farm, which: str) -> None:
    """Cancel of a job that has ended: 409 that names its state; the job is unchanged."""
    job_id = getattr(farm, which)
    state = {"finished": "succeeded", "canceled": "canceled"}[which]
    client = farm.app.test_client()
    assert_refused(
        farm, lambda: client.post(f"/api/v1/jobs/{job_id}/cancel"), 409, f"already {state}"
    )
    assert load_job(farm.app, job_id).state.value == state


@pytest.mark.parametrize(
    "path",
    [
        "/jobs/not-a-uuid",
        f"/jobs/{UNKNOWN}",
        f"/jobs/{UNKNOWN}/video.mp4",
        f"/jobs/{UNKNOWN}/poster.png",
        f"/jobs/{UNKNOWN}/input",
        "/jobs/..%2F..%2Fsecret_key/input",
        "/jobs/%00/video.mp4",
    ],
)
def test_the_pages_answer_unknown_jobs_404(farm: Farm, path: str) -> None:
    """Page and file URLs of jobs that do not exist: a 404 page, nothing served."""
    client = farm.app.test_client()
    with assert_refused(farm, lambda: client.get(path), 404, "Not Found") as response:
        assert response.mimetype == "text/html"


def test_canceling_an_unknown_job_from_the_page_is_404(farm: Farm) -> None:
    """The status page's cancel, with a valid token, on an unknown job: 404."""
    client = farm.app.test_client()
    token = form_token(client)
    assert_refused(
        farm,
        lambda: client.post(f"/jobs/{UNKNOWN}/cancel", data={"csrf_token": token}),
        404,
        f"No job with id {UNKNOWN}",
    )


#: Hostile client file names: accepted (the name is never a path), stored under the job's id.
NAMES: list[Any] = [
    pytest.param("../../etc/passwd.png", id="dotdot-slash"),
    pytest.param("..\\..\\windows\\x.png", id="dotdot-backslash"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("a\x00b.png", id="nul"),
    pytest.param("a\x1b[31mred\x07.png", id="terminal-escapes"),
    pytest.param("gpj.\u202eevil.png", id="rtl-override"),
    pytest.param("猫 🐱 تصوير.png", id="unicode"),
    pytest.param("x" * 10_000 + ".png", id="10000-chars"),
    pytest.param("video.mp4", id="our-own-file-name"),
    pytest.param('quote".png', id="quote"),
]


def data_paths(farm: Farm) -> set[Path]:
    """Every path under the data folder (the tiny model's link not followed into)."""
    models = farm.settings.models_dir
    return {p for p in farm.settings.data_dir.rglob("*") if not p.is_relative_to(models)}


@pytest.mark.parametrize("target", ["api", "form"])
@pytest.mark.parametrize("name", NAMES)
def test_hostile_file_names_are_stored_under_generated_names(
    request: pytest.FixtureRequest, farm: Farm, name: str, target: str
) -> None:
    """The job is created; the only paths it adds under the data folder are its folder, its
    ``input.png`` and its queue message; the name is kept, printable and at most 255
    characters, as display text."""
    client = farm.app.test_client()
    before, jobs = data_paths(farm), job_count(farm.app)
    sent = upload(png_bytes(), name)
    if target == "api":
        response = post_api(client, sent)
        assert response.status_code == 201, message_of(response)[:300]
        job_id = response.get_json()["id"]
    else:
        response = post_form(client, sent)
        assert response.status_code == 303, message_of(response)[:300]
        job_id = response.headers["Location"].rsplit("/", 1)[-1]
    assert job_count(farm.app) == jobs + 1
    queue = farm.settings.broker_dir / "queue"
    added = {p for p in data_paths(farm) - before if p.parent != queue}
    assert len([p for p in data_paths(farm) - before if p.parent == queue]) == 1
    job_dir = farm.settings.storage_dir / job_id
    assert added == {job_dir, job_dir / "input.png"}
    job = load_job(farm.app, job_id)
    assert job.input_key == f"{job_id}/input.png"
    assert job.input_filename.isprintable() and len(job.input_filename) <= 255
    if "\\" not in name and '"' not in name:  # multipart quoting rewrites those two
        assert job.input_filename == "".join(c for c in name if c.isprintable())[:255]
