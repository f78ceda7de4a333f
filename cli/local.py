"""Working on this machine, without the queue or the database: ``svdfarm render`` (one image
to an MP4 through the worker's retry ladder), ``svdfarm caps`` (the capability probe and the
plans it leads to) and ``svdfarm model tiny`` (write the built-in tiny model).

These load torch, in this process: they are the worker's code run by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli import fail, settle_model
from svdfarm.settings import Settings
from svdfarm.states import Phase


def add_commands(sub: Any) -> None:
    """Register ``render``, ``caps`` and ``model``."""
    render = sub.add_parser("render", help="render one image to an MP4 without the queue")
    render.set_defaults(run=cmd_render)
    render.add_argument("image")
    render.add_argument("-o", "--output", required=True, help="the MP4 to write")
    render.add_argument("--poster", default="", help="also write a poster PNG here")
    render.add_argument("--frames", type=int, default=None)
    render.add_argument("--steps", type=int, default=None)
    render.add_argument("--width", type=int, default=None)
    render.add_argument("--height", type=int, default=None)
    render.add_argument("--fps", type=int, default=None)
    render.add_argument("--seed", type=int, default=None)
    render.add_argument("--motion-bucket-id", type=int, default=None)
    render.add_argument("--noise-aug-strength", type=float, default=None)
    render.add_argument("--decode-chunk-size", type=int, default=None)
    render.add_argument("--min-guidance", type=float, default=None)
    render.add_argument("--max-guidance", type=float, default=None)
    render.add_argument(
        "--loop", action="store_true", default=None, help="ping-pong: forward, then backward"
    )
    render.add_argument("--precision", default=None, choices=["auto", "bf16", "fp16", "fp32"])
    render.add_argument("--model", default="", help="override SVDFARM_MODEL")
    render.add_argument(
        "--from",
        dest="from_video",
        default="",
        metavar="VIDEO",
        help="take the model and every setting from an MP4 the farm made (options given win)",
    )
    render.add_argument(
        "--dtypes",
        default="",
        help="per-component dtypes, e.g. image_encoder=bf16,unet=fp32,vae=bf16",
    )
    render.add_argument("--no-casts", action="store_true", help="turn the boundary casts off")
    render.add_argument("--json", action="store_true", help="print the attempts as JSON")

    caps = sub.add_parser("caps", help="this machine's capabilities and the plans it would pick")
    caps.set_defaults(run=cmd_caps)
    caps.add_argument("--json", action="store_true", help="print them as JSON")

    model = sub.add_parser("model", help="write a built-in model to disk")
    model.set_defaults(run=cmd_model)
    model.add_argument("name", choices=["tiny"])
    model.add_argument("directory")


class _ProgressBar:
    """A one-line progress bar on stderr, with the denoising speed and the time left."""

    def __init__(self, steps: int, clock: Callable[[], float] = time.monotonic) -> None:
        """A bar for a ``steps``-step render; ``clock`` gives seconds (tests pass their own)."""
        self.steps = steps
        self.clock = clock
        self.first: tuple[int, float] | None = None  # the first step seen, and when

    def __call__(self, phase: Phase, progress: float, step: int) -> None:
        """Redraw the bar (the runner's ``report``)."""
        width = 30
        filled = int(round(progress * width))
        bar = "#" * filled + "-" * (width - filled)
        line = f"\r[{bar}] {progress * 100:5.1f}%  {phase.value:<10} step {step}/{self.steps}"
        now = self.clock()
        if phase is Phase.DENOISING:
            if self.first is None or step < self.first[0]:  # timed from the first step seen
                self.first = (step, now)
            elif step > self.first[0] and now > self.first[1]:
                rate = (step - self.first[0]) / (now - self.first[1])
                left = round((self.steps - step) / rate)
                line += f"  {rate:.2f} it/s  ETA {left // 60}:{left % 60:02d}"
        elif phase is Phase.LOADING:
            self.first = None  # a retry times its own steps
        sys.stderr.write(line + "\x1b[K" if sys.stderr.isatty() else line)
        sys.stderr.flush()


def cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm render IMAGE -o OUT.mp4``: the worker's render path, without the queue."""
    from svdfarm.images import ImageError, inspect_image, open_upright_rgb
    from svdfarm.params import ParamError, is_tiny, parse_params

    earlier: dict[str, Any] = {}
    if args.from_video:
        from worker.video import read_metadata

        try:
            found = read_metadata(Path(args.from_video))
        except (OSError, RuntimeError) as exc:
            return fail(f"cannot read {args.from_video}: {exc}")
        if found is None or not isinstance(found.get("params"), dict):
            return fail(f"{args.from_video} carries no svdfarm settings")
        earlier = dict(found["params"])
        earlier.pop("output_formats", None)  # this command writes the MP4 (and a poster)
        if not args.model and found.get("model"):
            args.model = str(found["model"])
    settings = settle_model(settings, given=args.model)
    if is_tiny(settings.model):
        # Nothing else is written under the data folder: say where, as it may be made here.
        print(
            f"the tiny model is kept in {settings.models_dir / 'tiny'} (under "
            "SVDFARM_DATA_DIR, ./var unless set)",
            file=sys.stderr,
        )
    try:
        data = Path(args.image).read_bytes()
        info = inspect_image(data, settings.max_upload_bytes, settings.max_image_pixels)
        raw = {
            "num_frames": args.frames,
            "num_inference_steps": args.steps,
            "fps": args.fps,
            "motion_bucket_id": args.motion_bucket_id,
            "noise_aug_strength": args.noise_aug_strength,
            "seed": args.seed,
            "decode_chunk_size": args.decode_chunk_size,
            "width": args.width,
            "height": args.height,
            "precision": args.precision,
            "min_guidance_scale": args.min_guidance,
            "max_guidance_scale": args.max_guidance,
            "loop": args.loop,
        }
        raw = {**earlier, **{k: v for k, v in raw.items() if v is not None}}
        params = parse_params(raw, (info.width, info.height), settings.model)
    except OSError as exc:
        return fail(f"cannot read {args.image}: {exc.strerror or exc}")
    except (ImageError, ParamError) as exc:
        return fail(str(exc))

    from worker.planner import first_plan
    from worker.plans import parse_dtypes
    from worker.runner import RenderFailed, local_capabilities, render_with_ladder

    try:
        dtypes = parse_dtypes(args.dtypes)
    except ValueError as exc:
        return fail(str(exc))
    casts = settings.casts and not args.no_casts
    plan, reason = first_plan(local_capabilities(), params, casts=casts, dtypes=dtypes)
    if reason:
        print(f"note: {reason}", file=sys.stderr)
    print(
        f"rendering {params.num_frames} frames at {params.width}x{params.height}, "
        f"{params.num_inference_steps} steps, seed {params.seed}, model {settings.model}",
        file=sys.stderr,
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = _ProgressBar(params.num_inference_steps)
    hooks = _PrintedAttempts(quiet=args.json, bar=bar)
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        poster = Path(args.poster) if args.poster else Path(tmp) / "poster.png"
        try:
            render_with_ladder(
                settings,
                params,
                plan=plan,
                reason=reason,
                image=open_upright_rgb(data),
                video_path=out,
                poster_path=poster,
                report=bar,
                hooks=hooks,
            )
        except RenderFailed as failed:
            sys.stderr.write("\n")
            status = fail(str(failed), 1)
    if args.json:
        print(
            json.dumps(
                {
                    "output": str(out) if status == 0 else None,
                    "attempts": [a.as_dict() for a in hooks.attempts],
                },
                indent=2,
            )
        )
    elif status == 0:
        total = sum(a.duration_s for a in hooks.attempts)
        print(f"wrote {out} in {total:.1f} s ({len(hooks.attempts)} attempt(s))")
    return status


class _PrintedAttempts:
    """Attempt hooks for the command line: a line on stderr as each attempt starts and ends."""

    def __init__(self, quiet: bool, bar: _ProgressBar) -> None:
        """Collect attempts drawn on ``bar``; ``quiet`` keeps stderr to the bar."""
        self.attempts: list[Any] = []
        self.quiet = quiet
        self.bar = bar

    def started(self, attempt: Any) -> None:
        """Say which plan this attempt runs."""
        self.attempts.append(attempt)
        if not self.quiet:
            why = f" ({attempt.reason})" if attempt.reason and attempt.number > 1 else ""
            print(f"\nattempt {attempt.number}: {attempt.plan.name}{why}", file=sys.stderr)

    def finished(self, attempt: Any) -> None:
        """Say how the attempt ended."""
        if attempt.outcome.value == "succeeded":
            self.bar(Phase.DONE, 1.0, self.bar.steps)
        if not self.quiet:
            what = attempt.outcome.value
            if attempt.error_class:
                what += f" ({attempt.error_class.label}: {(attempt.message or '')[:160]})"
            print(
                f"\nattempt {attempt.number}: {what} in {attempt.duration_s:.1f} s", file=sys.stderr
            )


def cmd_caps(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm caps``: this machine's capabilities and the plans it would pick."""
    from svdfarm.params import PRECISIONS, parse_params
    from worker.planner import first_plan
    from worker.runner import local_capabilities

    settings = settle_model(settings)
    caps = local_capabilities()
    params = parse_params({}, (1024, 576), settings.model)
    plans = {}
    for precision in PRECISIONS:
        plan, reason = first_plan(caps, params, precision, casts=settings.casts)
        plans[precision] = {"plan": plan.name, "reason": reason, **plan.as_dict()}
    if args.json:
        print(json.dumps({"capabilities": caps.as_dict(), "plans": plans}, indent=2))
        return 0
    print(caps.summary())
    for key, value in caps.as_dict().items():
        print(f"  {key:<20} {value}")
    print(
        f"plans for a {params.num_frames}-frame {params.width}x{params.height} job "
        f"(boundary casts {'on' if settings.casts else 'off'}):"
    )
    for precision, info in plans.items():
        note = f"  ({info['reason']})" if info["reason"] else ""
        print(f"  {precision:<5} -> {info['plan']}{note}")
    return 0


def cmd_model(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm model tiny DIR``: write the built-in tiny model to a folder."""
    from worker.tiny import save_tiny

    path = save_tiny(Path(args.directory))
    print(f"tiny model saved to {path}; use it with SVDFARM_MODEL={path}")
    return 0
