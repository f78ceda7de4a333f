"""The pages in headless Chromium against a live farm: the form and its errors, a job's live
progress up to a playable video, render again, My jobs, cancel, and the pages without JavaScript.

Screenshots of each page are saved under ``docs/screenshots/``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Farm, watch_csp
from tests.factories import png_bytes

pytestmark = [pytest.mark.browser, pytest.mark.slow]

JOB_URL = re.compile(r".*/jobs/([0-9a-f-]{36})$")
#: Enough denoising steps that the bar is seen moving between polls.
STEPS = 12


def expect(target: Any) -> Any:
    """Playwright's ``expect``, imported only once the browser fixtures found Playwright."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


@pytest.fixture(scope="module")
def my_browser(browser: Any) -> Any:
    """One person's browser context, shared by the module's tests: its cookie is "My jobs".

    Nothing on its pages may be blocked by the Content-Security-Policy (the live bar, the
    video, the thumbnails all come from the farm's own origin).
    """
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(30_000)
    violations = watch_csp(context)
    yield context
    context.close()
    assert violations == [], violations


def submit_form(page: Any, farm: Farm, **fields: str) -> str:
    """Fill the form with a PNG and ``fields``, submit it, and return the new job's id."""
    page.goto(f"{farm.url}/")
    page.set_input_files(
        "#image", files=[{"name": "in.png", "mimeType": "image/png", "buffer": png_bytes(96, 64)}]
    )
    for name, value in fields.items():
        page.fill(f"#{name}", value)
    page.click("button[type=submit]")
    page.wait_for_url(JOB_URL)
    match = JOB_URL.match(page.url)
    assert match, page.url
    return match[1]


def api_job(page: Any, farm: Farm, job_id: str) -> dict[str, Any]:
    """The job as the JSON API shows it."""
    response = page.request.get(f"{farm.url}/api/v1/jobs/{job_id}")
    assert response.ok
    body: dict[str, Any] = response.json()
    return body


def read_bar(page: Any) -> tuple[str, int, str] | None:
    """The state, the bar's value in percent and the ETA text, or None mid-reload."""
    from playwright.sync_api import Error

    try:
        values: list[Any] = page.evaluate(
            """() => {
                const bar = document.getElementById('bar');
                const eta = document.getElementById('eta');
                return [document.getElementById('state').textContent,
                        bar ? Math.round(bar.value) : -1,
                        eta ? eta.textContent : ''];
            }"""
        )
    except Error:
        return None
    return str(values[0]), int(values[1]), str(values[2])


def test_the_form_and_its_errors(page: Any, farm: Farm, screenshots: Path) -> None:
    """The form shows every field; a bad submit keeps the values and says what is wrong."""
    page.goto(f"{farm.url}/")
    expect(page.locator("h1")).to_have_text("Animate an image")
    expect(page.locator("nav a[aria-current=page]")).to_have_text("New video")
    page.screenshot(path=str(screenshots / "form.png"), full_page=True)

    page.fill("#num_inference_steps", "999")
    page.click("button[type=submit]")
    expect(page.locator(".alert")).to_be_visible()
    expect(page.locator("#image-error")).to_be_visible()
    expect(page.locator("#num_inference_steps-error")).to_contain_text("999")
    expect(page.locator("#num_inference_steps")).to_have_value("999")
    page.screenshot(path=str(screenshots / "form-errors.png"), full_page=True)


def test_a_job_from_the_form_to_a_playable_video(
    my_browser: Any, farm: Farm, screenshots: Path
) -> None:
    """Submit a PNG: the bar advances with an ETA, then the video plays; render again works."""
    page = my_browser.new_page()
    job_id = submit_form(page, farm, num_frames="4", num_inference_steps=str(STEPS))

    seen: list[int] = []
    etas: set[str] = set()
    running_shot = False
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        reading = read_bar(page)
        if reading is not None:
            state, value, eta = reading
            if state == "succeeded":
                break
            assert state in ("queued", "running"), (state, farm.log())
            if state == "running" and 0 < value < 100:
                seen.append(value)
            if eta:
                etas.add(eta)
            if not running_shot and eta and 20 <= value <= 80:
                page.screenshot(path=str(screenshots / "job-running.png"), full_page=True)
                running_shot = True
        time.sleep(0.1)
    else:
        raise AssertionError(f"the job did not finish in 240 s:\n{farm.log()}")
    assert len(set(seen)) >= 3, f"the bar did not move: {seen}"
    assert seen == sorted(seen), f"the bar went backwards: {seen}"
    assert running_shot, seen
    assert any(eta.endswith("left") for eta in etas), etas

    expect(page.locator("#phase")).to_contain_text("Done in")
    video = page.locator("#video")
    expect(video).to_be_visible()
    page.wait_for_function(
        "() => { const v = document.getElementById('video');"
        " return v && v.readyState >= 2 && v.duration > 0; }",
        timeout=30_000,
    )
    assert page.get_attribute("#video", "poster") == f"{farm.url}/jobs/{job_id}/poster.png"
    expect(page.locator("#download")).to_have_attribute(
        "href", f"/jobs/{job_id}/video.mp4?download=1"
    )
    expect(page.locator("#attempts td.outcome")).to_have_text(["succeeded"])
    expect(page.locator("#cancel")).to_have_count(0)
    page.evaluate("document.getElementById('video').pause()")
    page.screenshot(path=str(screenshots / "job-finished.png"), full_page=True)

    # Render again: the form comes back with this job's settings; the image is chosen again.
    seed = str(api_job(page, farm, job_id)["params"]["seed"])
    page.click("#again")
    page.wait_for_url(re.compile(r".*/\?.*again="))
    expect(page.locator("#again")).to_contain_text("Choose the image again")
    expect(page.locator("#num_inference_steps")).to_have_value(str(STEPS))
    expect(page.locator("#num_frames")).to_have_value("4")
    expect(page.locator("#seed")).to_have_value(seed)
    expect(page.locator("#precision")).to_have_value("auto")
    page.screenshot(path=str(screenshots / "form-render-again.png"), full_page=True)
    page.close()


