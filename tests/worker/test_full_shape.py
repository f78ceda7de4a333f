"""SVD-XT at its real shape, with random weights and no download: ``svdfarm render`` renders 2
frames of 128 x 64 in one step with a bf16 UNet and image encoder and an fp32 VAE, and its
peak memory is within 20% of the estimator's figure.

The model is written as the Hub's ``fp16`` variant files (the download most guides recommend),
straight from the configs in ``tests/data/svd_xt`` (SVD-XT's own): each tensor's values are
streamed to its safetensors file, so no 2.2 billion parameter model is built in this process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from svdfarm.catalog import SVD_XT, model_shape
from svdfarm.queues import estimate_plan_bytes
from tests.factories import png_bytes

pytestmark = pytest.mark.full_shape

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "tests" / "data" / "svd_xt"
DTYPES = {"image_encoder": "bf16", "unet": "bf16", "vae": "fp32"}
FRAMES, WIDTH, HEIGHT, STEPS = 2, 128, 64, 1
#: Values drawn once and reused, each tensor from its own offset: random enough for a render
#: whose figures (time, memory) are the point, and fast to write (gigabytes of them).
_POOL = np.random.default_rng(0).standard_normal(1 << 22).astype(np.float16)
_CHUNK = 1 << 21


def _empty_components() -> dict[str, Any]:
    """SVD-XT's three models from their configs, on the meta device (shapes only)."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        return {
            "unet": UNetSpatioTemporalConditionModel.from_config(
                json.loads((CONFIGS / "unet" / "config.json").read_text())
            ),
            "vae": AutoencoderKLTemporalDecoder.from_config(
                json.loads((CONFIGS / "vae" / "config.json").read_text())
            ),
            "image_encoder": CLIPVisionModelWithProjection(
                CLIPVisionConfig.from_json_file(CONFIGS / "image_encoder" / "config.json")
            ),
        }


def _write_random_fp16(shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """A safetensors file of fp16 tensors: norms' weights 1, biases 0, other weights
    N(0, 1 / fan_in), as a freshly initialised model holds."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {
            "dtype": "F16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    pools: dict[float, np.ndarray] = {}  # the pool twice over, scaled, per fan-in
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for index, (name, shape) in enumerate(shapes.items()):
            count = math.prod(shape)
            if len(shape) < 2:
                value = 1.0 if name.endswith("weight") else 0.0
                fh.write(np.full(count, value, dtype=np.float16).tobytes())
                continue
            scale = 1 / math.sqrt(count // shape[0])
            if scale not in pools:
                scaled = (_POOL.astype(np.float32) * scale).astype(np.float16)
                pools[scale] = np.concatenate([scaled, scaled])
            pool = pools[scale]
            start = (index * 7919) % len(_POOL)
            for done in range(0, count, _CHUNK):
                fh.write(memoryview(pool[start : start + min(_CHUNK, count - done)]))


def save_random_svd_xt(folder: Path) -> Path:
    """SVD-XT's architecture with random weights, as the Hub's ``fp16`` files only."""
    for component, module in _empty_components().items():
        (folder / component).mkdir(parents=True)
        shutil.copy(CONFIGS / component / "config.json", folder / component / "config.json")
        shapes = {name: tuple(t.shape) for name, t in module.state_dict().items()}
        weights = "model" if component == "image_encoder" else "diffusion_pytorch_model"
        _write_random_fp16(shapes, folder / component / f"{weights}.fp16.safetensors")
    for sub in ("scheduler", "feature_extractor"):
        shutil.copytree(CONFIGS / sub, folder / sub)
    shutil.copy(CONFIGS / "model_index.json", folder / "model_index.json")
    return folder


def test_svd_xt_at_full_shape_renders_within_the_estimate(tmp_path: Path) -> None:
    started = time.monotonic()
    model = save_random_svd_xt(tmp_path / "svd-xt")
    built_s = time.monotonic() - started
    shape = model_shape(str(model), tmp_path)
    # The estimator reads SVD-XT's parameter counts from the files, as its fallback has them.
    assert shape.source == "files" and dict(shape.params) == dict(SVD_XT.params)
    assert (shape.unet_channels, shape.vae_channels, shape.vae_factor) == (320, 128, 8)

    image = tmp_path / "in.png"
    image.write_bytes(png_bytes(256, 128))
    env = {
        **os.environ,
        "SVDFARM_DATA_DIR": str(tmp_path / "var"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("SVDFARM_MODEL", None)
    dtypes = ",".join(f"{c}={d}" for c, d in DTYPES.items())
    command = [
        sys.executable, "-m", "cli", "render", str(image), "-o", str(tmp_path / "out.mp4"),
        "--model", str(model), "--frames", str(FRAMES), "--width", str(WIDTH),
        "--height", str(HEIGHT), "--steps", str(STEPS), "--seed", "1", "--dtypes", dtypes,
        "--json",
    ]  # fmt: skip
    rendered = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    render_s = time.monotonic() - rendered
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    [attempt] = result["attempts"]
    assert attempt["outcome"] == "succeeded", attempt
    assert attempt["plan"].startswith("bf16 unet+enc, fp32 vae"), attempt["plan"]

    estimate = estimate_plan_bytes(FRAMES, WIDTH, HEIGHT, FRAMES, DTYPES, shape)
    peak = attempt["peak_memory_bytes"]
    print(
        f"full shape: model written in {built_s:.1f} s, rendered in {render_s:.1f} s "
        f"(attempt {attempt['duration_s']:.1f} s); peak {peak / 1e9:.2f} GB, "
        f"estimate {estimate / 1e9:.2f} GB ({peak / estimate:.0%})"
    )
    assert abs(peak - estimate) <= 0.2 * estimate, (peak, estimate)
