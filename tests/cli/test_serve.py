"""``svdfarm up``, ``worker --gpus`` and the supervision of children (:mod:`cli.serve`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from cli.serve import stop_children
from svdfarm.db import Database
from tests.factories import png_bytes
from tests.http import free_port, multipart
from tests.processes import SVDFARM, start_svdfarm
from tests.rows import read_job, wait_until


def _children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_up_serves_renders_and_stops_every_child(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """``svdfarm up`` migrates, serves HTTP, renders a job; SIGINT stops all its children."""
    port = free_port()
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [*SVDFARM, "up", "--port", str(port)],
            env=cli_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert up.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:
                    assert json.load(response)["status"] == "ok"
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        body, content_type = multipart(
            {"num_frames": "4", "num_inference_steps": "2"}, png_bytes(64, 64)
        )
        request = urllib.request.Request(
            f"{base}/api/v1/jobs", data=body, headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201
            status_url = json.load(response)["status_url"]
        deadline = time.monotonic() + 180
        while True:
            with urllib.request.urlopen(status_url, timeout=5) as response:
                job = json.load(response)
            if job["state"] in ("succeeded", "failed", "canceled"):
                break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        assert job["state"] == "succeeded", (job, log.read_text())
        with urllib.request.urlopen(job["video_url"], timeout=10) as response:
            assert response.headers["Content-Type"] == "video/mp4"
            assert len(response.read()) > 1000

        children = _children(up.pid)
        assert len(children) == 2
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        for pid in children:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            ), f"child {pid} still running"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_worker_gpus_all_needs_cuda(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """``--gpus all`` on a machine without CUDA says so and exits 2."""
    done = subprocess.run(
        [*SVDFARM, "worker", "--gpus", "all"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr


@pytest.mark.slow
def test_worker_per_gpu_starts_one_named_worker_each_and_stops_them(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """``--gpus 0,1`` starts a worker per index (gpu0@, gpu1@, each with its own
    CUDA_VISIBLE_DEVICES); SIGTERM to the parent stops both."""
    from sqlalchemy import select

    from svdfarm.db import Database, upgrade
    from svdfarm.models import Worker

    env = cli_env
    database_url = f"sqlite:///{tmp_path / 'var' / 'svdfarm.db'}"
    upgrade(database_url)
    log = tmp_path / "gpus.log"
    with open(log, "wb") as out:
        parent = subprocess.Popen(
            [*SVDFARM, "worker", "--gpus", "0,1"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    db = Database(database_url)
    try:
        deadline = time.monotonic() + 120
        while True:
            with db.session() as session:
                rows = session.scalars(select(Worker)).all()
                names = sorted(w.hostname.split("@")[0] for w in rows)
            if names == ["gpu0", "gpu1"]:
                break
            assert parent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        children = _children(parent.pid)
        assert len(children) == 2
        for pid in children:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert any(e.startswith(b"CUDA_VISIBLE_DEVICES=") for e in environ)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=120) == 0, log.read_text()
        for pid in children:
            assert (
                not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text()
            )
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        db.dispose()


#: A child that says it is ready, then ignores SIGTERM: only SIGKILL stops it.
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(120)"
)


def test_stop_children_terminates_then_kills_what_outlives_the_grace() -> None:
    """A child that heeds SIGTERM ends by it; one that ignores it is killed once ``grace_s``
    has passed, one deadline for both."""
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    stubborn = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
        started = time.monotonic()
        stop_children([polite, stubborn], grace_s=1.0)
        took = time.monotonic() - started
    finally:
        for child in (polite, stubborn):
            if child.poll() is None:
                child.kill()
                child.wait()
        if stubborn.stdout is not None:
            stubborn.stdout.close()
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
    assert 1.0 <= took < 10, took


@pytest.mark.parametrize("gpus", ["x", "0,one", "-1"])
def test_worker_gpus_refuses_what_is_not_indices(
    gpus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--gpus`` takes ``all`` or indices: anything else exits 2 naming it, starting nothing."""
    from cli import main

    assert main(["worker", "--gpus", gpus]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --gpus takes 'all' or GPU indices like 0,1; got {gpus!r}\n"


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children, ...), from Linux /proc."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` is a process that has not exited (a zombie has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _group_left(pgid: int) -> bool:
    """True while some process is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_second_signal_hands_the_running_job_back_and_leaves_no_process(
    tmp_path: Path, cli_env: dict[str, str], how: str
) -> None:
    """``svdfarm up`` with a job rendering: the first Ctrl-C (SIGINT to its process group, as a
    terminal sends it) or SIGTERM (to it alone, as a supervisor sends it) waits for the job
    with a countdown; the second stops everything within seconds, with no traceback, and the
    job is back in the queue."""
    from svdfarm import lifecycle
    from svdfarm.states import EventType

    port = free_port()
    env = {**cli_env, "OMP_NUM_THREADS": "1", "SVDFARM_HEARTBEAT_INTERVAL": "1"}
    up = start_svdfarm("up", ["up", "--port", str(port)], env, tmp_path)  # its own group
    base = f"http://127.0.0.1:{port}"
    db = Database(f"sqlite:///{tmp_path / 'var' / 'svdfarm.db'}")
    pids: set[int] = set()
    try:

        def healthy() -> bool:
            assert up.process.poll() is None, up.text()
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_until(healthy, "the web to answer", 120, up.text)
        body, content_type = multipart(
            {"num_frames": "8", "num_inference_steps": "200"}, png_bytes(64, 64)
        )
        request = urllib.request.Request(
            f"{base}/api/v1/jobs", data=body, headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            job_id = uuid.UUID(json.load(response)["id"])

        def denoising() -> bool:
            job = read_job(db, job_id)
            return job is not None and job.phase.value == "denoising" and job.step > 0

        wait_until(denoising, "the job to be denoising", 180, up.text)
        pids = {up.process.pid} | _descendants(up.process.pid)
        assert len(pids) >= 4, pids  # up, web, worker and the worker's pool process

        def stop() -> None:
            if how == "ctrl-c":
                os.killpg(up.process.pid, signal.SIGINT)
            else:
                up.process.send_signal(signal.SIGTERM)

        stop()
        wait_until(
            lambda: "Ctrl-C again to hand it back now (" in up.text(),
            "the countdown",
            30,
            up.text,
        )
        assert read_job(db, job_id).state.value == "running"  # type: ignore[union-attr]
        stop()

        def all_gone() -> bool:
            up.process.poll()
            return not any(_alive(pid) for pid in pids) and not _group_left(up.process.pid)

        wait_until(all_gone, "every process of the farm to exit", 30, up.text)
        printed = up.text(None)
        assert "Traceback" not in printed and "KeyboardInterrupt" not in printed, printed
        job = read_job(db, job_id)
        assert job is not None and job.state.value == "queued", printed
        with db.session() as session:
            types = [e.type for e in lifecycle.events_of(session, job_id)]
        assert EventType.HANDED_BACK in types or EventType.WORKER_LOST in types, types
    finally:
        up.kill()
        for pid in pids | _descendants(up.process.pid):
            if _alive(pid):  # what the farm left behind: never leak it into other tests
                os.kill(pid, signal.SIGKILL)
        db.dispose()


@pytest.mark.slow
def test_two_workers_on_one_machine_take_a_name_each(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """Two ``svdfarm worker`` without ``--hostname`` on one machine: a name each
    (``worker<N>@<host>``), a registry row each, and one stopping leaves the other online.
    Their logs hold none of the library noise a user cannot act on, a job rendered (and
    the tiny model written) included."""
    import io
    import re

    from svdfarm.db import upgrade
    from svdfarm.models import Worker
    from svdfarm.registry import online_workers
    from svdfarm.settings import load_settings
    from web import create_app

    data_dir = tmp_path / "fresh"  # no tiny model yet: the worker that runs the job writes it
    env = {**cli_env, "SVDFARM_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    env["SVDFARM_HEARTBEAT_INTERVAL"] = "1"
    settings = load_settings(env)
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    workers = [start_svdfarm(name, ["worker"], env, tmp_path) for name in ("one", "two")]
    app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
    try:

        def rows() -> list[str]:
            for worker in workers:
                assert worker.process.poll() is None, worker.text()
            with db.session() as session:
                return sorted(w.hostname for w in session.query(Worker))

        wait_until(lambda: len(rows()) == 2, "both workers to register", 180)
        names = rows()
        assert all(re.fullmatch(r"worker\d+@.+", name) for name in names), names
        response = app.test_client().post(
            "/api/v1/jobs",
            data={
                "image": (io.BytesIO(png_bytes(64, 64)), "in.png"),
                "num_frames": "2",
                "num_inference_steps": "1",
            },
            content_type="multipart/form-data",
        )
        assert response.status_code == 201, response.get_json()
        job_id = uuid.UUID(response.get_json()["id"])

        def finished() -> bool:
            job = read_job(db, job_id)
            return job is not None and job.state.value in ("succeeded", "failed")

        wait_until(finished, "the job", 180, lambda: workers[0].text() + workers[1].text())
        assert read_job(db, job_id).state.value == "succeeded"  # type: ignore[union-attr]

        workers[0].process.send_signal(signal.SIGTERM)
        assert workers[0].process.wait(timeout=60) == 0, workers[0].text()
        with db.session() as session:
            left = [w.hostname for w in online_workers(session, settings)]
        assert len(left) == 1 and left[0] in names, left
        for worker in workers:
            printed = worker.text(None)
            for noise in (
                "DuplicateNodenameWarning",
                "No hostname was supplied",
                "requires torchvision",
                "shards",
            ):
                assert noise not in printed, (noise, printed)
    finally:
        for worker in workers:
            worker.stop()
        app.extensions["svdfarm.db"].dispose()
        db.dispose()
