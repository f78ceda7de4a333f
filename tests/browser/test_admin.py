"""The admin pages in headless Chromium against a live farm: log in, find the jobs a dtype error
failed, read the traceback, requeue one and then several with "force fp32", watch them succeed.

The farm is ``svdfarm web`` and ``svdfarm worker`` as separate processes on one data folder
(SQLite, the filesystem broker, the tiny model). Its jobs fail for real, the way the project's
first failures did: they are submitted while no worker runs, then given per-job overrides
(boundary casts off, a bf16 VAE) so the tiny pipeline raises "Input type (float) and bias type
(c10::BFloat16) should be the same"; ``SVDFARM_MAX_ATTEMPTS=1`` keeps the retry ladder from
recovering by itself. Screenshots of the admin pages go to ``docs/screenshots/admin-*.png``.

Self-contained: the fixtures live in this module. The tests skip only when Playwright or Chromium
is missing and ``SVDFARM_TEST_BROWSER`` is not set; with it set, a missing browser fails them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from svdfarm.db import Database
from svdfarm.models import Job
from tests.browser.conftest import screenshot_dir
from tests.factories import png_bytes
from tests.http import free_port, multipart
from web.auth import hash_password

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SVDFARM = [sys.executable, "-m", "cli"]
PASSWORD = "correct horse battery staple"
#: Jobs made to fail: one requeued alone, the rest together.
FAILED_JOBS = 3
#: The error the tiny pipeline raises with casts off and a bf16 VAE.
DTYPE_ERROR = "bias type (c10::BFloat16) should be the same"


def expect(target: Any) -> Any:
    """Playwright's ``expect``, imported only once the browser fixture found Playwright."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


@dataclass
class AdminFarm:
    """A live web server and worker, and the ids of the jobs that failed on it."""

    url: str
    database_url: str
    logs: dict[str, Path]
    failed: list[str] = field(default_factory=list)

    def log(self) -> str:
        """What the processes printed so far, for assertion messages."""
        return "\n".join(
            f"--- {name}\n{path.read_text(errors='replace')[-6000:]}"
            for name, path in self.logs.items()
        )

    def job(self, job_id: str) -> dict[str, Any]:
        """The job as the JSON API shows it."""
        with urllib.request.urlopen(f"{self.url}/api/v1/jobs/{job_id}", timeout=10) as response:
            body: dict[str, Any] = json.load(response)
        return body

    def wait_for(self, job_ids: list[str], state: str, timeout_s: float = 180) -> None:
        """Block until every job in ``job_ids`` has ended, and check it ended in ``state``."""
        deadline = time.monotonic() + timeout_s
        pending = set(job_ids)
        while pending:
            for job_id in list(pending):
                found = self.job(job_id)
                if found["state"] in ("succeeded", "failed", "canceled"):
                    assert found["state"] == state, (found, self.log())
                    pending.discard(job_id)
            assert time.monotonic() < deadline, (f"still running: {pending}", self.log())
            time.sleep(0.3)


