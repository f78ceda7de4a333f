"""One render from an image to an MP4 and a poster: the worker's code path, queue or not."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from svdfarm.params import RenderParams
from svdfarm.settings import Settings
from worker.plans import Plan

#: report(phase, progress 0..1, step): called as the render moves; may raise to stop it.
Reporter = Callable[[str, float, int], None]

# Shares of the progress bar; denoising dominates the time of a real render.
_LOADED, _DENOISED, _ENCODING = 0.05, 0.90, 0.96


@dataclass(frozen=True)
class RenderOutcome:
    """How long a render took and the most memory it used."""

    duration_s: float
    peak_memory_bytes: int | None


def peak_memory_bytes(device: str) -> int | None:
    """Peak CUDA memory allocated on a GPU, or the process's peak RSS elsewhere."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def render_to_files(
    settings: Settings,
    params: RenderParams,
    plan: Plan,
    image: Image.Image,
    video_path: Path,
    poster_path: Path,
    report: Reporter,
) -> RenderOutcome:
    """Load the model (cached per process), render the frames, write the MP4 and poster."""
    from worker.pipeline import load_pipeline
    from worker.render import render_frames
    from worker.video import encode_mp4, write_poster

    started = time.monotonic()
    if plan.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    report("loading", 0.0, 0)
    pipe = load_pipeline(settings.model, settings.models_dir, plan, settings.hub_timeout_s)
    report("denoising", _LOADED, 0)

    def on_step(step: int, total: int) -> None:
        progress = _LOADED + (_DENOISED - _LOADED) * step / total
        report("decoding" if step >= total else "denoising", progress, step)

    frames = render_frames(pipe, image, params, plan, on_step)
    report("encoding", _ENCODING, params.num_inference_steps)
    encode_mp4(frames, params.fps, video_path)
    write_poster(frames, poster_path)
    return RenderOutcome(time.monotonic() - started, peak_memory_bytes(plan.device))
