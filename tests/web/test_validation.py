"""Refused requests, through the API and the form: the right 4xx, a clear message beside the
field, the typed values kept, and nothing written or enqueued.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from markupsafe import escape

from svdfarm.db import upgrade
from svdfarm.params import FIELDS
from svdfarm.settings import Settings
from tests.conftest import DATABASES, make_settings
from tests.factories import (
    gif_bytes,
    jpeg_bytes,
    noisy_png_bytes,
    png_bytes,
    png_header_bytes,
    truncated,
)
from tests.http import form_token
from tests.rows import job_count
from web import create_app

SMALL_LIMIT = 2048


def _outside(name: str) -> list[str]:
    """Form values just below the minimum and just above the maximum of a field."""
    field = FIELDS[name]
    step = 1 if field.kind is int else 0.01
    return [str(field.kind(field.minimum - step)), str(field.kind(field.maximum + step))]


def _with_other_side(name: str, value: str) -> dict[str, str]:
    """``{name: value}``, plus a valid other side when ``name`` is width or height."""
    other = {"width": "height", "height": "width"}.get(name)
    return {name: value, other: "64"} if other else {name: value}


#: (fields sent, the field the error is on, a phrase of its message)
BAD_FIELDS: list[Any] = [
    pytest.param(_with_other_side(name, value), name, "between", id=f"{name}={value}")
    for name in FIELDS
    for value in _outside(name)
] + [
    pytest.param({"num_frames": "abc"}, "num_frames", "whole number", id="text-for-int"),
    pytest.param({"num_frames": "8.5"}, "num_frames", "whole number", id="float-for-int"),
    pytest.param({"seed": "12.0"}, "seed", "whole number", id="float-seed"),
    pytest.param({"noise_aug_strength": "nan"}, "noise_aug_strength", "a number", id="nan"),
    pytest.param({"noise_aug_strength": "inf"}, "noise_aug_strength", "a number", id="inf"),
    pytest.param({"noise_aug_strength": "-inf"}, "noise_aug_strength", "a number", id="-inf"),
    pytest.param({"noise_aug_strength": "lots"}, "noise_aug_strength", "a number", id="text"),
    pytest.param({"width": "128"}, "height", "both", id="width-without-height"),
    pytest.param({"height": "128"}, "width", "both", id="height-without-width"),
    pytest.param({"width": "100", "height": "64"}, "width", "multiple of 64", id="width-100"),
    pytest.param({"width": "64", "height": "200"}, "height", "multiple of 64", id="height-200"),
    pytest.param({"precision": "fp8"}, "precision", "one of", id="precision-fp8"),
    pytest.param({"precision": "<b>x</b>"}, "precision", "one of", id="precision-html"),
]

DAMAGED = "damaged|truncated"

#: (upload bytes, file name, status, a phrase of the message); None means no file part at all.
BAD_UPLOADS: list[Any] = [
    pytest.param(b"just some text\n", "picture.png", 415, "PNG, JPEG or WebP", id="text-as-png"),
    pytest.param(gif_bytes(), "anim.gif", 415, "PNG, JPEG or WebP", id="gif"),
    pytest.param(truncated(png_bytes(96, 64)), "cut.png", 400, DAMAGED, id="truncated-png"),
    pytest.param(truncated(jpeg_bytes(96, 64)), "cut.jpg", 400, DAMAGED, id="truncated-jpeg"),
    pytest.param(b"", "empty.png", 400, "empty", id="empty"),
    pytest.param(None, "", 400, "Choose an image", id="no-file"),
    pytest.param(png_bytes(12, 64), "thin.png", 400, "at least 16", id="too-small"),
    pytest.param(png_header_bytes(20000, 20000), "bomb.png", 413, "40,000,000", id="bomb"),
]


def assert_nothing_written(app: Flask, settings: Settings) -> None:
    """No job row, no stored file, no queued message."""
    assert job_count(app) == 0
    assert [p for p in settings.storage_dir.rglob("*")] == []
    assert list((settings.broker_dir / "queue").iterdir()) == []


def multipart(data: bytes | None, filename: str, fields: dict[str, str]) -> dict[str, Any]:
    """A multipart body: the fields, and the image part unless ``data`` is None."""
    body: dict[str, Any] = dict(fields)
    if data is not None:
        body["image"] = (io.BytesIO(data), filename)
    return body


def post_api(client: FlaskClient, data: bytes | None, filename: str = "in.png", **f: str) -> Any:
    """POST to the API."""
    return client.post("/api/v1/jobs", data=multipart(data, filename, f))


def post_form(client: FlaskClient, data: bytes | None, filename: str = "in.png", **f: str) -> Any:
    """POST the form with the page's CSRF token."""
    return client.post("/", data={**multipart(data, filename, f), "csrf_token": form_token(client)})


