"""Boundary casts on the real tiny pipeline: every dtype plan runs in one attempt with casts on;
with casts off the raw mismatch errors are real, and the failing component is named."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from svdfarm.params import RenderParams
from svdfarm.settings import Settings, load_settings
from svdfarm.states import AttemptOutcome, Phase
from tests.media import probe_video
from worker.casts import cast_floats, casts_enabled, failing_component, set_casts
from worker.pipeline import load_pipeline
from worker.plans import DTYPES, Plan
from worker.render import render_frames
from worker.runner import AttemptResult, render_with_ladder

PARAMS = RenderParams(
    num_frames=2,
    num_inference_steps=1,
    fps=7,
    motion_bucket_id=127,
    noise_aug_strength=0.02,
    seed=5,
    decode_chunk_size=2,
    width=64,
    height=64,
    precision="auto",
)
IMAGE = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
COMBOS = list(itertools.product(DTYPES, repeat=3))


class _Collect:
    """Attempt hooks that keep what they are told."""

    def __init__(self) -> None:
        """Start with no attempts."""
        self.attempts: list[AttemptResult] = []

    def started(self, attempt: AttemptResult) -> None:
        """Keep the attempt."""
        self.attempts.append(attempt)

    def finished(self, attempt: AttemptResult) -> None:
        """Nothing more to keep: the object is updated in place."""


@pytest.fixture(scope="module")
def tiny_settings(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings that load the session's tiny model folder."""
    data = tmp_path_factory.mktemp("casts")
    return load_settings({"SVDFARM_DATA_DIR": str(data), "SVDFARM_MODEL": str(tiny_model_dir)})


@pytest.mark.parametrize(
    ("image_encoder", "unet", "vae"), COMBOS, ids=["-".join(c) for c in COMBOS]
)
def test_every_dtype_plan_runs_in_one_attempt_with_casts(
    tiny_settings: Settings, tmp_path: Path, image_encoder: str, unet: str, vae: str
) -> None:
    """All 27 (image encoder, UNet, VAE) dtype plans render finite frames on the first try."""
    plan = Plan("cpu", image_encoder, unet, vae, decode_chunk_size=2, casts=True)
    hooks = _Collect()
    video = tmp_path / "out.mp4"
    render_with_ladder(
        tiny_settings,
        PARAMS,
        plan=plan,
        reason=None,
        image=IMAGE,
        video_path=video,
        poster_path=tmp_path / "p.png",
        report=_ignore,
        hooks=hooks,
    )
    assert [a.outcome for a in hooks.attempts] == [AttemptOutcome.SUCCEEDED]
    assert hooks.attempts[0].plan == plan
    assert probe_video(video)["frames"] == PARAMS.num_frames
    pipe = load_pipeline(tiny_settings.model, tiny_settings.models_dir, plan)
    for component in ("image_encoder", "unet", "vae"):
        assert getattr(pipe, component).dtype == plan.torch_dtype(component)


def _ignore(_phase: Phase, _progress: float, _step: int) -> None:
    """A progress reporter that reports nowhere."""


@pytest.mark.parametrize(
    ("dtypes", "component", "message"),
    [
        # The error that started the project: SD.Next's SVD with a bf16 VAE.
        (
            {"vae": "bf16"},
            "vae",
            "Input type (float) and bias type (c10::BFloat16) should be the same",
        ),
        (
            {"unet": "bf16"},
            "unet",
            "mat1 and mat2 must have the same dtype, but got Float and BFloat16",
        ),
        (
            {"image_encoder": "bf16"},
            "unet",
            "mat1 and mat2 must have the same dtype, but got BFloat16 and Float",
        ),
    ],
)
def test_without_casts_mixed_plans_raise_the_real_errors(
    tiny_settings: Settings, dtypes: dict[str, str], component: str, message: str
) -> None:
    """Casts off: one bf16 component raises the mismatch DESIGN.md measured, where it arose."""
    plan = Plan.uniform("fp32", "cpu", decode_chunk_size=2, casts=False).with_changes(**dtypes)
    pipe = load_pipeline(tiny_settings.model, tiny_settings.models_dir, plan)
    assert not casts_enabled(pipe)
    with pytest.raises(RuntimeError) as raised:
        render_frames(pipe, IMAGE, PARAMS, plan)
    assert str(raised.value) == message
    assert failing_component(raised.value, pipe) == component


def test_casts_toggle_on_the_cached_pipeline(tiny_settings: Settings) -> None:
    """Turning casts on and off installs and removes the hooks; twice is harmless."""
    plan = Plan.uniform("fp32", "cpu", decode_chunk_size=2)
    pipe = load_pipeline(tiny_settings.model, tiny_settings.models_dir, plan)
    set_casts(pipe, True)
    set_casts(pipe, True)
    assert casts_enabled(pipe) and "decode" in pipe.vae.__dict__
    assert len(pipe.unet._forward_pre_hooks) == 1
    set_casts(pipe, False)
    set_casts(pipe, False)
    assert not casts_enabled(pipe) and "decode" not in pipe.vae.__dict__
    assert len(pipe.unet._forward_pre_hooks) == 0


def test_cast_floats_reaches_into_containers() -> None:
    """Floating tensors in tuples, lists and dicts are cast; integer tensors are left alone."""
    value = {
        "a": torch.ones(2),
        "b": (torch.ones(2), [torch.ones(2, dtype=torch.float16)]),
        "n": torch.arange(3),
    }
    out = cast_floats(value, torch.bfloat16)
    assert out["a"].dtype == torch.bfloat16
    assert out["b"][0].dtype == torch.bfloat16 and out["b"][1][0].dtype == torch.bfloat16
    assert out["n"].dtype == torch.int64


def test_failing_component_is_none_outside_the_pipeline(tiny_settings: Settings) -> None:
    """An error raised outside any component names none."""
    pipe = load_pipeline(tiny_settings.model, tiny_settings.models_dir, Plan.uniform("fp32", "cpu"))
    try:
        np.zeros(2).reshape(3)
    except ValueError as exc:
        assert failing_component(exc, pipe) is None
