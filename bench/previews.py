"""What the denoising previews (worker.previews) cost: the tiny model rendered by the worker's
own code path (``worker.execute.run_job``, on SQLite and a file store in a scratch folder)
with previews off, a linear-map preview after every step, a one-frame-decode preview after
every step, and at the default interval; then one preview at SVD-XT's full shape
(1024 x 576, 25 frames: latents of 72 x 128), which needs no UNet run.

    .venv/bin/python -m bench.previews [--rounds 5] [--steps 10] [--no-full-decode] [--write]

The per-preview cost is what :class:`worker.previews.PreviewWriter` times: the denoised
estimate, the map (or the decode), the JPEG, the store's write and the row's pointer. The
overhead is the render's extra time against previews off (median of ``--rounds``, the
variants interleaved); at the default interval it is bounded by cost / interval whatever the
render's length, which is the figure compared with the 3% target at full shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import BENCHMARKS_MD, fmt_ms, markdown_table, section, write_section

#: The 3% of the render time previews may cost at most.
TARGET = 0.03
REPO = Path(__file__).resolve().parent.parent
SVD_XT_VAE = REPO / "tests" / "data" / "svd_xt" / "vae" / "config.json"
#: SVD-XT's full shape: 25 frames of 1024 x 576, so latents of 4 x 72 x 128 per frame.
FULL_FRAMES, FULL_LATENT = 25, (72, 128)


def _farm(folder: Path, steps: int) -> tuple[Any, Any]:
    """Settings and a migrated SQLite database in ``folder``, the tiny model."""
    from svdfarm.db import Database, upgrade
    from svdfarm.settings import load_settings

    settings = load_settings(
        {
            "SVDFARM_DATA_DIR": str(folder),
            "SVDFARM_MODEL": "tiny",
            "SVDFARM_SECRET_KEY": "bench",
            "SVDFARM_DISPATCH_MARGIN": "1000",
        }
    )
    settings.ensure_dirs()
    upgrade(settings.database_url)
    return settings, Database(settings.database_url)


def _submit(settings: Any, db: Any, steps: int) -> str:
    """Record one tiny job (4 frames of 64 x 64, ``steps`` steps) as the API does."""
    import io

    from PIL import Image

    from svdfarm.celery_app import create_celery
    from svdfarm.jobs import submit_job, validate_submission
    from svdfarm.lifecycle import By
    from svdfarm.states import Actor

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(png, "PNG")
    raw = {"num_frames": "4", "num_inference_steps": str(steps), "seed": "1"}
    submission = validate_submission(settings, raw, png.getvalue(), "in.png")
    with db.session() as session:
        job = submit_job(
            session, create_celery(settings), settings, submission, by=By(Actor.API), owner="bench"
        )
        return str(job.id)


@contextmanager
def _decoding() -> Iterator[None]:
    """Previews made by decoding one frame with the pipeline's VAE instead of the linear map."""
    import worker.previews as previews
    from worker.pipeline import _cache

    linear = previews.latent_to_rgb

    def decode(frame: Any, side: int = previews.PREVIEW_SIDE) -> Any:
        (placement,) = _cache.values()
        return previews.decode_one_frame(placement.pipe.vae, frame, side)

    previews.latent_to_rgb = decode  # type: ignore[assignment]
    try:
        yield
    finally:
        previews.latent_to_rgb = linear


def tiny_renders(rounds: int, steps: int) -> dict[str, dict[str, list[float]]]:
    """Render the tiny model ``rounds`` times per variant, interleaved: each render's wall
    time (``run_job``) and each preview's cost."""
    from worker.execute import run_job
    from worker.previews import PreviewWriter

    variants = {"off": 0.0, "linear, every step": 1e-6, "decode, every step": 1e-6}
    variants["linear, default interval (2 s)"] = 2.0
    found: dict[str, dict[str, list[float]]] = {
        name: {"render": [], "cost": [], "count": []} for name in variants
    }
    writers: list[PreviewWriter] = []
    original = PreviewWriter.__init__

    def keep(self: PreviewWriter, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        writers.append(self)

    PreviewWriter.__init__ = keep  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="svdfarm-bench-previews-") as scratch:
        settings, db = _farm(Path(scratch), steps)
        run_job(db, settings, _submit(settings, db, steps), "bench@warmup")  # load the model
        for _ in range(rounds):
            for name, interval in variants.items():
                job_id = _submit(settings, db, steps)
                ours = settings.with_overrides(preview_interval_s=interval)
                writers.clear()
                started = time.perf_counter()
                if name.startswith("decode"):
                    with _decoding():
                        outcome = run_job(db, ours, job_id, "bench@local")
                else:
                    outcome = run_job(db, ours, job_id, "bench@local")
                found[name]["render"].append(time.perf_counter() - started)
                assert outcome == "succeeded", outcome
                found[name]["cost"].extend(writers[0].costs)
                found[name]["count"].append(len(writers[0].costs))
        db.dispose()
    PreviewWriter.__init__ = original  # type: ignore[method-assign]
    return found


