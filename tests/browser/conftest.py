"""Browser fixtures: headless Chromium driven by Playwright, and a live farm (``svdfarm up``:
the web server and one real worker on the tiny model) answering over real HTTP.

The tests skip only when Playwright or Chromium is missing and ``SVDFARM_TEST_BROWSER`` is not
set; with it set (as CI does) a missing browser fails them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from svdfarm.db import Database
from svdfarm.lifecycle import By, record
from svdfarm.models import Attempt, Job, Worker
from svdfarm.states import EventType
from svdfarm.storage import FileStore, Store
from tests.factories import png_bytes
from tests.http import free_port
from tests.rows import QUEUE, job_row

#: Where the committed screenshots of the pages live (docs show them).
DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@functools.cache
def screenshot_dir() -> Path:
    """``docs/screenshots`` when ``SVDFARM_SCREENSHOTS`` is set (to refresh the committed
    pictures), else a temporary folder, so that a test run never changes tracked files."""
    if os.environ.get("SVDFARM_SCREENSHOTS"):
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return DOCS_SCREENSHOTS
    return Path(tempfile.mkdtemp(prefix="svdfarm-screenshots-"))


#: Chromium's flags for a quiet, sandbox-less headless run in a container.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing(reason: str) -> None:
    """Skip for a missing browser, or fail when ``SVDFARM_TEST_BROWSER`` asks for the tests."""
    if os.environ.get("SVDFARM_TEST_BROWSER"):
        pytest.fail(f"SVDFARM_TEST_BROWSER is set but {reason}", pytrace=False)
    pytest.skip(f"{reason} (set SVDFARM_TEST_BROWSER to make this a failure)")


def chromium_path() -> str | None:
    """The Chromium executable on PATH (Debian's ``chromium`` package), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium, launched once for the session."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is not installed (pip install playwright)")
    executable = chromium_path()
    if executable is None:
        _missing("no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


def watch_csp(context: Any) -> list[str]:
    """Collect what the Content-Security-Policy blocks in ``context``'s pages, as Chromium
    reports it on the console ("Refused to execute inline script ...")."""
    violations: list[str] = []

    def on_console(message: Any) -> None:
        """Keep console errors that are CSP refusals."""
        if message.type == "error" and "Content Security Policy" in message.text:
            violations.append(message.text)

    context.on("console", on_console)
    return violations


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page in a fresh browser context (its own cookies: its own "My jobs"); the test fails
    if the Content-Security-Policy blocked anything on it."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(30_000)
    violations = watch_csp(context)
    yield context.new_page()
    context.close()
    assert violations == [], violations


@dataclass
class Farm:
    """``svdfarm up`` running in a subprocess: its base URL, database, data folder and log."""

    url: str
    database_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path

    def log(self) -> str:
        """What the web server and the worker printed so far."""
        return self.log_path.read_text(errors="replace")

    def add_job(
        self,
        attempt: dict[str, Any] | None = None,
        events: Sequence[tuple[EventType, By, dict[str, Any]]] = (),
        **fields: Any,
    ) -> str:
        """Insert a job no worker will touch (``fields`` set its columns, e.g. a failed state
        with an error), its input a real PNG, an ``attempt`` row and ``events`` when given;
        its id.

        For what a live render cannot be made to do on cue: a model error, a step that runs
        long. The reaper leaves a running one alone for three heartbeats (30 s).
        """
        job_id = uuid.uuid4()
        key = Store.key(job_id, "input.png")
        FileStore(self.data_dir / "jobs").write_bytes(key, png_bytes(96, 64))
        database = Database(self.database_url)
        try:
            with database.begin() as session:
                values = {"queue": QUEUE, "input_key": key, "input_filename": "cat.png", **fields}
                session.add(job_row(job_id, **values))
                if attempt is not None:
                    defaults = {"number": 1, "worker": "gpu1@elsewhere", "plan_name": "fp16"}
                    session.add(Attempt(job_id=job_id, plan={}, **{**defaults, **attempt}))
                session.flush()
                for kind, by, details in events:
                    record(session, job_id, kind, by, details)
        finally:
            database.dispose()
        return str(job_id)

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Set columns of a job :meth:`add_job` inserted."""
        database = Database(self.database_url)
        try:
            with database.begin() as session:
                job = session.get(Job, uuid.UUID(job_id))
                assert job is not None
                for name, value in fields.items():
                    setattr(job, name, value)
        finally:
            database.dispose()


def _wait_until_ready(farm: Farm) -> None:
    """Block until the web answers /healthz and the worker has registered."""
    database = Database(farm.database_url)
    deadline = time.monotonic() + 120
    try:
        while True:
            if farm.process.poll() is not None:
                raise AssertionError(f"svdfarm up exited early:\n{farm.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"svdfarm up was not ready in 120 s:\n{farm.log()}")
            try:
                with urllib.request.urlopen(f"{farm.url}/healthz", timeout=2) as response:
                    healthy = json.load(response)["status"] == "ok"
                with database.session() as session:
                    registered = session.scalar(select(Worker)) is not None
                if healthy and registered:
                    return
            except OSError:
                pass
            time.sleep(0.3)
    finally:
        database.dispose()


@pytest.fixture(scope="module")
def farm(
    browser: Any, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Farm]:
    """A live farm on a free port: web server plus one worker, the tiny model, SQLite."""
    data_dir = tmp_path_factory.mktemp("farm") / "var"
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    port = free_port()
    env = {
        **os.environ,
        "SVDFARM_DATA_DIR": str(data_dir),
        "SVDFARM_MODEL": "tiny",
        "SVDFARM_DATABASE_URL": "",
        "SVDFARM_BROKER_URL": "",
        "SVDFARM_SECRET_KEY": "browser-test-secret",
        "SVDFARM_PROGRESS_INTERVAL": "0.2",
        # A test that fails mid-render must not keep the teardown waiting for the job.
        "SVDFARM_STOP_TIMEOUT": "5",
    }
    log_path = data_dir.parent / "up.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    farm = Farm(
        f"http://127.0.0.1:{port}",
        f"sqlite:///{data_dir / 'svdfarm.db'}",
        process,
        log_path,
        data_dir,
    )
    try:
        _wait_until_ready(farm)
        yield farm
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """The folder the page screenshots are saved in (see :func:`screenshot_dir`)."""
    return screenshot_dir()
