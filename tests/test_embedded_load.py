"""The embedded setup under load: one SQLite file and the server-less broker, ``svdfarm web``
and a worker writing progress, while 20 clients submit at once and others poll.

SQLite takes one writer at a time; WAL and a busy timeout (svdfarm/db.py) make the others
wait their turn instead of failing. Every answer here must be 201 or 200 and no process may
log "database is locked".
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from svdfarm.db import Database, upgrade
from svdfarm.models import Job
from svdfarm.states import JobState
from tests.conftest import make_settings
from tests.factories import png_bytes
from tests.http import free_port, multipart
from tests.load import request, wait_until_serving
from tests.processes import LiveProcess, start_web, start_worker, stop_all
from tests.rows import wait_for_worker

pytestmark = pytest.mark.slow

SUBMITTERS = 20
EACH = 2
POLLERS = 4
FIELDS = {"num_frames": "2", "num_inference_steps": "1", "width": "64", "height": "64"}
DRAIN_TIMEOUT_S = 300


def test_sqlite_under_concurrent_submits_answers_without_locking(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """20 clients submit 2 jobs each at the same moment to the web on SQLite while a worker
    renders and writes progress and 4 clients poll: every submit is 201, every poll 200,
    every job succeeds, and no log says "database is locked"."""
    database_url = f"sqlite:///{tmp_path / 'var' / 'svdfarm.db'}"
    limits = {"SVDFARM_SUBMIT_RATE": "0", "SVDFARM_MAX_QUEUED": "0"}
    settings = make_settings(tmp_path / "var", database_url, tiny_model_dir, **limits)
    assert settings.embedded_broker
    upgrade(settings.database_url)
    extra = {**limits, "SVDFARM_SECRET_KEY": "test-secret", "SVDFARM_PROGRESS_INTERVAL": "0.1"}
    port = free_port()
    db = Database(settings.database_url)
    processes: list[LiveProcess] = []
    body, content_type = multipart(FIELDS, png_bytes(64, 64))
    problems: list[str] = []
    accepted: list[str] = []
    lock = threading.Lock()
    start = threading.Event()
    submitting = threading.Event()
    submitting.set()

    def submitter() -> None:
        start.wait()
        for _ in range(EACH):
            try:
                answer = request(port, "POST", "/api/v1/jobs", body, {"Content-Type": content_type})
            except OSError as exc:
                with lock:
                    problems.append(f"submit: {exc!r}")
                continue
            with lock:
                if answer.status == 201:
                    accepted.append(answer.json()["id"])
                else:
                    problems.append(f"submit: {answer.status} {answer.body[:300]!r}")

    def poller() -> None:
        start.wait()
        while submitting.is_set():
            with lock:
                job_id = accepted[-1] if accepted else None
            path = f"/api/v1/jobs/{job_id}" if job_id else "/healthz"
            try:
                answer = request(port, "GET", path)
            except OSError as exc:
                with lock:
                    problems.append(f"poll: {exc!r}")
                continue
            if answer.status != 200:
                with lock:
                    problems.append(f"poll: {answer.status} {answer.body[:300]!r}")
            time.sleep(0.05)

    try:
        web = start_web(settings, tmp_path, port, cwd=tmp_path, **extra)
        processes.append(web)
        worker = start_worker(settings, tmp_path, "embedded", cwd=tmp_path, **extra)
        processes.append(worker)
        wait_until_serving(web, port)
        wait_for_worker(db, worker.hostname, worker.process, worker.text)
        threads = [threading.Thread(target=submitter) for _ in range(SUBMITTERS)]
        threads += [threading.Thread(target=poller) for _ in range(POLLERS)]
        for thread in threads:
            thread.start()
        start.set()
        for thread in threads[:SUBMITTERS]:
            thread.join(timeout=300)
        submitting.clear()
        for thread in threads[SUBMITTERS:]:
            thread.join(timeout=60)
        assert not problems, problems[:10]
        assert len(accepted) == SUBMITTERS * EACH
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        ended: int | None = 0
        while time.monotonic() < deadline:
            with db.session() as session:
                ended = session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.state.in_(JobState.terminal_states()))
                )
            if ended == len(accepted):
                break
            time.sleep(1)
        logs = "\n".join(p.text(None) for p in processes)
        assert ended == len(accepted), f"{ended} of {len(accepted)} ended\n{logs[-4000:]}"
        with db.session() as session:
            states = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        assert dict(states) == {JobState.SUCCEEDED: len(accepted)}, states
        assert "database is locked" not in logs, logs[-4000:]
    finally:
        stop_all(processes)  # side by side
        db.dispose()
