"""The pages in headless Chromium against a live farm: the form and its errors, a job's live
progress up to a playable video, render again, My jobs, cancel, and the pages without JavaScript.

Screenshots of each page are saved under ``docs/screenshots/``.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Farm, watch_csp
from tests.factories import png_bytes
from tests.rows import QUEUE

pytestmark = [pytest.mark.browser, pytest.mark.slow]

JOB_URL = re.compile(r".*/jobs/([0-9a-f-]{36})$")
#: Enough denoising steps that the bar is seen moving between polls.
STEPS = 12
#: Seconds a 12-step render may take in the browser tests: minutes when CI runs test files in
#: parallel on two cores.
RENDER_WAIT = 240


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


def seconds_left(eta: str) -> float:
    """The seconds an ETA text says: "about 25 s left", "about 3 min left", "a few seconds
    left" (0)."""
    found = re.search(r"about ([\d.]+) (s|min|h) left", eta)
    if not found:
        return 0.0
    return float(found[1]) * {"s": 1, "min": 60, "h": 3600}[found[2]]


def test_the_form_and_its_errors(page: Any, farm: Farm, screenshots: Path) -> None:
    """The form shows every field; a bad submit keeps the values and says what is wrong."""
    page.goto(f"{farm.url}/")
    expect(page.locator("h1")).to_have_text("Animate an image")
    expect(page.locator("nav a[aria-current=page]")).to_have_text("New video")
    # Sizes step by 64, the only ones accepted; the size menu holds the model's (the tiny
    # model's 64 x 64) and follows what is typed.
    expect(page.locator("#width")).to_have_attribute("step", "64")
    expect(page.locator("#height")).to_have_attribute("step", "64")
    expect(page.locator("#size-preset")).to_be_visible()
    expect(page.locator("#size-preset")).to_have_value("")
    page.screenshot(path=str(screenshots / "form.png"), full_page=True)
    page.select_option("#size-preset", "64x64")
    expect(page.locator("#width")).to_have_value("64")
    expect(page.locator("#height")).to_have_value("64")
    page.fill("#width", "128")
    expect(page.locator("#size-preset")).to_have_value("custom")
    page.press("#width", "ArrowUp")  # the browser's own step: 64, not 1
    expect(page.locator("#width")).to_have_value("192")
    page.select_option("#size-preset", "")
    expect(page.locator("#width")).to_have_value("")
    expect(page.locator("#height")).to_have_value("")

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
    etas: list[str] = []
    eta_midway = False
    deadline = time.monotonic() + RENDER_WAIT
    while time.monotonic() < deadline:
        reading = read_bar(page)
        if reading is not None:
            state, value, eta = reading
            if state == "succeeded":
                break
            assert state in ("queued", "running"), (state, farm.log())
            if state == "running" and 0 < value < 100:
                seen.append(value)
            if eta and (not etas or etas[-1] != eta):
                etas.append(eta)
            eta_midway = eta_midway or bool(eta and 20 <= value <= 80)
        time.sleep(0.1)
    else:
        raise AssertionError(f"the job did not finish in {RENDER_WAIT} s:\n{farm.log()}")
    assert len(set(seen)) >= 3, f"the bar did not move: {seen}"
    assert seen == sorted(seen), f"the bar went backwards: {seen}"
    assert eta_midway, seen  # a time left while the bar was midway
    assert any(eta.endswith("left") for eta in etas), etas
    left = [seconds_left(eta) for eta in etas if eta.endswith("left")]
    assert left == sorted(left, reverse=True), f"the time left grew: {etas}"

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
    # (The running and finished pages' screenshots: tests/browser/test_live_status.py, with
    # the preview.)

    # Render again: the form comes back with this job's settings and offers its stored image
    # (a chosen file would replace it); submitted as it is, the new job renders that image.
    seed = str(api_job(page, farm, job_id)["params"]["seed"])
    page.click("#again")
    page.wait_for_url(re.compile(r".*/\?.*again="))
    expect(page.locator("#again")).to_contain_text("Its image is used again")
    expect(page.locator("#stored-input figcaption")).to_contain_text("in.png")
    page.wait_for_function(
        "() => { const img = document.querySelector('#stored-input img');"
        " return img && img.complete && img.naturalWidth > 0; }"
    )
    expect(page.locator("#num_inference_steps")).to_have_value(str(STEPS))
    expect(page.locator("#num_frames")).to_have_value("4")
    expect(page.locator("#seed")).to_have_value(seed)
    expect(page.locator("#precision")).to_have_value("auto")
    page.screenshot(path=str(screenshots / "form-render-again.png"), full_page=True)
    page.click("button[type=submit]")
    page.wait_for_url(JOB_URL)
    match = JOB_URL.match(page.url)
    assert match and match[1] != job_id, page.url
    again = api_job(page, farm, match[1])
    assert (again["input_filename"], again["params"]["seed"]) == ("in.png", int(seed))
    inputs = [page.request.get(f"{farm.url}/jobs/{j}/input").body() for j in (job_id, match[1])]
    assert inputs[0] == inputs[1] == png_bytes(96, 64)
    expect(page.locator("#state")).to_have_text("succeeded", timeout=RENDER_WAIT * 1000)
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

    # My jobs: this browser's four jobs, newest first, each with a thumbnail that loaded.
    running.goto(f"{farm.url}/jobs")
    items = running.locator("#recent li")
    expect(items).to_have_count(4)
    expect(items.locator(".badge")).to_have_text(["canceled", "canceled", "succeeded", "succeeded"])
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
    from svdfarm.models import utcnow
    from svdfarm.states import JobState

    context = browser.new_context(
        java_script_enabled=False, viewport={"width": 1100, "height": 900}
    )
    try:
        page = context.new_page()
        loads: list[str] = []
        page.on("load", lambda: loads.append(page.url))
        job_id = submit_form(page, farm, num_frames="4", num_inference_steps="2")
        expect(page.locator("#state")).to_have_text("succeeded", timeout=180_000)
        assert all(url.endswith(job_id) for url in loads[1:]), loads
        expect(page.locator("#video source")).to_have_attribute(
            "src", f"{farm.url}/jobs/{job_id}/video.mp4"
        )
        # The finished page stops refreshing itself.
        assert page.locator("meta[http-equiv=refresh]").count() == 0
        page.goto(f"{farm.url}/jobs")
        expect(page.locator("#recent li")).to_have_count(1)
        # A job still running reloads its page by itself (the tiny render above may finish
        # before the first refresh, so this one is held running by writing its row).
        held = farm.add_job(state=JobState.RUNNING, phase="denoising", step=1)
        try:
            page.goto(f"{farm.url}/jobs/{held}")
            before = len(loads)
            page.wait_for_event("load", timeout=15_000)
            assert len(loads) > before and loads[-1].endswith(held), loads
        finally:
            farm.update_job(held, state=JobState.CANCELED, phase="done", finished_at=utcnow())
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


