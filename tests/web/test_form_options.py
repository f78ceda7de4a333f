"""The form's advanced section (guidance) and its outputs (formats, loop), and the status
page and "render again" that show and copy them."""

from __future__ import annotations

import io
import re
from typing import Any

from flask import Flask, url_for
from flask.testing import FlaskClient

from svdfarm.params import FIELDS
from tests.factories import png_bytes
from tests.http import form_token, job_id_from
from tests.rows import load_job
from web.pages import again_params


def submit(client: FlaskClient, **fields: Any) -> Any:
    """POST the form with a valid image and the page's CSRF token."""
    data: dict[str, Any] = {
        "image": (io.BytesIO(png_bytes()), "in.png"),
        "csrf_token": form_token(client),
        **fields,
    }
    return client.post("/", data=data)


def test_guidance_is_in_the_advanced_section_and_the_outputs_are_boxes(
    client: FlaskClient,
) -> None:
    """Min and max guidance sit in a closed "Advanced" section with their ranges and defaults;
    each output format is a checkbox (the MP4 ticked and fixed); loop is a checkbox."""
    html = client.get("/").text
    advanced = re.search(r'<details class="advanced" id="advanced"\s*>(.*?)</details>', html, re.S)
    assert advanced, "a closed Advanced section"
    for name, value in (("min_guidance_scale", "1.0"), ("max_guidance_scale", "3.0")):
        tag = re.search(rf'<input id="{name}" name="{name}" type="number"[^>]*>', advanced[1])
        assert tag, name
        assert f'max="{FIELDS[name].maximum}"' in tag[0] and f'value="{value}"' in tag[0]
    basic = html[: advanced.start()]
    assert 'id="num_frames"' in basic and "min_guidance_scale" not in basic
    boxes = re.findall(r'<input type="checkbox" name="output_formats" value="(\w+)"[^>]*>', html)
    assert boxes == ["mp4", "webm", "gif", "frames"]
    mp4 = re.search(r'<input type="checkbox" name="output_formats" value="mp4"[^>]*>', html)
    assert mp4 and "checked" in mp4[0] and "disabled" in mp4[0]
    assert re.search(r'<input type="checkbox" name="loop" value="true" id="loop"\s*>', html)


def test_ticked_formats_loop_and_guidance_make_the_job(app: Flask, client: FlaskClient) -> None:
    """Two boxes ticked are one list of formats; loop and guidance are the job's."""
    response = submit(
        client,
        output_formats=["gif", "webm"],
        loop="true",
        min_guidance_scale="2",
        max_guidance_scale="4.5",
    )
    assert response.status_code == 303, response.text
    job = load_job(app, job_id_from(response))
    assert (job.output_formats, job.loop) == ("mp4,webm,gif", True)
    assert (job.min_guidance_scale, job.max_guidance_scale) == (2.0, 4.5)
    page = client.get(f"/jobs/{job.id}").text
    assert re.search(r'<dt title="min_guidance_scale">Min guidance</dt><dd>2.0</dd>', page)
    assert re.search(r'<dt title="max_guidance_scale">Max guidance</dt><dd>4.5</dd>', page)
    assert re.search(r'<dt title="output_formats">Outputs</dt><dd>mp4,webm,gif</dd>', page)
    assert re.search(r'<dt title="loop">Loop</dt><dd>True</dd>', page)


def test_min_above_max_is_shown_beside_max_with_advanced_open(
    app: Flask, client: FlaskClient
) -> None:
    """Both bounds given the wrong way round: 400, the message beside max guidance, the
    section open and the values kept; nothing is recorded."""
    response = submit(client, min_guidance_scale="5", max_guidance_scale="2")
    assert response.status_code == 400
    html = response.text
    assert re.search(r'<details class="advanced" id="advanced"\s+open>', html)
    assert (
        '<p class="error" id="max_guidance_scale-error">Max guidance must be at least min '
        "guidance (5), got 2.</p>" in html
    )
    assert re.search(r'<input id="min_guidance_scale"[^>]*value="5"', html)


def test_an_unknown_format_is_refused_on_the_form(client: FlaskClient) -> None:
    """A format the farm does not make (a crafted form) is refused with the known ones."""
    response = submit(client, output_formats="avi")
    assert response.status_code == 400
    assert "Output formats must be among mp4, webm, gif, frames" in response.text


def test_render_again_copies_formats_loop_and_guidance(app: Flask, client: FlaskClient) -> None:
    """The "render again" link prefills the boxes, the loop and both guidance scales."""
    job_id = job_id_from(submit(client, output_formats="frames", loop="on", max_guidance_scale="6"))
    with app.test_request_context():
        link = url_for("pages.index", again=job_id, **again_params(load_job(app, job_id).params()))
    assert "loop=true" in link
    form = client.get(link).text
    assert re.search(r'value="frames" id="output-frames"\s+checked', form)
    assert not re.search(r'value="webm" id="output-webm"\s+checked', form)
    assert re.search(r'id="loop"\s+checked', form)
    assert re.search(r'<input id="max_guidance_scale"[^>]*value="6.0"', form)


def test_a_webhook_url_from_the_form(app: Flask, client: FlaskClient) -> None:
    """The Advanced section's webhook URL is kept on the job; one pointing at an internal
    address is refused beside its field, the section open and the value kept."""
    refused = submit(client, webhook_url="http://10.0.0.5/hook")
    assert refused.status_code == 400
    assert re.search(r'<details class="advanced" id="advanced"\s+open>', refused.text)
    assert 'id="webhook_url-error"' in refused.text
    assert re.search(r'<input id="webhook_url"[^>]*value="http://10.0.0.5/hook"', refused.text)
    response = submit(client, webhook_url="https://example.com/hook")
    assert response.status_code == 303, response.text
    job = load_job(app, job_id_from(response))
    assert job.webhook_url == "https://example.com/hook"
