"""Loading pipelines: the tiny model through from_pretrained, the cache, and clear failures."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPVisionModelWithProjection

from tests.hub import cache_as_hub_model, load_in_subprocess
from worker.pipeline import (
    ModelUnavailable,
    clear_cache,
    load_pipeline,
    pipeline_ready,
    resolve_model,
)
from worker.plans import Plan

FP32 = Plan.uniform("fp32", "cpu")


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


def test_tiny_loads_through_from_pretrained(tiny_model_dir: Path) -> None:
    pipe = load_pipeline("tiny", tiny_model_dir.parent, FP32)
    assert isinstance(pipe, StableVideoDiffusionPipeline)
    assert isinstance(pipe.unet, UNetSpatioTemporalConditionModel)
    assert isinstance(pipe.vae, AutoencoderKLTemporalDecoder)
    assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert type(pipe.feature_extractor).__name__.startswith("CLIPImageProcessor")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.image_encoder.config.image_size == 224
    for name in ("unet", "vae", "image_encoder"):
        module = getattr(pipe, name)
        assert module.dtype == torch.float32 and module.device.type == "cpu", name


def test_plans_recast_the_cached_pipeline_in_place_and_exactly(tiny_model_dir: Path) -> None:
    """One load per model: other plans re-cast the same objects, and coming back is exact."""
    clear_cache()
    first = load_pipeline(str(tiny_model_dir), Path("unused"), FP32)
    unet = first.unet
    loaded = {k: v.clone() for k, v in unet.state_dict().items()}
    assert load_pipeline("TINY", tiny_model_dir.parent, FP32) is first
    for plan in (
        Plan.uniform("bf16", "cpu"),
        Plan.uniform("fp16", "cpu"),
        Plan(device="cpu", image_encoder="fp16", unet="bf16", vae="fp32"),
    ):
        again = load_pipeline(str(tiny_model_dir), Path("unused"), plan)
        assert again is first and again.unet is unet, "a new plan must not reload the model"
        for name in ("unet", "vae", "image_encoder"):
            assert getattr(again, name).dtype == plan.torch_dtype(name)
    back = load_pipeline(str(tiny_model_dir), Path("unused"), FP32)
    assert back.unet.dtype == torch.float32
    for key, tensor in back.unet.state_dict().items():
        assert torch.equal(tensor, loaded[key]), f"{key} drifted after bf16 -> fp16 -> fp32"


def test_pipeline_ready_only_when_the_cached_pipeline_has_the_plans_shape(
    tiny_model_dir: Path,
) -> None:
    """A warm worker skips its "loading" progress write only when nothing is loaded or cast."""
    clear_cache()
    bf16 = Plan.uniform("bf16", "cpu")
    assert not pipeline_ready(str(tiny_model_dir), Path("unused"), FP32), "nothing loaded yet"
    load_pipeline(str(tiny_model_dir), Path("unused"), FP32)
    assert pipeline_ready(str(tiny_model_dir), Path("unused"), FP32)
    assert pipeline_ready("tiny", tiny_model_dir.parent, FP32)
    assert not pipeline_ready(str(tiny_model_dir), Path("unused"), bf16), "a re-cast is due"
    load_pipeline(str(tiny_model_dir), Path("unused"), bf16)
    assert pipeline_ready(str(tiny_model_dir), Path("unused"), bf16)
    assert not pipeline_ready(str(tiny_model_dir), Path("unused"), FP32)
    clear_cache()
    assert not pipeline_ready(str(tiny_model_dir), Path("unused"), bf16)


def test_a_mixed_plan_casts_each_component(tiny_model_dir: Path) -> None:
    plan = Plan(device="cpu", image_encoder="bf16", unet="fp16", vae="fp32")
    pipe = load_pipeline(str(tiny_model_dir), Path("unused"), plan)
    assert pipe.image_encoder.dtype == torch.bfloat16
    assert pipe.unet.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32


def test_resolve_model(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_model("tiny", tiny_model_dir.parent) == str(tiny_model_dir.resolve())
    assert resolve_model(" Tiny ", tiny_model_dir.parent) == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tiny_model_dir.parent)
    assert resolve_model("tiny/", tmp_path) == str(tiny_model_dir.resolve())
    assert resolve_model("stabilityai/stable-video-diffusion-img2vid-xt", tmp_path) == (
        "stabilityai/stable-video-diffusion-img2vid-xt"
    )
    assert resolve_model("some-model", tmp_path) == "some-model"


@pytest.mark.parametrize(
    "spec", ["./missing", "../missing/model", "/nonexistent/svd", "~/no-such-svd", "a/b/c", ""]
)
def test_a_missing_folder_is_unavailable(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable) as raised:
        load_pipeline(spec, tmp_path, FP32)
    assert "SVDFARM_MODEL" in str(raised.value)
    if spec:
        assert "not found" in str(raised.value) and spec in str(raised.value)


def test_a_file_or_a_folder_without_a_model_is_unavailable(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelUnavailable, match="is a file"):
        load_pipeline(str(weights), tmp_path, FP32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelUnavailable, match="SVDFARM_MODEL") as raised:
        load_pipeline(str(empty), tmp_path, FP32)
    assert "model_index.json" in str(raised.value)


def test_hub_refusing_connections(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A cached Hub model loads with no network; an uncached one fails fast and says why."""
    cache_as_hub_model(tiny_model_dir, tmp_path / "hf", "someorg/cached-model")
    cached, missing = load_in_subprocess(
        tmp_path, "http://127.0.0.1:9", 10.0, "someorg/cached-model", "someorg/some-model"
    )
    assert cached == {"loaded": "StableVideoDiffusionPipeline", "seconds": cached["seconds"]}
    assert "error" in missing, missing
    message = str(missing["error"])
    assert "'someorg/some-model'" in message
    assert "SVDFARM_MODEL" in message and "hf download someorg/some-model" in message
    assert "http://127.0.0.1:9 could not be reached" in message
    assert float(missing["seconds"]) < 5.0


def test_hub_never_answering_is_bounded_by_the_timeout(tmp_path: Path) -> None:
    """A Hub that accepts connections and never replies must not hang the worker."""
    with socket.socket() as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        port = black_hole.getsockname()[1]
        (result,) = load_in_subprocess(
            tmp_path, f"http://127.0.0.1:{port}", 1.0, "someorg/some-model"
        )
    assert "error" in result, result
    assert "did not answer within 1 s" in str(result["error"])
    assert "SVDFARM_MODEL" in str(result["error"])
    assert float(result["seconds"]) < 5.0