def hub_error() -> tuple[str, str]:
    """The error a worker stores when the Hub cannot be reached (worker.pipeline's own
    message), and the server's Hugging Face cache path in it."""
    from huggingface_hub import constants

    from svdfarm.states import ErrorClass
    from worker.errors import user_message
    from worker.pipeline import ModelUnavailable, _hub_message

    cause = ConnectionError("Max retries exceeded with url: /api/models/stabilityai/x")
    text = _hub_message("stabilityai/stable-video-diffusion-img2vid-xt", cause, 10)
    error = user_message(ErrorClass.MODEL_UNAVAILABLE, ModelUnavailable(text))
    return error, str(constants.HF_HUB_CACHE)


def add_failed_job(farm: Farm, error: str, **attempt: Any) -> str:
    """A job that failed with ``error`` on its one attempt, as a worker records it."""
    from svdfarm.lifecycle import By
    from svdfarm.models import utcnow
    from svdfarm.states import Actor, AttemptOutcome, ErrorClass, EventType, JobState

    now = utcnow()
    started = now - timedelta(seconds=3)
    worker = By(Actor.WORKER, "gpu0@render-node")
    return farm.add_job(
        events=[
            (EventType.SUBMITTED, By(Actor.WEB), {"queue": QUEUE}),
            (EventType.PUBLISHED, By(Actor.WEB), {"queue": QUEUE}),
            (EventType.CLAIMED, worker, {"worker": worker.name, "plan": "fp16"}),
            (EventType.ATTEMPT_FAILED, worker, {"attempt": 1, "error_class": "model_unavailable"}),
            (EventType.FAILED, worker, {"error_class": "model_unavailable"}),
        ],
        state=JobState.FAILED,
        phase="done",
        model="stabilityai/stable-video-diffusion-img2vid-xt",
        created_at=started,
        started_at=started,
        finished_at=now,
        error=error,
        attempt={
            "plan_name": "fp16 unet+enc, fp32 vae, chunk 8 on cuda",
            "worker": "gpu0@render-node",
            "started_at": started,
            "finished_at": now,
            "duration_s": 3.0,
            "outcome": AttemptOutcome.FAILED,
            "error_class": ErrorClass.MODEL_UNAVAILABLE,
            "error_type": "worker.pipeline.ModelUnavailable",
            "message": error,
            **attempt,
        },
    )


