"""Rendering an image to an MP4 and a poster, down the retry ladder when a plan fails.

The worker's code path, with or without the queue: the Celery task records each attempt in the
database through :class:`AttemptHooks`; ``svdfarm render`` prints them.
"""

from __future__ import annotations

import resource
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from svdfarm.params import RenderParams
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, ErrorClass, Phase
from worker.errors import JobCanceled, classify, user_message
from worker.ladder import next_plan
from worker.plans import Plan, device_type

#: report(phase, progress 0..1, step): called as the render moves; may raise to stop it.
Reporter = Callable[[Phase, float, int], None]
#: preview(pipe, step, total, latents): sees the latents after each step (worker.previews).
Previewer = Callable[[Any, int, int, Any], None]

# Shares of the progress bar; denoising dominates the time of a real render.
_LOADED, _DENOISED, _ENCODING = 0.05, 0.90, 0.96


@dataclass
class AttemptResult:
    """How one attempt went: its plan, why that plan, and how it ended."""

    number: int
    plan: Plan
    reason: str | None
    outcome: AttemptOutcome = AttemptOutcome.RUNNING
    error_class: ErrorClass | None = None
    error_type: str | None = None
    message: str | None = None
    traceback: str | None = None
    duration_s: float = 0.0
    peak_memory_bytes: int | None = None
    component: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The attempt as ``svdfarm render --json`` prints it."""
        return {
            "number": self.number,
            "plan": self.plan.name,
            "reason": self.reason,
            "outcome": self.outcome.value,
            "error_class": self.error_class.value if self.error_class else None,
            "error_type": self.error_type,
            "component": self.component,
            "message": self.message,
            "duration_s": round(self.duration_s, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
        }


class AttemptHooks(Protocol):
    """Told when each attempt starts and ends (the database, or the CLI's printout)."""

    def started(self, attempt: AttemptResult) -> None:
        """An attempt is about to run ``attempt.plan``."""

    def finished(self, attempt: AttemptResult) -> None:
        """An attempt ended; its outcome and figures are filled in."""


@dataclass
class RenderFailed(Exception):
    """Every rung the ladder allowed failed; ``attempts`` holds them all."""

    attempts: list[AttemptResult] = field(default_factory=list)
    last: BaseException | None = None
    #: The soft time limit the render ran under (``SVDFARM_TASK_SOFT_TIME_LIMIT``).
    time_limit_s: float | None = None

    def __str__(self) -> str:
        """The message a user sees."""
        final = self.attempts[-1]
        assert final.error_class is not None and self.last is not None
        text = user_message(final.error_class, self.last, time_limit_s=self.time_limit_s)
        if len(self.attempts) > 1:
            text += f" ({len(self.attempts)} attempts, last plan: {final.plan.name})"
        return text


@cache
def local_capabilities() -> Any:
    """This process's capability probe, taken once."""
    from worker.probe import probe

    return probe()


def peak_memory_bytes(device: str) -> int | None:
    """Peak CUDA memory allocated on a GPU, or the process's peak RSS elsewhere."""
    if device_type(device) == "cuda":
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
    extra_paths: Mapping[str, Path] | None = None,
    preview: Previewer | None = None,
) -> None:
    """One attempt: load or re-cast the model, render the frames, write the MP4 (carrying the
    model and settings), the poster, and each of ``extra_paths`` (output format -> file);
    ``preview`` sees the latents as they denoise."""
    from worker.pipeline import load_pipeline, pipeline_ready
    from worker.render import render_frames
    from worker.video import encode_mp4, ping_pong, settings_metadata, write_poster

    if not pipeline_ready(settings.model, settings.models_dir, plan):
        # Nothing to load or re-cast on a warm worker: one database write less per job.
        report(Phase.LOADING, 0.0, 0)
    pipe = load_pipeline(settings.model, settings.models_dir, plan, settings.hub_timeout_s)
    report(Phase.DENOISING, _LOADED, 0)

    def on_step(step: int, total: int) -> None:
        progress = _LOADED + (_DENOISED - _LOADED) * step / total
        report(Phase.DECODING if step >= total else Phase.DENOISING, progress, step)

    frames = render_frames(pipe, image, params, plan, on_step, preview)
    report(Phase.ENCODING, _ENCODING, params.num_inference_steps)
    poster_frames = frames
    if params.loop:
        frames = ping_pong(frames)
    metadata = settings_metadata(settings.model, params.as_dict())
    encode_mp4(frames, params.fps, video_path, metadata=metadata)
    write_poster(poster_frames, poster_path)
    write_outputs(frames, params.fps, extra_paths or {}, metadata=metadata)