def field_block(html: str, name: str) -> str:
    """The form's block for one field: its label, input, help and error, nothing else."""
    blocks = [b for b in html.split('<div class="field') if f'id="{name}"' in b]
    assert len(blocks) == 1, f"no single block for field {name!r}"
    return blocks[0]


def errors_shown(html: str) -> list[str]:
    """The text of every error paragraph on the page."""
    return re.findall(r'<p class="error"[^>]*>(.*?)</p>', html, re.DOTALL)


@pytest.fixture
def small_settings(tmp_path: Path, database_url: str, tiny_model_dir: Path) -> Settings:
    """Settings with a 2 KB upload limit, on a migrated database."""
    result = make_settings(
        tmp_path / "small", database_url, tiny_model_dir, SVDFARM_MAX_UPLOAD_BYTES=str(SMALL_LIMIT)
    )
    upgrade(result.database_url)
    return result


@pytest.fixture
def small_app(small_settings: Settings) -> Iterator[Flask]:
    """The app with a 2 KB upload limit."""
    flask_app = create_app({"SVDFARM_SETTINGS": small_settings, "TESTING": True})
    yield flask_app
    flask_app.extensions["svdfarm.db"].dispose()


@pytest.mark.parametrize(("fields", "bad", "phrase"), BAD_FIELDS)
def test_each_bad_field_is_refused_by_api_and_form(
    app: Flask,
    client: FlaskClient,
    settings: Settings,
    fields: dict[str, str],
    bad: str,
    phrase: str,
) -> None:
    """API: 400 JSON whose "fields" names exactly the bad field. Form: 400, the same message
    beside that field, the typed values kept. Nothing written either way.
    """
    response = post_api(client, png_bytes(), **fields)
    assert response.status_code == 400
    body = response.get_json()
    assert set(body["fields"]) == {bad}
    message = body["fields"][bad]
    assert phrase in message
    assert message in body["error"]
    assert_nothing_written(app, settings)

    companion = {"motion_bucket_id": "200"} if "motion_bucket_id" not in fields else {"fps": "9"}
    response = post_form(client, png_bytes(), **fields, **companion)
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    block = field_block(html, bad)
    assert errors_shown(block) == [str(escape(message))]
    assert errors_shown(html).count(str(escape(message))) == 1
    for name, value in {**fields, **companion}.items():
        if name != "precision":
            assert f'value="{escape(value)}"' in field_block(html, name)
    assert "<b>x</b>" not in html
    assert_nothing_written(app, settings)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_api_reports_every_bad_field_at_once(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """Several bad fields and a bad image: one 4xx listing all of them; nothing written."""
    fields = {"num_frames": "0", "fps": "x", "width": "128", "precision": "fp4"}
    response = post_api(client, b"not an image", **fields)
    assert response.status_code == 415
    body = response.get_json()
    assert set(body["fields"]) == {"image", "num_frames", "fps", "height", "precision"}
    for message in body["fields"].values():
        assert message in body["error"]
    assert_nothing_written(app, settings)


@pytest.mark.parametrize(("data", "filename", "status", "phrase"), BAD_UPLOADS)
def test_bad_uploads_are_refused_by_api_and_form(
    app: Flask,
    client: FlaskClient,
    settings: Settings,
    data: bytes | None,
    filename: str,
    status: int,
    phrase: str,
) -> None:
    """Not an image, damaged, empty, missing, too small or a bomb: the right 4xx as JSON from
    the API, and on the form beside the image input with the typed values kept.
    """
    response = post_api(client, data, filename, num_frames="8")
    assert response.status_code == status
    body = response.get_json()
    assert set(body["fields"]) == {"image"}
    message = body["fields"]["image"]
    assert re.search(phrase, message, re.IGNORECASE), body
    assert message in body["error"]
    assert_nothing_written(app, settings)

    response = post_form(client, data, filename, num_frames="9", seed="5")
    assert response.status_code == status
    html = response.get_data(as_text=True)
    assert errors_shown(field_block(html, "image")) == [str(escape(message))]
    assert 'value="9"' in field_block(html, "num_frames")
    assert 'value="5"' in field_block(html, "seed")
    assert_nothing_written(app, settings)


def test_form_without_a_chosen_file_asks_for_one(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """A browser that sends the file input empty (no name, no bytes) is asked for an image."""
    response = post_form(client, b"", "")
    assert response.status_code == 400
    assert "Choose an image" in field_block(response.get_data(as_text=True), "image")
    assert_nothing_written(app, settings)


def test_a_bomb_is_refused_before_decoding(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """A 20000 x 20000 PNG header in a tiny file is refused at once, naming the pixel limit."""
    bomb = png_header_bytes(20000, 20000)
    assert len(bomb) < 200
    start = time.perf_counter()
    response = post_api(client, bomb, "bomb.png")
    elapsed = time.perf_counter() - start
    assert response.status_code == 413
    message = response.get_json()["fields"]["image"]
    assert "pixels" in message
    assert f"{settings.max_image_pixels:,}" in message
    assert elapsed < 1.0
    assert_nothing_written(app, settings)


def test_a_body_over_the_request_limit_is_413(small_app: Flask, small_settings: Settings) -> None:
    """A request body over Flask's limit is 413 JSON from the API and 413 on the form."""
    client = small_app.test_client()
    big = noisy_png_bytes(160, 160)
    assert len(big) > small_app.config["MAX_CONTENT_LENGTH"]
    api = post_api(client, big, "big.png")
    assert api.status_code == 413
    assert api.is_json
    assert "limit" in api.get_json()["error"]
    form = post_form(client, big, "big.png")
    assert form.status_code == 413
    assert "limit" in "".join(errors_shown(field_block(form.get_data(as_text=True), "image")))
    assert_nothing_written(small_app, small_settings)


def test_a_file_over_the_image_limit_is_413(small_app: Flask, small_settings: Settings) -> None:
    """A file over SVDFARM_MAX_UPLOAD_BYTES in a body Flask accepts is 413 on the image field."""
    client = small_app.test_client()
    image = noisy_png_bytes(32, 32)
    assert SMALL_LIMIT < len(image) < small_app.config["MAX_CONTENT_LENGTH"]
    api = post_api(client, image, "big.png")
    assert api.status_code == 413
    assert set(api.get_json()["fields"]) == {"image"}
    assert "limit" in api.get_json()["fields"]["image"]
    form = post_form(client, image, "big.png", fps="9")
    assert form.status_code == 413
    html = form.get_data(as_text=True)
    assert "limit" in "".join(errors_shown(field_block(html, "image")))
    assert 'value="9"' in field_block(html, "fps")
    assert_nothing_written(small_app, small_settings)


def test_an_image_within_a_small_limit_is_accepted(
    small_app: Flask, small_settings: Settings
) -> None:
    """Under the 2 KB limit the same farm accepts an image: the limits refuse only what is over."""
    image = png_bytes(32, 32)
    assert len(image) <= SMALL_LIMIT
    assert post_api(small_app.test_client(), image).status_code == 201
    assert job_count(small_app) == 1


def _states_the_limit(message: str, limit: int) -> bool:
    """True when ``message`` states ``limit`` bytes in some readable unit (within 5%)."""
    units = {"bytes": 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024**2, "mib": 1024**2}
    found = re.findall(r"(\d[\d,]*(?:\.\d+)?)\s*(bytes|KiB|KB|kB|MiB|MB|B)\b", message)
    return any(
        abs(float(number.replace(",", "")) * units[unit.lower()] - limit) <= 0.05 * limit
        for number, unit in found
    )


def test_too_large_messages_state_the_limit(small_app: Flask) -> None:
    """Both 413 messages state the real limit (2,048 bytes), not "the 0.0 MB limit"."""
    client = small_app.test_client()
    over_body = post_api(client, noisy_png_bytes(160, 160)).get_json()["error"]
    over_image = post_api(client, noisy_png_bytes(32, 32)).get_json()["fields"]["image"]
    assert _states_the_limit(over_body, SMALL_LIMIT), over_body
    assert _states_the_limit(over_image, SMALL_LIMIT), over_image
