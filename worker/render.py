"""Running SVD on one image: fit the image, call the pipeline, report progress, return frames."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from svdfarm.params import RenderParams
from worker.errors import check_finite
from worker.plans import Plan

if TYPE_CHECKING:
    # The defining module: diffusers' lazy top-level names type as dummies.
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        StableVideoDiffusionPipeline,
    )

StepCallback = Callable[[int, int], None]
#: on_latents(pipe, done, total, latents) after each denoising step (worker.previews).
LatentsCallback = Callable[[Any, int, int, Any], None]


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale ``image`` to cover ``width`` x ``height`` and crop the centre, as RGB.

    The pipeline itself would stretch the image to the size asked; cropping keeps its aspect.
    The EXIF orientation is applied first, so phone photos are the right way up.
    """
    image = ImageOps.exif_transpose(image)
    return ImageOps.fit(
        image.convert("RGB"), (width, height), Image.Resampling.LANCZOS, centering=(0.5, 0.5)
    )


def render_frames(
    pipe: StableVideoDiffusionPipeline,
    image: Image.Image,
    params: RenderParams,
    plan: Plan,
    on_step: StepCallback | None = None,
    on_latents: LatentsCallback | None = None,
) -> np.ndarray:
    """Render ``params.num_frames`` frames from ``image``; uint8, (frames, height, width, 3).

    ``on_step(done, total)`` is called after each denoising step; an exception it raises
    stops the render and propagates (this is how a job is cancelled); then ``on_latents(pipe,
    done, total, latents)`` sees the latents (the previews). Raises
    :class:`NonFiniteOutput` when the frames hold NaN or infinity.
    """
    import torch

    total = params.num_inference_steps

    def step_end(
        _pipe: Any, step_index: int, _timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        # A NaN in the latents is caught here, steps before it would spoil the frames.
        check_finite(callback_kwargs["latents"], f"the latents after step {step_index + 1}")
        if on_step is not None:
            on_step(step_index + 1, total)
        if on_latents is not None:
            on_latents(_pipe, step_index + 1, total, callback_kwargs["latents"])
        return callback_kwargs

    generator = torch.Generator("cpu").manual_seed(params.seed)
    with torch.inference_mode():
        output = pipe(
            fit_image(image, params.width, params.height),
            height=params.height,
            width=params.width,
            num_frames=params.num_frames,
            num_inference_steps=total,
            fps=params.fps,
            motion_bucket_id=params.motion_bucket_id,
            noise_aug_strength=params.noise_aug_strength,
            min_guidance_scale=params.min_guidance_scale,
            max_guidance_scale=params.max_guidance_scale,
            # The plan's, not the job's: the ladder lowers it after an out-of-memory error.
            decode_chunk_size=plan.decode_chunk_size,
            generator=generator,
            output_type="np",
            callback_on_step_end=step_end,
        )
    # output_type="np" gives float32 in [0, 1], shaped (batch, frames, height, width, 3).
    video = np.asarray(output.frames)[0]
    check_finite(video, f"the frames decoded with plan '{plan.name}'")
    return np.clip(np.rint(video * 255.0), 0, 255).astype(np.uint8)
