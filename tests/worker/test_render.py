"""Rendering with the tiny model: shapes, determinism, progress and cancellation."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from svdfarm.params import RenderParams
from worker.pipeline import load_pipeline
from worker.plans import Plan
from worker.render import fit_image, render_frames

FP32 = Plan.uniform("fp32", "cpu")
PARAMS = RenderParams(
    num_frames=8,
    num_inference_steps=4,
    fps=7,
    motion_bucket_id=127,
    noise_aug_strength=0.02,
    seed=42,
    decode_chunk_size=8,
    width=64,
    height=64,
    precision="fp32",
)


class Stop(Exception):
    """Raised by a step callback to cancel a render."""


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> StableVideoDiffusionPipeline:
    return load_pipeline(str(tiny_model_dir), tiny_model_dir.parent, FP32)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A wide gradient photo-like image, so fitting has to crop."""
    x = np.linspace(0, 255, 160)[None, :, None]
    y = np.linspace(0, 255, 90)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def first_render(pipe: StableVideoDiffusionPipeline, image: Image.Image) -> dict[str, object]:
    steps: list[tuple[int, int]] = []
    frames = render_frames(pipe, image, PARAMS, FP32, on_step=lambda *s: steps.append(s))
    return {"frames": frames, "steps": steps}


def test_render_returns_uint8_frames_and_reports_each_step(first_render: dict) -> None:
    frames = first_render["frames"]
    assert isinstance(frames, np.ndarray)
    assert frames.shape == (8, 64, 64, 3)
    assert frames.dtype == np.uint8
    assert frames.std() > 1, "frames should not be a flat colour"
    assert first_render["steps"] == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_same_seed_same_frames_other_seed_other_frames(
    pipe: StableVideoDiffusionPipeline, image: Image.Image, first_render: dict
) -> None:
    again = render_frames(pipe, image, PARAMS, FP32)
    np.testing.assert_array_equal(again, first_render["frames"])
    other = render_frames(pipe, image, replace(PARAMS, seed=43), FP32)
    assert np.abs(other.astype(int) - again.astype(int)).mean() > 0.5


def test_an_on_step_that_raises_stops_the_render(
    pipe: StableVideoDiffusionPipeline, image: Image.Image
) -> None:
    steps: list[tuple[int, int]] = []

    def on_step(done: int, total: int) -> None:
        steps.append((done, total))
        if done == 2:
            raise Stop("canceled")

    with pytest.raises(Stop, match="canceled"):
        render_frames(pipe, image, PARAMS, FP32, on_step=on_step)
    assert steps == [(1, 4), (2, 4)]


def test_width_and_height_are_not_swapped(
    pipe: StableVideoDiffusionPipeline, image: Image.Image
) -> None:
    params = replace(PARAMS, num_frames=2, num_inference_steps=1, width=128, height=64)
    frames = render_frames(pipe, image, params, FP32)
    assert frames.shape == (2, 64, 128, 3)


def test_the_whole_pipeline_in_bf16_renders_on_cpu(
    tiny_model_dir: Path, image: Image.Image
) -> None:
    plan = Plan.uniform("bf16", "cpu")
    bf16 = load_pipeline(str(tiny_model_dir), tiny_model_dir.parent, plan)
    params = replace(PARAMS, num_frames=2, num_inference_steps=1, precision="bf16")
    frames = render_frames(bf16, image, params, plan)
    assert frames.shape == (2, 64, 64, 3) and frames.dtype == np.uint8


def test_fit_image_covers_and_crops_the_centre() -> None:
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :100] = (255, 0, 0)  # left third red
    wide[:, 100:200] = (0, 255, 0)  # middle third green
    wide[:, 200:] = (0, 0, 255)  # right third blue
    fitted = np.asarray(fit_image(Image.fromarray(wide), 64, 64))
    assert fitted.shape == (64, 64, 3)
    assert (fitted[:, 5:59] == (0, 255, 0)).all(), "only the green centre should remain"

    tall = Image.fromarray(wide).convert("RGBA").rotate(90, expand=True)  # 100 wide, 300 tall
    fitted = fit_image(tall, 128, 64)
    assert fitted.mode == "RGB" and fitted.size == (128, 64)


def test_fit_image_applies_exif_orientation() -> None:
    stored = np.zeros((60, 120, 3), np.uint8)
    stored[:, :60] = (255, 0, 0)  # left half red
    stored[:, 60:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left edge goes on top
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif)
    fitted = np.asarray(fit_image(Image.open(buffer), 64, 128)).astype(int)
    assert fitted.shape == (128, 64, 3)
    top, bottom = fitted[10, 32], fitted[118, 32]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_the_guidance_scales_reach_the_pipeline(
    pipe: StableVideoDiffusionPipeline, image: Image.Image, first_render: dict
) -> None:
    """The job's min and max guidance are the pipeline's ramp across the frames, and they
    change the video: no guidance (1.0 to 1.0) renders other frames than 1.0 to 3.0."""
    params = replace(PARAMS, min_guidance_scale=1.5, max_guidance_scale=4.5)
    render_frames(pipe, image, params, FP32)
    ramp = pipe.guidance_scale.flatten().tolist()
    assert len(ramp) == params.num_frames
    assert ramp[0] == pytest.approx(1.5) and ramp[-1] == pytest.approx(4.5)
    off = replace(PARAMS, min_guidance_scale=1.0, max_guidance_scale=1.0)
    assert not np.array_equal(render_frames(pipe, image, off, FP32), first_render["frames"])