def test_cancel_a_queued_and_a_running_job(my_browser: Any, farm: Farm, screenshots: Path) -> None:
    """A queued job leaves the queue at once; a running one stops at its next step."""
    running = my_browser.new_page()
    running_id = submit_form(running, farm, num_frames="4", num_inference_steps="200")
    expect(running.locator("#phase")).to_contain_text(
        re.compile(r"Denoising \(step [1-9]"), timeout=120_000
    )

    queued = my_browser.new_page()
    submit_form(queued, farm, num_frames="4", num_inference_steps="2")
    expect(queued.locator("#state")).to_have_text("queued")
    expect(queued.locator("#phase")).to_have_text("Waiting in the queue")
    expect(queued.locator("#waiting")).to_contain_text("1 worker(s) can take it, 1 busy")
    queued.screenshot(path=str(screenshots / "job-queued.png"), full_page=True)
    queued.click("#cancel")
    expect(queued.locator("#state")).to_have_text("canceled")
    expect(queued.locator("#attempts")).to_have_count(0)
    expect(queued.locator("#again")).to_be_visible()

    started = time.monotonic()
    running.click("#cancel")
    expect(running.locator("#state")).to_have_text("canceled", timeout=60_000)
    assert time.monotonic() - started < 60
    expect(running.locator("#attempts td.outcome")).to_have_text(["canceled"])
    expect(running.locator("#attempts tr.message")).to_contain_text("Canceled by request.")
    job = api_job(running, farm, running_id)
    assert job["state"] == "canceled"
    assert 1 <= job["step"] < 200, job  # it stopped at a step, long before the end
    running.screenshot(path=str(screenshots / "job-canceled.png"), full_page=True)
    queued.close()

    # My jobs: this browser's three jobs, newest first, each with a thumbnail that loaded.
    running.goto(f"{farm.url}/jobs")
    items = running.locator("#recent li")
    expect(items).to_have_count(3)
    expect(items.locator(".badge")).to_have_text(["canceled", "canceled", "succeeded"])
    expect(items.nth(1)).to_have_attribute("data-job-id", running_id)
    expect(items.nth(2).locator("img")).to_have_attribute("src", re.compile(r"/poster\.png$"))
    expect(items.nth(1).locator("img")).to_have_attribute("src", re.compile(r"/input$"))
    running.wait_for_function(
        "() => [...document.querySelectorAll('#recent img')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )
    running.screenshot(path=str(screenshots / "recent.png"), full_page=True)
    running.close()


def test_the_pages_work_without_javascript(browser: Any, farm: Farm, screenshots: Path) -> None:
    """With JavaScript off the form still submits and the status page refreshes itself."""
    context = browser.new_context(
        java_script_enabled=False, viewport={"width": 1100, "height": 900}
    )
    try:
        page = context.new_page()
        loads: list[str] = []
        page.on("load", lambda: loads.append(page.url))
        job_id = submit_form(page, farm, num_frames="4", num_inference_steps="2")
        expect(page.locator("#state")).to_have_text("succeeded", timeout=180_000)
        assert len(loads) >= 3, loads  # the form, the status page, at least one refresh
        assert all(url.endswith(job_id) for url in loads[1:]), loads
        expect(page.locator("#video source")).to_have_attribute(
            "src", f"{farm.url}/jobs/{job_id}/video.mp4"
        )
        # The finished page stops refreshing itself.
        assert page.locator("meta[http-equiv=refresh]").count() == 0
        page.goto(f"{farm.url}/jobs")
        expect(page.locator("#recent li")).to_have_count(1)
    finally:
        context.close()


def test_the_csp_blocks_inline_script_in_the_browser(browser: Any, farm: Farm) -> None:
    """The policy the farm sends is enforced: an inline script added to a page does not run,
    and Chromium reports the refusal (what the other tests watch for and find none of)."""
    from playwright.sync_api import Error

    context = browser.new_context()
    try:
        violations = watch_csp(context)
        page = context.new_page()
        response = page.goto(f"{farm.url}/")
        assert response is not None
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        try:
            page.add_script_tag(content="window.injected = true;")
        except Error:
            pass  # Playwright may report the blocked script itself
        assert page.evaluate("() => window.injected === undefined")
        page.wait_for_timeout(200)
        assert any("inline script" in v for v in violations), violations
    finally:
        context.close()
