"""The status page follows a render live, in headless Chromium: real ``svdfarm web`` and
``svdfarm worker`` processes (PostgreSQL, Redis, the tiny model, a preview every 0.2 s) render a
job submitted through the form while the page shows the preview changing and the bar moving,
then the video, all from the job's event stream: no polling of the JSON API.

Every request the page makes is recorded (``page.on("request")``), and what its
``EventSource`` receives is logged to the console by a spy wrapped around it, so the test can
hold the page's few one-off JSON reads against the events that caused them. Screenshots of the
page mid-render and at the end are saved as ``job-running.png`` and ``job-finished.png``.

Two jobs held "running" by hand (no worker renders them) check what a render cannot be made
to do on cue: a failed attempt in a job's past does not reload its page (it once did, in a
loop), and a page drawn before the worker wrote the attempt's row shows the row later.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from svdfarm.lifecycle import By, record
from svdfarm.models import Attempt, Job, utcnow
from svdfarm.states import Actor, AttemptOutcome, EventType, JobState, Phase
from svdfarm.storage import FileStore, Store
from tests.browser.conftest import watch_csp
from tests.conftest import needs_postgres, needs_redis
from tests.factories import png_bytes
from tests.processes import WebAndWorker, web_and_worker
from tests.rows import job_row

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.redis,
    needs_postgres,
    needs_redis,
]

#: The farm's processes' settings: a preview (and a progress write) every 0.2 s at most, no
#: reaper (the held jobs have no worker behind them), every tier on this machine's CPU
#: worker, a short stop.
FARM_ENV = {
    "SVDFARM_SECRET_KEY": "browser-test-secret",
    "SVDFARM_PREVIEW_INTERVAL": "0.2",
    "SVDFARM_PROGRESS_INTERVAL": "0.2",
    "SVDFARM_HEARTBEAT_INTERVAL": "1",
    "SVDFARM_REAP_INTERVAL": "0",
    "SVDFARM_STOP_TIMEOUT": "5",
    "SVDFARM_CAPABILITIES": '{"total_memory_bytes": 17000000000}',
}
#: Four frames of the tiny model's 64 x 64 and enough steps that denoising lasts several
#: seconds on a small CPU: several previews, many moves of the bar.
FIELDS = {"num_frames": "4", "num_inference_steps": "12"}
#: How long the render may take, queued to finished.
RENDER_TIMEOUT_S = 150
JOB_URL = re.compile(r".*/jobs/([0-9a-f-]{36})$")
#: Wraps ``EventSource`` so that each message its streams receive is also written to the
#: console (``svdfarm-sse <event name> <data>``), where the test reads it; the page's own
#: listeners are untouched. Installed before the page's scripts run, on every load.
SPY = """
(() => {
  const Original = window.EventSource;
  if (!Original) return;
  window.EventSource = class extends Original {
    constructor(url, init) {
      super(url, init);
      for (const name of ["event", "progress"]) {
        this.addEventListener(name, (e) => console.debug("svdfarm-sse " + name + " " + e.data));
      }
    }
  };
})();
"""
#: What the test reads of the page on each look: its state, the bar, the preview.
READ_PAGE = """() => {
  const bar = document.getElementById('bar');
  const img = document.getElementById('preview');
  const figure = document.getElementById('preview-figure');
  return {
    state: document.getElementById('state').textContent.trim(),
    bar: bar ? bar.value : null,
    preview: img ? img.getAttribute('src') : null,
    loaded: Boolean(img && img.complete && img.naturalWidth > 0 && figure && !figure.hidden),
    attempts: [...document.querySelectorAll('#attempts td.outcome')].map(td => td.textContent),
  };
}"""


def expect(target: Any) -> Any:
    """Playwright's ``expect``, imported only once the browser fixtures found Playwright."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