def full_shape(decode: bool) -> dict[str, float]:
    """One preview at SVD-XT's full shape, timed like the worker's (estimate, map, JPEG, a file
    store's write); with ``decode``, one frame through SVD-XT's VAE (random weights, CPU)."""
    import torch

    from svdfarm.storage import FileStore, preview_key
    from worker.previews import decode_one_frame, denoised_estimate, jpeg_bytes, latent_to_rgb

    latents = torch.randn(1, FULL_FRAMES, 4, *FULL_LATENT)
    before = latents + torch.randn_like(latents)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="svdfarm-bench-previews-") as scratch:
        store = FileStore(Path(scratch))
        times = []
        for _ in range(20):
            started = time.perf_counter()
            frame = latents[0, FULL_FRAMES // 2].float()
            x0 = denoised_estimate(before[0, FULL_FRAMES // 2].float(), frame, 2.0, 1.5)
            data = jpeg_bytes(latent_to_rgb(x0))
            store.write_bytes(preview_key(uuid.uuid4(), "bench", 12), data)
            times.append(time.perf_counter() - started)
        figures["linear"] = statistics.median(times)
        clone = []
        for _ in range(20):
            started = time.perf_counter()
            latents[0, FULL_FRAMES // 2].float().clone()
            clone.append(time.perf_counter() - started)
        figures["clone"] = statistics.median(clone)
    if decode:
        from diffusers import AutoencoderKLTemporalDecoder

        vae = AutoencoderKLTemporalDecoder.from_config(json.loads(SVD_XT_VAE.read_text()))
        vae.eval()
        started = time.perf_counter()
        decode_one_frame(vae, latents[0, FULL_FRAMES // 2])
        figures["decode"] = time.perf_counter() - started
    return figures


def _pct(value: float) -> str:
    """A fraction as a percentage."""
    return f"{value * 100:.1f}%"


def main(argv: list[str] | None = None) -> int:
    """Measure, print the tables; optionally write them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="renders per variant")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per render")
    parser.add_argument(
        "--no-full-decode", action="store_true", help="skip the full-shape VAE decode (slow)"
    )
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the file --write updates")
    args = parser.parse_args(argv)
    found = tiny_renders(args.rounds, args.steps)
    off = statistics.median(found["off"]["render"])
    rows = []
    for name, figures in found.items():
        render = statistics.median(figures["render"])
        cost = statistics.median(figures["cost"]) if figures["cost"] else None
        previews = statistics.median(figures["count"])
        rows.append(
            [
                name,
                f"{render:.3f} s",
                f"{previews:g}",
                fmt_ms(cost) if cost is not None else "-",
                _pct(render / off - 1) if name != "off" else "-",
                _pct(cost / 2.0) if cost is not None else "-",
            ]
        )
    headers = [
        f"tiny model, 4 frames 64 x 64, {args.steps} steps (`run_job`)",
        "render (median)",
        "previews",
        "cost per preview",
        "overhead vs off",
        "bound at 2 s interval",
    ]
    table = markdown_table(headers, rows)
    full = full_shape(decode=not args.no_full_decode)
    full_rows = [
        [
            "linear map (estimate, map, 256 px JPEG, store)",
            fmt_ms(full["linear"]),
            _pct(full["linear"] / 2.0),
        ],
        ["per-step copy of the middle frame (every step)", fmt_ms(full["clone"]), "-"],
    ]
    if "decode" in full:
        full_rows.append(
            ["one-frame VAE decode (CPU, random weights)", fmt_ms(full["decode"]), "-"]
        )
    full_table = markdown_table(
        ["SVD-XT full shape, latents 25 x 4 x 72 x 128", "one preview", "bound at 2 s interval"],
        full_rows,
    )
    linear = statistics.median(found["linear, every step"]["cost"])
    decode = statistics.median(found["decode, every step"]["cost"])
    notes = (
        f"Target: previews cost at most {_pct(TARGET)} of the render time. A preview is made at "
        "most once per `SVDFARM_PREVIEW_INTERVAL` (2 s) and never on the last step, so its "
        "overhead is at most cost / 2 s at any render length: "
        f"**{_pct(linear / 2.0)}** on the tiny model, **{_pct(full['linear'] / 2.0)}** at SVD-XT's "
        "full shape (the map runs on the CPU after copying one 147 KB frame off the device). "
        f"The one-frame decode costs {decode / linear:.1f}x the linear map on the tiny model "
        "(whose VAE is tiny)"
        + (
            f" and {fmt_ms(full['decode'])} at full shape on this CPU: far over the budget, so "
            "the worker uses the linear map."
            if "decode" in full
            else "; the worker uses the linear map."
        )
        + " Every-step previews on the tiny model overstate the real cost on purpose: they "
        "measure the per-preview figure. On a shared machine the renders' wall times vary "
        "by more than the previews cost (the 'overhead vs off' column is within that noise); "
        "the cost per preview, timed around each preview, is the robust figure."
    )
    print(table, full_table, notes, sep="\n\n")
    if args.write:
        body = table + "\n\n" + full_table
        write_section("previews", section("Previews while denoising", body, notes), args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