def test_a_model_error_shows_once_without_the_servers_paths(
    page: Any, farm: Farm, screenshots: Path
) -> None:
    """The status page of a job the Hub failed says why and what to do, once, without the
    server's cache path (anyone with the id reads it; the admin page has the whole text)."""
    error, cache = hub_error()
    assert cache in error
    job_id = add_failed_job(farm, error)
    page.goto(f"{farm.url}/jobs/{job_id}")
    expect(page.locator("#state")).to_have_text("failed")
    alert = page.locator("#error")
    expect(alert).to_contain_text("could not be reached")
    expect(alert).to_contain_text("cache [a folder on the server]")
    text = page.locator("main").inner_text()
    assert cache not in text
    assert text.count("Could not load model") == 1, text
    expect(page.locator("#attempts tr.message")).to_have_count(0)
    assert cache not in str(api_job(page, farm, job_id))
    page.screenshot(path=str(screenshots / "job-failed.png"), full_page=True)


def test_the_time_left_never_grows_while_a_step_runs_long(
    page: Any, farm: Farm, screenshots: Path
) -> None:
    """A job half done after 30 s (5 s steps) whose step 7 then runs on: the page counts the
    time left down, never up, then says which step runs and for how long, counting up."""
    from svdfarm.models import utcnow
    from svdfarm.states import AttemptOutcome, JobState

    now = utcnow()
    started = now - timedelta(seconds=32)
    job_id = farm.add_job(
        state=JobState.RUNNING,
        phase="denoising",
        step=6,
        num_inference_steps=12,
        progress=0.5,
        created_at=started,
        started_at=started,
        updated_at=now - timedelta(seconds=2),
        attempt={"started_at": started, "outcome": AttemptOutcome.RUNNING},
    )
    try:
        page.goto(f"{farm.url}/jobs/{job_id}")
        expect(page.locator("#phase")).to_have_text("Denoising (step 6/12)")
        shown: list[str] = []
        shot = False
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            reading = read_bar(page)
            if reading is not None and (not shown or shown[-1] != reading[2]):
                shown.append(reading[2])
            if shown and shown[-1].startswith("Step 7 of 12 running for 1"):
                if not shot:
                    page.screenshot(path=str(screenshots / "job-slow-step.png"), full_page=True)
                    shot = True
                elif re.search(r"for (1[89]|2\d) s", shown[-1]):
                    break
            time.sleep(0.25)
        counting = [t for t in shown if t.endswith("left")]
        running = [t for t in shown if "running for" in t]
        assert len(set(counting)) >= 2, shown  # it counted down ...
        left = [seconds_left(t) for t in counting]
        assert left == sorted(left, reverse=True), f"the time left grew: {shown}"
        assert shown.index(running[0]) > shown.index(counting[-1]), shown
        ran = [int(re.findall(r"\d+", t)[-1]) for t in running]  # ... then counted the step up
        assert len(ran) >= 2 and ran == sorted(ran), shown
        assert api_job(page, farm, job_id)["eta_s"] is None
    finally:
        farm.update_job(job_id, state=JobState.CANCELED, phase="done", finished_at=utcnow())


PHONE = {"width": 390, "height": 844}


def test_the_pages_fit_a_phone(browser: Any, farm: Farm, screenshots: Path) -> None:
    """At 390 px no page is wider than the screen (the attempts table scrolls in its card)
    and the header stays on one line."""
    job_id = add_failed_job(
        farm, hub_error()[0], worker="gpu0@render-node-with-a-long-name.farm.internal"
    )
    context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True)
    try:
        page = context.new_page()
        for path in ("/", f"/jobs/{job_id}", "/jobs", "/no/such/page"):
            page.goto(f"{farm.url}{path}")
            width = page.evaluate("() => document.documentElement.scrollWidth")
            assert width <= PHONE["width"], (path, width)
            brand = page.locator("header.top .brand").bounding_box()
            nav = page.locator("header.top nav").bounding_box()
            assert brand is not None and nav is not None
            # One line: the links sit beside the name, not under it, and do not wrap.
            assert nav["y"] < brand["y"] + brand["height"], (path, brand, nav)
            assert nav["height"] < 1.5 * brand["height"], (path, brand, nav)
            if path.startswith("/jobs/"):
                page.screenshot(path=str(screenshots / "job-phone.png"), full_page=True)
    finally:
        context.close()


def test_errors_are_the_sites_pages_and_the_favicon_is_there(
    page: Any, farm: Farm, screenshots: Path
) -> None:
    """A 404 is a page of the site with a way back; /favicon.ico is an icon."""
    response = page.goto(f"{farm.url}/jobs/00000000-0000-0000-0000-000000000000")
    assert response is not None and response.status == 404
    expect(page.locator("#error-page h1")).to_have_text("404 Not Found")
    expect(page.locator("#error-page")).to_contain_text("No job with id")
    expect(page.locator("header.top .brand")).to_be_visible()
    page.screenshot(path=str(screenshots / "error-404.png"), full_page=True)
    icon = page.request.get(f"{farm.url}/favicon.ico")
    assert icon.ok and icon.headers["content-type"] == "image/vnd.microsoft.icon"