@pytest.fixture(scope="module")
def live_farm(
    browser: Any, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[WebAndWorker]:
    """The web server and a worker with :data:`FARM_ENV`, shared by the module's tests."""
    folder = tmp_path_factory.mktemp("live-status")
    with web_and_worker(folder, tiny_model_dir, name="live", env=FARM_ENV) as found:
        yield found


@dataclass
class Traffic:
    """What one page asked the farm for, and what its event streams brought it."""

    #: (when, method, path, query, resource type) of each request.
    requests: list[tuple[float, str, str, str, str]] = field(default_factory=list)
    streamed: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def on_request(self, req: Any) -> None:
        """Note a request: when, its method, its path and query and its resource type."""
        url = urlsplit(req.url)
        self.requests.append((time.monotonic(), req.method, url.path, url.query, req.resource_type))

    def on_console(self, message: Any) -> None:
        """Keep the spy's lines (:data:`SPY`): one per message a stream received."""
        text = message.text
        if text.startswith("svdfarm-sse "):
            _, name, data = text.split(" ", 2)
            self.streamed.append((name, json.loads(data)))

    def gets(self, path: str, resource_type: str | None = None) -> list[float]:
        """When each GET of exactly ``path`` (of ``resource_type``, when given) was made."""
        return [at for at, _query in self.gets_with_query(path, resource_type)]

    def gets_with_query(
        self, path: str, resource_type: str | None = None
    ) -> list[tuple[float, str]]:
        """When each GET of ``path`` (of ``resource_type``, when given) was made, and its query."""
        return [
            (at, query)
            for at, method, seen, query, kind in self.requests
            if method == "GET" and seen == path and resource_type in (None, kind)
        ]

    def api_paths(self) -> list[str]:
        """The path of every request the page made to the API, in order."""
        return [r[2] for r in self.requests if r[2].startswith("/api/")]

    def events(self) -> list[dict[str, Any]]:
        """The lifecycle events the streams delivered (``event: event``), in order."""
        return [data for name, data in self.streamed if name == "event"]

    def progress(self) -> list[dict[str, Any]]:
        """The progress messages the streams delivered (``event: progress``), in order."""
        return [data for name, data in self.streamed if name == "progress"]


@pytest.fixture
def watched(browser: Any) -> Iterator[tuple[Any, Traffic]]:
    """A page in a fresh browser context whose requests and stream messages are recorded
    (:class:`Traffic`); the test fails if the Content-Security-Policy blocked anything."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(30_000)
    violations = watch_csp(context)
    context.add_init_script(SPY)
    traffic = Traffic()
    page = context.new_page()
    page.on("request", traffic.on_request)
    page.on("console", traffic.on_console)
    yield page, traffic
    context.close()
    assert violations == [], violations


def read_page(page: Any) -> dict[str, Any] | None:
    """The page's state, bar value and preview (:data:`READ_PAGE`), or None mid-reload."""
    from playwright.sync_api import Error

    try:
        reading: dict[str, Any] = page.evaluate(READ_PAGE)
    except Error:
        return None
    return reading


def preview_step(src: str, job_path: str) -> int:
    """The step of a preview's URL (``<job_path>/preview.jpg?step=N``, whole or its path)."""
    parts = urlsplit(src)
    found = re.fullmatch(r"step=(\d+)", parts.query)
    assert parts.path == f"{job_path}/preview.jpg" and found, src
    return int(found[1])


def changes(values: list[Any]) -> list[Any]:
    """``values`` without the repeats of the one before."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def wait_until_still(element: Any, timeout_s: float = 10) -> bool:
    """Until two pictures of ``element`` taken 0.2 s apart are the same, for a screenshot
    without the loading spinner Chromium's video controls show for a while after the video
    has loaded (nothing in the page's DOM tells when it goes); False when it did not settle."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        picture = element.screenshot()
        if picture == last:
            return True
        last = picture
        element.page.wait_for_timeout(200)
    return False


def test_the_status_page_shows_previews_and_the_bar_moving_without_polling(
    watched: tuple[Any, Traffic], live_farm: WebAndWorker, screenshots: Path
) -> None:
    """Submitted through the form, a render's status page shows the preview changing and the
    bar moving from its event stream, then the video; it reads the JSON API only after an
    event (never once a second) and opens one stream per load of the unfinished page."""
    page, traffic = watched
    page.goto(f"{live_farm.url}/")
    page.set_input_files(
        "#image",
        files=[{"name": "in.png", "mimeType": "image/png", "buffer": png_bytes(96, 64)}],
    )
    for name, value in FIELDS.items():
        page.fill(f"#{name}", value)
    page.click("button[type=submit]")
    page.wait_for_url(JOB_URL)
    match = JOB_URL.match(page.url)
    assert match, page.url
    job_id = match[1]
    job_path = f"/jobs/{job_id}"
    submitted = time.monotonic()

    previews: list[str] = []  # the preview's src on each look while running
    loaded: set[str] = set()  # the srcs seen with their picture shown
    bars: list[float] = []  # the bar's value on each look while running
    mid_render_shot = False
    deadline = submitted + RENDER_TIMEOUT_S
    while True:
        assert time.monotonic() < deadline, (
            f"the page did not show the job finished in {RENDER_TIMEOUT_S} s: "
            f"{page.url} {read_page(page)}\n{live_farm.logs()}"
        )
        reading = read_page(page) or {"state": "reloading"}
        if reading["state"] == "succeeded":
            break
        assert reading["state"] in ("reloading", "queued", "running"), (
            reading,
            live_farm.logs(),
        )
        if reading["state"] == "running":
            bars.append(reading["bar"])
            if reading["preview"]:
                previews.append(reading["preview"])
                if reading["loaded"]:
                    loaded.add(reading["preview"])
            # Mid-render: the bar a good way along, a preview and the attempt shown.
            shows_all = reading["loaded"] and reading["attempts"] == ["running"]
            if not mid_render_shot and shows_all and 30 <= reading["bar"] <= 80:
                page.screenshot(path=str(screenshots / "job-running.png"), full_page=True)
                mid_render_shot = True
        time.sleep(0.1)
    ran_s = time.monotonic() - submitted

    # The finished page: the video plays, the bar and the preview are gone.
    expect(page.locator("#video source")).to_have_attribute(
        "src", f"{live_farm.url}{job_path}/video.mp4"
    )
    page.wait_for_function(
        "() => { const v = document.getElementById('video');"
        " return v && v.readyState >= 2 && v.duration > 0; }",
        timeout=30_000,
    )
    expect(page.locator("#bar")).to_have_count(0)
    expect(page.locator("#preview")).to_have_count(0)
    expect(page.locator("#attempts td.outcome")).to_have_text(["succeeded"])
    page.evaluate("document.getElementById('video').pause()")
    wait_until_still(page.locator("#video"))
    page.screenshot(path=str(screenshots / "job-finished.png"), full_page=True)

    # The page may name a preview by its path (the stream's) or its whole URL (the API's).
    shown = changes([preview_step(src, job_path) for src in previews])
    assert len(shown) >= 3, f"the preview changed fewer than twice: {changes(previews)}"
    assert shown == sorted(shown), f"the previews went back: {changes(previews)}"
    assert len({preview_step(src, job_path) for src in loaded}) >= 2, loaded
    assert mid_render_shot, f"no look mid-render with a preview and the attempt: {bars}"
    moved = changes(bars)
    assert moved == sorted(moved), f"the bar went back: {moved}"
    assert len(moved) >= 3, f"the bar moved fewer than twice: {moved}"
    assert len(traffic.progress()) >= len(shown), traffic.progress()

    # No polling. The page loads at most four times (queued; running; running with its
    # attempt's row, which the worker writes after the claim; finished), each unfinished
    # load opens one stream, and the JSON is read only after an event (at most one read
    # per event received), never once a second while the job ran.
    loads = traffic.gets(job_path, "document")
    streams = traffic.gets_with_query(f"/api/v1{job_path}/events", "eventsource")
    reads = traffic.gets(f"/api/v1{job_path}")
    told = traffic.events()
    assert 2 <= len(loads) <= 4, f"the page loaded {len(loads)} times: {traffic.requests}"
    assert len(streams) == len(loads) - 1, (len(loads), traffic.api_paths())
    # Each stream starts after the last event its page shows, not from the job's start.
    assert all(re.fullmatch(r"after=\d+", query) for _at, query in streams), streams
    assert len(reads) <= len(told), (reads, told)
    assert len(reads) < max(2, ran_s / 3), (ran_s, reads)
    expected = (f"/api/v1{job_path}", f"/api/v1{job_path}/events")
    assert [p for p in traffic.api_paths() if p not in expected] == [], traffic.api_paths()
    kinds = [e["type"] for e in traffic.events()]
    assert "claimed" in kinds and kinds[-1] == "succeeded", kinds
    print(
        f"live status: {ran_s:.1f} s to the video; {len(loads)} loads, {len(streams)} "
        f"streams, {len(reads)} JSON reads after {len(told)} events; previews {shown}; "
        f"bar {moved}"
    )


#: The worker a held job is said to run on (no such process: nothing renders it).
ELSEWHERE = By(Actor.WORKER, "gpu1@elsewhere")


def add_attempt(session: Any, job_id: uuid.UUID) -> None:
    """Give a held job its first attempt's row, running on :data:`ELSEWHERE`."""
    session.add(
        Attempt(
            job_id=job_id,
            number=1,
            worker=ELSEWHERE.name,
            plan_name="fp16",
            plan={},
            outcome=AttemptOutcome.RUNNING,
        )
    )


def add_running_job(farm: WebAndWorker, *events: EventType, attempt: bool = True) -> uuid.UUID:
    """A job held running at step 2 of 10 on :data:`ELSEWHERE`, with its first attempt's row
    (unless ``attempt`` is false: just claimed) and ``events`` after its submit, publish and
    claim; its id."""
    job_id = uuid.uuid4()
    key = Store.key(job_id, "input.png")
    FileStore(farm.settings.data_dir / "jobs").write_bytes(key, png_bytes(96, 64))
    with farm.db.begin() as session:
        session.add(
            job_row(
                job_id,
                input_key=key,
                input_filename="cat.png",
                state=JobState.RUNNING,
                phase=Phase.DENOISING,
                step=2,
                num_inference_steps=10,
                progress=0.2,
            )
        )
        if attempt:
            add_attempt(session, job_id)
        session.flush()
        for kind, by in [
            (EventType.SUBMITTED, By(Actor.API)),
            (EventType.PUBLISHED, By(Actor.API)),
            (EventType.CLAIMED, ELSEWHERE),
            *((kind, ELSEWHERE) for kind in events),
        ]:
            record(session, job_id, kind, by, {})
    return job_id


def end_held_job(farm: WebAndWorker, job_id: uuid.UUID) -> None:
    """Mark a held job canceled, so that nothing is left running."""
    with farm.db.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.phase, job.finished_at = JobState.CANCELED, Phase.DONE, utcnow()


def open_held(page: Any, traffic: Traffic, farm: WebAndWorker, job_id: uuid.UUID) -> None:
    """Open a held job's status page on the watched ``page``; return once its stream has
    brought its first message (the progress now)."""
    page.goto(f"{farm.url}/jobs/{job_id}")
    expect(page.locator("#phase")).to_have_text("Denoising (step 2/10)")
    deadline = time.monotonic() + 15
    while not traffic.progress():
        assert time.monotonic() < deadline, (
            "no progress message in 15 s; "
            f"{len(traffic.gets(f'/jobs/{job_id}', 'document'))} loads, "
            f"streamed {[(n, d.get('type')) for n, d in traffic.streamed]}, "
            f"requests {[r[1:] for r in traffic.requests]}"
        )
        page.wait_for_timeout(100)


def test_a_running_job_with_a_failed_attempt_behind_it_loads_its_page_once(
    watched: tuple[Any, Traffic], live_farm: WebAndWorker
) -> None:
    """The events a job had before its page was drawn do not reload the page: one whose
    first rung failed (the ladder goes on, the job still runs) loads once, follows its
    progress live and reads no JSON."""
    job_id = add_running_job(live_farm, EventType.ATTEMPT_FAILED)
    path = f"/jobs/{job_id}"
    page, traffic = watched
    try:
        open_held(page, traffic, live_farm, job_id)
        with live_farm.db.begin() as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.step, job.progress = 7, 0.7
        expect(page.locator("#phase")).to_have_text("Denoising (step 7/10)")
        expect(page.locator("#bar")).to_have_attribute("value", re.compile(r"^7\d"))
        assert len(traffic.gets(path, "document")) == 1, traffic.requests
        assert len(traffic.gets(f"/api/v1{path}/events", "eventsource")) == 1, traffic.requests
        assert traffic.gets(f"/api/v1{path}") == [], traffic.requests
    finally:
        end_held_job(live_farm, job_id)


def test_a_page_drawn_before_the_attempt_row_shows_it_after_the_next_phase(
    watched: tuple[Any, Traffic], live_farm: WebAndWorker
) -> None:
    """The worker writes the attempt's row after the claim (which reloads the page), with no
    event of its own: the page, drawn with no attempt, reads the JSON once at the next phase
    event and loads again to show the attempt running."""
    job_id = add_running_job(live_farm, attempt=False)
    path = f"/jobs/{job_id}"
    page, traffic = watched
    try:
        open_held(page, traffic, live_farm, job_id)
        expect(page.locator("#attempts")).to_have_count(0)
        with live_farm.db.begin() as session:
            add_attempt(session, job_id)
            record(session, job_id, EventType.PHASE, ELSEWHERE, {"phase": "denoising", "step": 2})
        expect(page.locator("#attempts td.outcome")).to_have_text(["running"])
        assert len(traffic.gets(path, "document")) == 2, traffic.requests
        assert len(traffic.gets(f"/api/v1{path}")) == 1, traffic.requests
    finally:
        end_held_job(live_farm, job_id)
