"""Previews while denoising (worker.previews): the latent-to-RGB map, the denoised estimate,
the throttle, the claim's hold on the pointer, and a real tiny render that stores them."""

from __future__ import annotations

import io
import logging
import time
import uuid
from typing import Any

import numpy as np
import pytest
import torch
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from svdfarm.db import Database
from svdfarm.settings import Settings
from svdfarm.states import JobState
from svdfarm.storage import FileStore, Store, preview_key, preview_step
from tests.conftest import DATABASES
from tests.rows import job_with_attempts, submit_small_job
from worker.execute import run_job
from worker.previews import (
    PREVIEW_SIDE,
    PreviewWriter,
    denoised_estimate,
    latent_to_rgb,
    middle_frame,
)


def _mean_rgb(image: Image.Image) -> tuple[float, float, float]:
    """The mean of each channel of ``image``."""
    red, green, blue = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0).tolist()
    return red, green, blue


def test_latent_to_rgb_is_a_small_picture_of_the_frame() -> None:
    """A (4, h, w) frame becomes an RGB picture 256 px on its longer side, with the frame's
    aspect; zero latents are mid grey and any latents stay in 0..255."""
    image = latent_to_rgb(torch.zeros(4, 9, 16))
    assert image.mode == "RGB" and image.size == (PREVIEW_SIDE, 144)
    assert (np.asarray(image) == 128).all()
    wild = latent_to_rgb(torch.randn(4, 72, 128) * 100)
    assert wild.size == (PREVIEW_SIDE, 144)
    values = np.asarray(wild)
    assert values.min() == 0 and values.max() == 255  # clipped, both ends reached


def test_latent_to_rgb_gives_each_channel_its_colour() -> None:
    """SD's channel 4 negative is blue, channel 1 positive is warm (red first), channel 2
    positive is green (ComfyUI's SD 1.x factors); fp16 latents on any device are read."""
    blue = torch.zeros(4, 8, 8)
    blue[3] = -1.0
    red, green, b = _mean_rgb(latent_to_rgb(blue))
    assert b > green > red > 128
    warm = torch.zeros(4, 8, 8, dtype=torch.float16)
    warm[0] = 1.0
    red, green, b = _mean_rgb(latent_to_rgb(warm))
    assert red > b > green > 128
    grass = torch.zeros(4, 8, 8)
    grass[1] = 1.0
    red, green, b = _mean_rgb(latent_to_rgb(grass))
    assert green > red > b


def test_the_middle_frame_of_the_pipelines_latents() -> None:
    """Latents are (batch, frames, channels, h, w): the first video's middle frame."""
    latents = torch.arange(14, dtype=torch.float32).reshape(1, 14, 1, 1, 1).expand(1, 14, 4, 2, 3)
    frame = middle_frame(latents)
    assert frame.shape == (4, 2, 3) and float(frame[0, 0, 0]) == 7.0


def test_the_denoised_estimate_undoes_an_euler_step() -> None:
    """From the latents before and after an Euler step, the estimate is the x0 it aimed at."""
    x0, noise = torch.randn(4, 6, 6), torch.randn(4, 6, 6)
    sigma, sigma_next = 80.0, 50.0
    before = x0 + sigma * noise
    after = before + (before - x0) / sigma * (sigma_next - sigma)
    assert torch.allclose(denoised_estimate(before, after, sigma, sigma_next), x0, atol=1e-3)


class _Recorder(PreviewWriter):
    """A writer that records the steps it would preview instead of storing them."""

    def __init__(self, interval_s: float, clock: Any) -> None:
        super().__init__(None, None, uuid.uuid4(), "t", interval_s, clock=clock)  # type: ignore[arg-type]
        self.steps: list[int] = []

    def write(self, step: int, image: Image.Image) -> bool:
        self.steps.append(step)
        return True


def _steps(writer: PreviewWriter, times: list[float], total: int) -> None:
    """Call ``writer`` after each of ``total`` steps, the clock reading ``times``."""
    clock = iter(times)
    writer.clock = lambda: next(clock)
    latents = torch.zeros(1, 3, 4, 2, 2)
    for step in range(1, total + 1):
        writer(object(), step, total, latents)


def test_the_throttle_previews_once_per_interval_and_never_on_the_last_step() -> None:
    """Steps every 0.5 s with a 2 s interval: a preview 2 s after the first step and every
    2 s after it, none on the last; 0 turns them off."""
    recorder = _Recorder(2.0, time.monotonic)
    # Each preview reads the clock twice (the step, then its cost).
    times = []
    for step in range(1, 13):
        times.append(0.5 * step)
        if step in (5, 9):
            times.append(0.5 * step)
    _steps(recorder, times, total=12)
    assert recorder.steps == [5, 9]
    last = _Recorder(2.0, time.monotonic)
    _steps(last, [0.5 * s for s in range(1, 6)], total=5)
    assert last.steps == []  # step 5 would be due, but it is the last
    off = _Recorder(0.0, time.monotonic)
    _steps(off, [0.5 * s for s in range(1, 6)], total=10)
    assert off.steps == []


