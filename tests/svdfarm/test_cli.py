"""The ``svdfarm`` command, run as a real subprocess: db, model, render, and up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from tests.factories import png_bytes
from tests.http import free_port, multipart
from tests.media import probe_video

SVDFARM = [sys.executable, "-m", "svdfarm.cli"]


def _env(data_dir: Path, tiny_model_dir: Path, **extra: str) -> dict[str, str]:
    """A process environment for svdfarm in ``data_dir``, sharing the session's tiny model."""
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    link = data_dir / "models" / "tiny"
    if not link.exists():
        link.symlink_to(tiny_model_dir, target_is_directory=True)
    return {
        **os.environ,
        "SVDFARM_DATA_DIR": str(data_dir),
        "SVDFARM_MODEL": "tiny",
        "SVDFARM_DATABASE_URL": "",
        "SVDFARM_BROKER_URL": "",
        **extra,
    }


def test_db_upgrade_creates_tables(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``svdfarm db upgrade`` migrates the default SQLite database in the data folder."""
    env = _env(tmp_path / "var", tiny_model_dir)
    done = subprocess.run([*SVDFARM, "db", "upgrade"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'svdfarm.db'}")
    assert {"jobs", "attempts", "workers"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_model_tiny_writes_a_loadable_folder(tmp_path: Path) -> None:
    """``svdfarm model tiny DIR`` writes a folder that from_pretrained reads."""
    target = tmp_path / "tiny-out"
    done = subprocess.run(
        [*SVDFARM, "model", "tiny", str(target)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == "StableVideoDiffusionPipeline"
    from diffusers import StableVideoDiffusionPipeline

    from svdfarm.params import TINY_BASE_SIDE, model_base_side

    pipe = StableVideoDiffusionPipeline.from_pretrained(target)
    assert type(pipe.unet).__name__ == "UNetSpatioTemporalConditionModel"
    # Read from the saved configs without torch, the folder's native size is the tiny one.
    assert model_base_side(str(target)) == TINY_BASE_SIDE


def test_render_writes_the_mp4_asked_for(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``svdfarm render`` renders without the queue, with the flags' frames and size."""
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes(200, 100))
    out = tmp_path / "out" / "video.mp4"
    done = subprocess.run(
        [
            *SVDFARM,
            "render",
            str(image),
            "-o",
            str(out),
            "--frames",
            "5",
            "--steps",
            "2",
            "--width",
            "128",
            "--height",
            "64",
            "--fps",
            "5",
            "--seed",
            "3",
            "--precision",
            "fp32",
        ],
        env=_env(tmp_path / "var", tiny_model_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "100.0%" in done.stderr  # the progress bar reached the end
    info = probe_video(out)
    assert info["frames"] == 5
    assert (info["width"], info["height"]) == (128, 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "1"], "Frames must be between 2 and 128"),
        (["--width", "100", "--height", "64"], "multiple of 64"),
        (["--width", "128"], "Give both width and height"),
    ],
)
def test_render_refuses_bad_flags(
    tmp_path: Path, tiny_model_dir: Path, args: list[str], message: str
) -> None:
    """Bad flags exit with status 2 and the same message the form shows."""
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes())
    out = tmp_path / "out.mp4"
    done = subprocess.run(
        [*SVDFARM, "render", str(image), "-o", str(out), *args],
        env=_env(tmp_path / "var", tiny_model_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert not out.exists()


def test_render_refuses_a_file_that_is_not_an_image(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A text file named .png is refused by its content."""
    image = tmp_path / "fake.png"
    image.write_text("not an image")
    done = subprocess.run(
        [*SVDFARM, "render", str(image), "-o", str(tmp_path / "o.mp4")],
        env=_env(tmp_path / "var", tiny_model_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "not a PNG, JPEG or WebP image" in done.stderr


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
def test_up_serves_renders_and_stops_every_child(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``svdfarm up`` migrates, serves HTTP, renders a job; SIGINT stops all its children."""
    port = free_port()
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [*SVDFARM, "up", "--port", str(port)],
            env=_env(tmp_path / "var", tiny_model_dir),
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


def test_caps_prints_the_probe_and_the_plans(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``svdfarm caps`` names this machine, its bf16/fp16 answers and a plan per precision."""
    env = _env(tmp_path / "var", tiny_model_dir)
    text = subprocess.run([*SVDFARM, "caps"], env=env, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "(cpu," in text.stdout and "bf16_op" in text.stdout
    assert "auto  -> fp32, chunk 8 on cpu" in text.stdout
    done = subprocess.run(
        [*SVDFARM, "caps", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    data = json.loads(done.stdout)
    assert data["capabilities"]["device"] == "cpu"
    assert data["capabilities"]["total_memory_bytes"] > 0
    assert set(data["plans"]) == {"auto", "bf16", "fp16", "fp32"}
    assert data["plans"]["bf16"]["unet"] == "bf16"


def test_render_without_casts_recovers_in_fp32_and_prints_the_attempts(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """``--no-casts --dtypes vae=bf16 --json``: the seed's error, then fp32, as JSON."""
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes())
    out = tmp_path / "out.mp4"
    done = subprocess.run(
        [
            *SVDFARM,
            "render",
            str(image),
            "-o",
            str(out),
            "--frames",
            "3",
            "--steps",
            "1",
            "--no-casts",
            "--dtypes",
            "vae=bf16",
            "--json",
        ],
        env=_env(tmp_path / "var", tiny_model_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    attempts = json.loads(done.stdout)["attempts"]
    assert [a["outcome"] for a in attempts] == ["failed", "succeeded"]
    assert attempts[0]["error_class"] == "dtype_mismatch"
    assert attempts[0]["component"] == "vae"
    assert "bias type (c10::BFloat16) should be the same" in attempts[0]["message"]
    assert attempts[0]["plan"].startswith("fp32 unet+enc, bf16 vae")
    assert attempts[1]["plan"].startswith("fp32, chunk 3")
    assert all(a["duration_s"] > 0 and a["peak_memory_bytes"] > 0 for a in attempts)
    assert probe_video(out)["frames"] == 3


def test_render_refuses_bad_dtypes(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A malformed ``--dtypes`` exits 2 naming the bad item."""
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes())
    done = subprocess.run(
        [*SVDFARM, "render", str(image), "-o", str(tmp_path / "o.mp4"), "--dtypes", "vae=fp8"],
        env=_env(tmp_path / "var", tiny_model_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "vae=fp8" in done.stderr


def test_worker_gpus_all_needs_cuda(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``--gpus all`` on a machine without CUDA says so and exits 2."""
    done = subprocess.run(
        [*SVDFARM, "worker", "--gpus", "all"],
        env=_env(tmp_path / "var", tiny_model_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr


@pytest.mark.slow
def test_worker_per_gpu_starts_one_named_worker_each_and_stops_them(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """``--gpus 0,1`` starts a worker per index (gpu0@, gpu1@, each with its own
    CUDA_VISIBLE_DEVICES); SIGTERM to the parent stops both."""
    from sqlalchemy import select

    from svdfarm.db import Database, upgrade
    from svdfarm.models import Worker

    env = _env(tmp_path / "var", tiny_model_dir)
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