def write_outputs(
    frames: Any, fps: int, paths: Mapping[str, Path], *, metadata: str | None = None
) -> None:
    """Write each format of ``paths`` but the MP4 (``webm``, ``gif``, ``frames``)."""
    from worker.video import encode_gif, encode_webm, write_frames_zip

    for output, path in paths.items():
        if output == "webm":
            encode_webm(frames, fps, path, metadata=metadata)
        elif output == "gif":
            encode_gif(frames, fps, path)
        elif output == "frames":
            write_frames_zip(frames, path)
        elif output != "mp4":
            raise ValueError(f"unknown output format {output!r}")


def _failing_component(settings: Settings, exc: BaseException) -> str | None:
    """The component the exception came from, if the pipeline was loaded."""
    from worker.casts import failing_component
    from worker.pipeline import cached_placement

    placement = cached_placement(settings.model, settings.models_dir)
    return failing_component(exc, placement.pipe) if placement is not None else None


def render_with_ladder(
    settings: Settings,
    params: RenderParams,
    *,
    plan: Plan,
    reason: str | None,
    image: Image.Image,
    video_path: Path,
    poster_path: Path,
    report: Reporter,
    hooks: AttemptHooks,
    extra_paths: Mapping[str, Path] | None = None,
    preview: Previewer | None = None,
) -> list[AttemptResult]:
    """Render, retrying down the ladder on dtype, memory and non-finite errors.

    ``plan`` (chosen for ``reason``) is the first rung; ``report`` hears the phase and
    progress, ``hooks`` each attempt as it starts and ends; ``extra_paths`` are the files of
    the job's other output formats (format -> file); ``preview`` sees the latents after each
    denoising step.

    Returns the attempts (the last one succeeded). Raises :class:`JobCanceled` when a cancel
    stopped it and :class:`RenderFailed` when the ladder ran out or the error is not retried.
    """
    from worker.pipeline import free_memory

    attempts: list[AttemptResult] = []
    while True:
        attempt = AttemptResult(len(attempts) + 1, plan, reason)
        attempts.append(attempt)
        hooks.started(attempt)
        if device_type(plan.device) == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        started = time.monotonic()
        try:
            render_to_files(
                settings, params, plan, image, video_path, poster_path, report, extra_paths, preview
            )
        except JobCanceled:
            attempt.outcome, attempt.message = AttemptOutcome.CANCELED, "Canceled by request."
            _close(attempt, started, hooks)
            raise
        except Exception as exc:
            attempt.outcome = AttemptOutcome.FAILED
            attempt.error_class = classify(exc)
            attempt.error_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
            attempt.message = str(exc)[:10_000]
            attempt.traceback = traceback.format_exc()
            attempt.component = _failing_component(settings, exc)
            _close(attempt, started, hooks)
            step = None
            if len(attempts) < settings.max_attempts:
                step = next_plan(
                    plan, attempt.error_class, attempt.component, [a.plan for a in attempts]
                )
            if step is None:
                raise RenderFailed(
                    attempts, exc, time_limit_s=settings.task_soft_time_limit_s
                ) from exc
            plan, reason = step
            del exc  # drop the traceback's frames (and the memory they hold) before retrying
            free_memory()
            continue
        attempt.outcome = AttemptOutcome.SUCCEEDED
        _close(attempt, started, hooks)
        return attempts


def _close(attempt: AttemptResult, started: float, hooks: AttemptHooks) -> None:
    """Fill in an ended attempt's duration and peak memory and tell the hooks."""
    attempt.duration_s = time.monotonic() - started
    attempt.peak_memory_bytes = peak_memory_bytes(attempt.plan.device)
    hooks.finished(attempt)