def test_a_failed_preview_never_stops_the_render(caplog: pytest.LogCaptureFixture) -> None:
    """An error while previewing is logged and the render goes on; Celery's soft time limit
    goes through."""

    class Broken(_Recorder):
        def write(self, step: int, image: Image.Image) -> bool:
            raise OSError("disk full")

    broken = Broken(0.001, time.monotonic)
    with caplog.at_level(logging.WARNING, logger="worker.previews"):
        _steps(broken, [float(s) for s in range(1, 20)], total=4)
    assert "preview after step 2 failed" in caplog.text

    class Late(_Recorder):
        def write(self, step: int, image: Image.Image) -> bool:
            raise SoftTimeLimitExceeded()

    with pytest.raises(SoftTimeLimitExceeded):
        _steps(Late(0.001, time.monotonic), [float(s) for s in range(1, 20)], total=4)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_claim_that_does_not_hold_the_job_writes_no_pointer(
    db: Database, settings: Settings
) -> None:
    """A preview of a token that is not the job's (a lost claim) leaves the row alone and
    deletes its file; the writer stops previewing."""
    job_id = submit_small_job(db, settings)
    store = FileStore(settings.storage_dir)
    writer = PreviewWriter(db, store, job_id, "lost", 0.01)
    assert writer.write(3, Image.new("RGB", (8, 8))) is False
    assert job_with_attempts(db, job_id).preview_key is None
    assert store.list_keys(Store.key(job_id, "preview.")) == []
    writer(object(), 4, 10, torch.zeros(1, 2, 4, 2, 2))  # lost: nothing more
    assert writer.written == [preview_key(job_id, "lost", 3)]


def test_preview_keys_name_their_claim_and_step() -> None:
    """The key says the claim and the step; only the current claim's key reads as a step."""
    key = preview_key(uuid.UUID(int=1), "abc", 12)
    assert key == f"{uuid.UUID(int=1)}/preview.abc.12.jpg"
    assert preview_step(key, "abc") == 12
    assert preview_step(key, "other") is None
    assert preview_step(None, "abc") is None
    assert preview_step(f"{uuid.UUID(int=1)}/poster.abc.png", "abc") is None


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_tiny_render_stores_previews_under_its_claim_then_drops_them(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real tiny render, a preview due at every step: each is a decodable JPEG of at most
    256 px, stored under the claim's token and pointed at by the running job; none after the
    last step; once the job succeeded they are gone and the row points at none."""
    job_id = submit_small_job(db, settings, num_inference_steps="5", num_frames="4")
    store = FileStore(settings.storage_dir)
    seen: list[tuple[int, str | None, JobState, bytes]] = []
    original = PreviewWriter.write

    def spy(self: PreviewWriter, step: int, image: Image.Image) -> bool:
        held = original(self, step, image)
        row = job_with_attempts(db, job_id)
        seen.append((step, row.preview_key, row.state, store.read_bytes(row.preview_key or "")))
        return held

    monkeypatch.setattr(PreviewWriter, "write", spy)
    fast = settings.with_overrides(preview_interval_s=0.001)
    assert run_job(db, fast, str(job_id), "w1@test") == "succeeded"
    # Step 1 has no earlier latents for the denoised estimate: steps 2 to 4.
    assert [step for step, *_ in seen] == [2, 3, 4]
    job = job_with_attempts(db, job_id)
    token = (job.video_key or "").split(".")[1]  # the claim's (its row forgets it at the end)
    for step, key, state, data in seen:
        assert key == preview_key(job_id, token, step) and state is JobState.RUNNING
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and max(image.size) == PREVIEW_SIDE
    assert job.preview_key is None
    assert store.list_keys(Store.key(job_id, "preview.")) == []


def test_previews_are_throttled_on_a_real_render(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default 2 s interval, a tiny render of many steps stores at most one preview
    per 2 s of wall time, each at least 2 s after the one before."""
    job_id = submit_small_job(db, settings, num_inference_steps="12", num_frames="4")
    stamps: list[float] = []
    original = PreviewWriter.write

    def spy(self: PreviewWriter, step: int, image: Image.Image) -> bool:
        stamps.append(time.monotonic())
        return original(self, step, image)

    monkeypatch.setattr(PreviewWriter, "write", spy)
    started = time.monotonic()
    assert run_job(db, settings, str(job_id), "w1@test") == "succeeded"
    wall = time.monotonic() - started
    assert settings.preview_interval_s == 2.0
    assert len(stamps) <= wall / 2.0
    assert stamps or wall < 4.0  # a render this long previews
    assert all(b - a >= 2.0 for a, b in zip(stamps, stamps[1:], strict=False))
