"""Previews of a render while it denoises: the middle frame of the latents, as a small JPEG.

Every ``SVDFARM_PREVIEW_INTERVAL`` seconds at most (never on the last step, whose frames the
video shows), :class:`PreviewWriter` turns the middle frame of the pipeline's latents into a
picture with a fixed linear latent-to-RGB map (:func:`latent_to_rgb`, as ComfyUI's latent
previews), stores it in the job's folder under the claim's token
(:func:`svdfarm.storage.preview_key`) and points the job's ``preview_key`` at it in a short
transaction, only while that claim still holds the running job. A preview never fails the
render: any error is logged and the render goes on. The claim deletes its previews when its
run ends (the video replaces them); a winner sweeps those of lost claims.

:func:`decode_one_frame` is the other way to a preview (one frame through the VAE's decoder),
measured against the linear map by ``bench/previews.py``: far dearer, so not used here.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from PIL import Image
from sqlalchemy import update

from svdfarm.db import Database
from svdfarm.models import Job
from svdfarm.states import JobState
from svdfarm.storage import Store, preview_key

log = logging.getLogger(__name__)

#: SD 1.x's 4-channel latents (which SVD's VAE shares) to RGB, one row per channel (R, G, B
#: columns), with no bias: ComfyUI's ``latent_rgb_factors`` of ``SD15`` in
#: comfy/latent_formats.py (https://github.com/comfyanonymous/ComfyUI). ComfyUI applies them
#: to the latents as the sampler holds them, i.e. already multiplied by the VAE's scaling
#: factor (0.18215), and maps the result from [-1, 1] to [0, 255]; so does this module.
LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
#: The preview's longer side in pixels, and its JPEG quality.
PREVIEW_SIDE = 256
JPEG_QUALITY = 80
#: The schedulers whose step is a plain Euler step, from which the denoised latents are
#: worked out (:func:`denoised_estimate`); with others the noisy latents are shown.
_EULER = frozenset({"EulerDiscreteScheduler"})


def middle_frame(latents: Any) -> Any:
    """The middle frame of the pipeline's latents, shaped (batch, frames, channels, h, w):
    the first video's, (channels, h, w)."""
    return latents[0, latents.shape[1] // 2]


def denoised_estimate(previous: Any, current: Any, sigma: float, sigma_next: float) -> Any:
    """The denoised latents an Euler step from noise level ``sigma`` to ``sigma_next`` aimed
    at: ``current = previous + (previous - x0) / sigma * (sigma_next - sigma)``, solved for x0.

    The noisy latents of SVD's early steps are mostly noise (sigma up to 700); this estimate
    (what ComfyUI's previews show) is the picture from the first steps on.
    """
    slope = (current - previous) / (sigma_next - sigma)
    return previous - sigma * slope


def _resized(image: Image.Image, side: int) -> Image.Image:
    """``image`` scaled so that its longer side is ``side`` pixels."""
    width, height = image.size
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def latent_to_rgb(latents_frame: Any, side: int = PREVIEW_SIDE) -> Image.Image:
    """A picture of one frame of scaled latents (channels 4, h, w): the fixed linear map
    :data:`LATENT_RGB_FACTORS`, [-1, 1] to [0, 255], scaled up to ``side`` on its longer side."""
    import torch

    frame = latents_frame.detach().to("cpu", torch.float32)
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", frame, factors)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
    return _resized(Image.fromarray(pixels, "RGB"), side)


def decode_one_frame(vae: Any, latents_frame: Any, side: int = PREVIEW_SIDE) -> Image.Image:
    """A picture of one frame of scaled latents decoded by the pipeline's VAE (unscaled first,
    as the pipeline decodes), scaled to ``side`` on its longer side: the dear alternative."""
    import torch

    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    with torch.inference_mode():
        latents = latents_frame[None].to(device, dtype) / vae.config.scaling_factor
        sample = vae.decode(latents, num_frames=1).sample[0]  # (3, H, W) in [-1, 1]
    rgb = ((sample.float().cpu() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return _resized(Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB"), side)


def jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """``image`` as JPEG bytes."""
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _is_time_limit(exc: BaseException) -> bool:
    """True for Celery's soft time limit, which must stop the render, never be swallowed."""
    return type(exc).__name__ == "SoftTimeLimitExceeded"


class PreviewWriter:
    """The render's ``on_latents`` hook: a preview at most every ``interval_s`` seconds,
    stored under the claim ``token`` and pointed at by the job's row while the claim holds it."""

    def __init__(
        self,
        db: Database,
        store: Store,
        job_id: uuid.UUID,
        token: str,
        interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Preview job ``job_id`` (claimed with ``token``) into ``store``; 0 s: never."""
        self.db, self.store, self.job_id, self.token = db, store, job_id, token
        self.interval_s, self.clock = interval_s, clock
        #: The key the job's row points at (this claim's latest preview), and every key
        #: this claim stored.
        self.current: str | None = None
        self.written: list[str] = []
        #: Seconds each preview took (map, encode, store, row), for the benchmark.
        self.costs: list[float] = []
        self._since: float | None = None
        self._previous: tuple[int, Any] | None = None
        self._lost = False

    def __call__(self, pipe: Any, step: int, total: int, latents: Any) -> None:
        """After denoising step ``step`` of ``total``: store a preview when one is due."""
        if self.interval_s <= 0 or self._lost or step >= total:
            return
        try:
            self._step(pipe, step, latents)
        except Exception as exc:
            if _is_time_limit(exc):
                raise
            log.warning("job %s: preview after step %d failed", self.job_id, step, exc_info=True)

    def _step(self, pipe: Any, step: int, latents: Any) -> None:
        """Keep this step's middle frame; preview it when the interval has passed."""
        now = self.clock()
        if self._since is None or step == 1:  # a new attempt starts the interval afresh
            self._since, self._previous = now, None
        frame = middle_frame(latents).detach().float()
        previous, self._previous = self._previous, (step, frame.clone())
        if now - self._since < self.interval_s:
            return
        picture = self._denoised(pipe, step, frame, previous)
        if picture is None:
            return  # no earlier step to work the estimate out from: the next step previews
        self._since = now
        self.write(step, latent_to_rgb(picture))
        self.costs.append(self.clock() - now)

    def _denoised(self, pipe: Any, step: int, frame: Any, previous: tuple[int, Any] | None) -> Any:
        """The denoised estimate of ``frame`` (after ``step``), or the frame itself with a
        scheduler that is not Euler's; None when the estimate needs a step not seen."""
        scheduler = getattr(pipe, "scheduler", None)
        sigmas = getattr(scheduler, "sigmas", None)
        if type(scheduler).__name__ not in _EULER or sigmas is None or len(sigmas) <= step:
            return frame
        if previous is None or previous[0] != step - 1:
            return None
        sigma, sigma_next = float(sigmas[step - 1]), float(sigmas[step])
        return denoised_estimate(previous[1], frame, sigma, sigma_next)

    def write(self, step: int, image: Image.Image) -> bool:
        """Store ``image`` as the preview after ``step`` and point the job at it, only while
        this claim holds the running job; False (and no more previews) once it does not."""
        key = preview_key(self.job_id, self.token, step)
        self.store.write_bytes(key, jpeg_bytes(image))
        self.written.append(key)
        with self.db.begin() as session:
            held = session.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.claim_token == self.token,
                    Job.state.in_((JobState.RUNNING, JobState.CANCEL_REQUESTED)),
                )
                .values(preview_key=key)
            ).rowcount  # type: ignore[attr-defined]
        stale = self.current if held else key
        if held:
            self.current = key
        else:
            self._lost = True
            log.warning("job %s: not ours any more, no more previews", self.job_id)
        if stale is not None:
            self._delete(stale)
        return bool(held)

    def _delete(self, key: str) -> None:
        """Delete one of this claim's previews; a failure is only logged."""
        try:
            self.store.delete(key)
        except Exception:
            log.warning("job %s: could not delete preview %s", self.job_id, key, exc_info=True)

    def discard(self, *, every_claim: bool = False) -> None:
        """The run ended: delete this claim's previews (and, ``every_claim``, those of lost
        claims of the job too: a winner's sweep). Never raises."""
        keys = set(self.written)
        if every_claim:
            try:
                keys.update(self.store.list_keys(Store.key(self.job_id, "preview.")))
            except Exception:
                log.warning("job %s: could not list previews", self.job_id, exc_info=True)
        for key in sorted(keys):
            self._delete(key)
        self.written, self.current = [], None