def _submit(url: str) -> str:
    """Submit a small job (4 frames, 64 x 64, 2 steps) through the API; its id."""
    body, content_type = multipart(
        {"num_frames": "4", "num_inference_steps": "2", "width": "64", "height": "64"},
        png_bytes(64, 64),
        "cat.png",
    )
    request = urllib.request.Request(
        f"{url}/api/v1/jobs", data=body, headers={"Content-Type": content_type}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
        return str(json.load(response)["id"])


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start an ``svdfarm`` command in its own process group, its output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*SVDFARM, *argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started by :func:`_start` and everything it started (its group)."""
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children left behind by a clean exit
    except ProcessLookupError:
        pass
    process.wait()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Block until the web server answers ``/healthz``."""
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if json.load(response)["status"] == "ok":
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def farm(
    browser: Any, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[AdminFarm]:
    """``svdfarm web`` and ``svdfarm worker`` on one data folder, with jobs failed by dtype."""
    root = tmp_path_factory.mktemp("admin-farm")
    data_dir = root / "var"
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    env = {
        **os.environ,
        "SVDFARM_DATA_DIR": str(data_dir),
        "SVDFARM_MODEL": "tiny",
        "SVDFARM_DATABASE_URL": "",
        "SVDFARM_BROKER_URL": "",
        "SVDFARM_SECRET_KEY": "admin-browser-test-secret",
        "SVDFARM_ADMIN_PASSWORD": hash_password(PASSWORD),
        "SVDFARM_PROGRESS_INTERVAL": "0.2",
        "SVDFARM_HEARTBEAT_INTERVAL": "2",
        "SVDFARM_STOP_TIMEOUT": "5",
        # One attempt per job: the retry ladder must not recover from the dtype error itself.
        "SVDFARM_MAX_ATTEMPTS": "1",
    }
    migrated = subprocess.run(
        [*SVDFARM, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stderr
    port = free_port()
    logs = {"web": root / "web.log", "worker": root / "worker.log"}
    farm = AdminFarm(f"http://127.0.0.1:{port}", f"sqlite:///{data_dir / 'svdfarm.db'}", logs)
    processes = [_start(["web", "--port", str(port)], env, logs["web"])]
    database = Database(farm.database_url)
    try:
        _wait_healthy(farm.url, processes[0], logs["web"])
        farm.failed = [_submit(farm.url) for _ in range(FAILED_JOBS)]
        # The per-job overrides an operator could set: no boundary casts, a bf16 VAE.
        with database.begin() as session:
            for job_id in farm.failed:
                job = session.get(Job, uuid.UUID(job_id))
                assert job is not None
                job.casts = False
                job.dtypes = {"vae": "bf16"}
        processes.append(_start(["worker", "--loglevel", "INFO"], env, logs["worker"]))
        farm.wait_for(farm.failed, "failed")
        yield farm
    finally:
        database.dispose()
        for process in reversed(processes):
            _stop(process)


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser context: its own cookies, so its own (logged-out) session."""
    made = browser.new_context(viewport={"width": 1280, "height": 900})
    made.set_default_timeout(30_000)
    yield made
    made.close()


def log_in(page: Any, farm: AdminFarm, password: str = PASSWORD) -> None:
    """Submit the admin login form with ``password``."""
    page.goto(f"{farm.url}/admin/login")
    page.fill("#password", password)
    page.click("button[type=submit]")


@pytest.fixture
def admin(context: Any, farm: AdminFarm) -> Any:
    """A page logged in to the admin."""
    page = context.new_page()
    log_in(page, farm)
    page.wait_for_url(f"{farm.url}/admin/")
    return page


def screenshot(page: Any, name: str) -> None:
    """Save the whole page as ``docs/screenshots/<name>.png``."""
    page.screenshot(path=str(screenshot_dir() / f"{name}.png"), full_page=True)


def test_login_refuses_a_wrong_password_and_admits_the_right_one(
    context: Any, farm: AdminFarm
) -> None:
    """Admin pages send visitors to the login; a wrong password is refused, the right one in."""
    page = context.new_page()
    page.goto(f"{farm.url}/admin/workers")
    assert "/admin/login" in page.url
    expect(page.locator("h1")).to_have_text("Admin login")
    screenshot(page, "admin-login")

    page.fill("#password", "not the password")
    with page.expect_response(lambda r: r.url.endswith("/admin/login")) as refused:
        page.click("button[type=submit]")
    assert refused.value.status == 401
    expect(page.locator("#login-error")).to_contain_text("Wrong password.")
    expect(page.locator("a", has_text="Workers & queues")).to_have_count(0)

    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{farm.url}/admin/workers")  # back where the visitor was going
    expect(page.locator("h1").first).to_contain_text("Workers")


def test_a_post_without_the_csrf_token_is_refused(admin: Any, farm: AdminFarm) -> None:
    """A logged-in session's POST without (or with a wrong) CSRF token changes nothing."""
    job_id = farm.failed[0]
    before = farm.job(job_id)["state"]
    for form in (
        {"job": job_id, "action": "requeue", "force_fp32": "1"},
        {"job": job_id, "action": "requeue", "force_fp32": "1", "csrf_token": "forged"},
    ):
        response = admin.request.post(f"{farm.url}/admin/jobs/actions", form=form)
        assert response.status == 400
        assert "security token" in response.text()
    assert farm.job(job_id)["state"] == before


def test_requeue_a_failed_job_with_force_fp32_and_watch_it_succeed(
    admin: Any, farm: AdminFarm
) -> None:
    """Filter by error class, read the traceback, requeue with fp32: a second attempt succeeds."""
    job_id = farm.failed[0]
    admin.select_option("select[name=error_class]", "dtype_mismatch")
    admin.click("#filters button[type=submit]")
    admin.wait_for_url(re.compile(r".*error_class=dtype_mismatch.*"))
    expect(admin.locator("h1")).to_contain_text("Failed jobs")
    rows = admin.locator("table.jobs tbody tr")
    expect(rows).to_have_count(FAILED_JOBS)
    expect(rows.first).to_contain_text("dtype mismatch")
    screenshot(admin, "admin-failed-jobs")

    admin.click(f"a[href='/admin/jobs/{job_id}']")
    admin.wait_for_url(f"{farm.url}/admin/jobs/{job_id}")
    expect(admin.locator("#state")).to_have_text("failed")
    first = admin.locator("#attempt-1")
    expect(first).to_contain_text("dtype mismatch")
    expect(first.locator("pre.traceback")).to_contain_text(DTYPE_ERROR)
    expect(first.locator("pre.traceback")).to_contain_text("Traceback (most recent call last)")
    screenshot(admin, "admin-job-detail")

    admin.check("#job-actions input[name=force_fp32]")
    admin.click("#job-actions button[value=requeue]")
    admin.wait_for_url(f"{farm.url}/admin/jobs/{job_id}")
    flash = admin.locator(".flash-ok")
    expect(flash).to_contain_text(f"Job {job_id} requeued on svd.cpu.fp32.")
    expect(flash).to_contain_text("(fp32)")
    expect(flash.locator(f"a[href='/jobs/{job_id}']")).to_have_text("status page")
    screenshot(admin, "admin-requeued")

    # The flash's link leads to the job; its page shows the override as one, and the
    # precision the user asked for as it was.
    flash.locator(f"a[href='/jobs/{job_id}']").click()
    admin.wait_for_url(f"{farm.url}/jobs/{job_id}")
    expect(admin.locator("#overrides")).to_contain_text(
        "fp32 for every component, boundary casts off"
    )
    expect(admin.locator("dt[title=precision] + dd")).to_have_text("auto")
    expect(admin.locator("#state")).to_have_text("succeeded", timeout=180_000)
    expect(admin.locator("#overrides")).to_contain_text("fp32 for every component")
    admin.evaluate("document.getElementById('video').pause()")
    screenshot(admin, "job-fp32-override")
    attempts = farm.job(job_id)["attempts"]
    assert [a["outcome"] for a in attempts] == ["failed", "succeeded"], attempts

    admin.goto(f"{farm.url}/admin/jobs/{job_id}")
    expect(admin.locator("#state")).to_have_text("succeeded")
    expect(admin.locator("#attempt-2")).to_contain_text("succeeded")


def test_bulk_requeue_with_force_fp32_makes_every_selected_job_succeed(
    admin: Any, farm: AdminFarm
) -> None:
    """Select several failed jobs in the list, requeue them together with fp32: all succeed."""
    chosen = farm.failed[1:]
    admin.goto(f"{farm.url}/admin/?state=failed&error_class=dtype_mismatch")
    for job_id in chosen:
        admin.check(f"#bulk input[name=job][value='{job_id}']")
    admin.check("#bulk input[name=force_fp32]")
    admin.click("#bulk button[value=requeue]")
    admin.wait_for_url(re.compile(r".*/admin/\?state=failed&error_class=dtype_mismatch$"))
    flash = admin.locator(".flash-ok")
    expect(flash).to_contain_text(f"{len(chosen)} of {len(chosen)} jobs requeued. Open: ")
    for job_id in chosen:
        expect(flash.locator(f"a[href='/jobs/{job_id}']")).to_have_text("status page")
    farm.wait_for(chosen, "succeeded")
    for job_id in chosen:
        outcomes = [a["outcome"] for a in farm.job(job_id)["attempts"]]
        assert outcomes == ["failed", "succeeded"], (job_id, outcomes)

    admin.reload()
    for job_id in chosen:
        expect(admin.locator(f"input[name=job][value='{job_id}']")).to_have_count(0)

    # "any", the state dropdown's own choice, lists them again, succeeded now.
    admin.select_option("select[name=state]", "any")
    admin.click("#filters button[type=submit]")
    admin.wait_for_url(re.compile(r".*/admin/\?state=any.*"))
    expect(admin.locator(".flash-bad")).to_have_count(0)
    expect(admin.locator("h1")).to_contain_text("All jobs")
    for job_id in chosen:
        expect(admin.locator(f"input[name=job][value='{job_id}']")).to_have_count(1)


def test_workers_page_shows_the_worker_and_the_failures_by_class(
    admin: Any, farm: AdminFarm
) -> None:
    """The workers page lists the live worker, its models, its queues, and the dtype failures
    of the day."""
    admin.goto(f"{farm.url}/admin/workers")
    workers = admin.locator("#workers tbody tr")
    expect(workers).to_have_count(1)
    expect(workers.first.locator(".worker-state")).to_have_text(re.compile("idle|busy"))
    expect(workers.first).to_contain_text("cpu")
    # The models it serves, and the one its render process holds once it has rendered.
    expect(workers.first.locator(".loaded-model")).to_contain_text("serves tiny")
    failures = admin.locator("#failures")
    expect(failures).to_contain_text("dtype mismatch")
    screenshot(admin, "admin-workers")

    failures.locator("a", has_text="jobs").first.click()
    admin.wait_for_url(re.compile(r".*/admin/\?.*error_class=dtype_mismatch"))
    expect(admin.locator("select[name=error_class]")).to_have_value("dtype_mismatch")
