"""The bare loop the farm is measured against: one process that loads the pipeline with
diffusers, calls it and writes each MP4 the way the worker does (``worker.video.encode_mp4``),
nothing else: no database, no queue, no progress, no poster. Like the worker, it calls
the pipeline in ``torch.inference_mode()``.

It loads the model and renders once to warm up, prints ``ready``, then serves commands on
stdin, one per line: ``run N`` renders N videos and prints ``done <seconds>``; ``quit`` ends.

    .venv/bin/python -m bench.bare_loop MODEL_DIR IMAGE OUT_DIR [--frames 8 --steps 4 ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.common import JobParams


def main(argv: list[str] | None = None) -> int:
    """Load, warm up, then render on command."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("image")
    parser.add_argument("out_dir")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--threads", type=int, default=0, help="check that torch runs this many threads"
    )
    args = parser.parse_args(argv)
    params = JobParams(frames=args.frames, steps=args.steps, size=args.size, seed=args.seed)

    import diffusers
    import numpy as np
    import torch
    from diffusers import StableVideoDiffusionPipeline
    from packaging.version import Version
    from PIL import Image

    from worker.video import encode_mp4

    # The thread count comes from OMP_NUM_THREADS, as in the worker, which never calls
    # torch.set_num_threads: that call also changes MKL's threading, so making it here would
    # make the loop a different program from the worker.
    if args.threads and torch.get_num_threads() != args.threads:
        raise SystemExit(
            f"torch runs {torch.get_num_threads()} threads, not {args.threads}: "
            f"set OMP_NUM_THREADS={args.threads}"
        )
    # Loaded as the worker loads it: each component in its plan's dtype (fp32 on a CPU).
    dtype_arg = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    dtypes = dict.fromkeys(("image_encoder", "unet", "vae", "default"), torch.float32)
    pipe = StableVideoDiffusionPipeline.from_pretrained(
        args.model_dir, local_files_only=True, **{dtype_arg: dtypes}
    )
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0

    def render_one() -> None:
        nonlocal count
        count += 1
        with Image.open(args.image) as image:
            rgb = image.convert("RGB")
        # As the worker calls it: inference mode is a little faster than the pipeline's own
        # no_grad, and the farm should not look cheaper than the loop for that.
        with torch.inference_mode():
            output = pipe(
                rgb,
                height=params.size,
                width=params.size,
                num_frames=params.frames,
                num_inference_steps=params.steps,
                fps=params.fps,
                motion_bucket_id=params.motion_bucket_id,
                noise_aug_strength=params.noise_aug_strength,
                decode_chunk_size=min(params.decode_chunk_size, params.frames),
                generator=torch.Generator("cpu").manual_seed(params.seed),
                output_type="np",
            )
        video = np.asarray(output.frames)[0]
        frames = np.clip(np.rint(video * 255.0), 0, 255).astype(np.uint8)
        encode_mp4(frames, params.fps, out_dir / f"bare-{count}.mp4")

    render_one()
    print(f"ready threads={torch.get_num_threads()}", flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "quit":
            break
        if command[0] == "run":
            started = time.perf_counter()
            for _ in range(int(command[1])):
                render_one()
            print(f"done {time.perf_counter() - started:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
