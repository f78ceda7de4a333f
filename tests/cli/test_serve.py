"""``svdfarm up``, ``worker --gpus`` and the supervision of children (:mod:`cli.serve`)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cli.serve import stop_children
from tests.factories import png_bytes
from tests.http import free_port, multipart
from tests.processes import SVDFARM


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
