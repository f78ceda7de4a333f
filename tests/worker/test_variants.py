"""The Hub's half-size files: a model folder holding only the ``fp16`` variant, or both."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from svdfarm.db import Database
from svdfarm.jobs import submit_job, validate_submission
from svdfarm.lifecycle import By
from svdfarm.models import Job
from svdfarm.settings import Settings
from svdfarm.states import Actor, JobState
from tests.factories import png_bytes
from tests.hub import cache_as_hub_model, load_in_subprocess
from worker.execute import run_job
from worker.pipeline import choose_variants, clear_cache, load_pipeline, weight_kinds
from worker.plans import Plan
from worker.tiny import build_tiny_pipeline

FP32 = Plan.uniform("fp32", "cpu")
HALF_FILES = [
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "image_encoder/model.fp16.safetensors",
    "scheduler/scheduler_config.json",
]
FULL_FILES = [
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "image_encoder/model.safetensors",
]


def _fix_index(folder: Path) -> None:
    """Name the feature extractor as SVD's repositories do (see worker.tiny)."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["feature_extractor"] = [index["feature_extractor"][0], "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index))


@pytest.fixture(scope="module")
def originals() -> dict[str, dict[str, torch.Tensor]]:
    """The tiny model's fp32 weights, per component."""
    pipe = build_tiny_pipeline()
    return {
        c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()}
        for c in ("unet", "vae", "image_encoder")
    }


@pytest.fixture(scope="module")
def half_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as many downloads hold SVD: the ``fp16`` variant files alone."""
    folder = tmp_path_factory.mktemp("variants") / "half-only"
    build_tiny_pipeline().to(torch.float16).save_pretrained(folder, variant="fp16")
    _fix_index(folder)
    return folder


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as the Hub's repository holds SVD: full and ``fp16`` files side by side."""
    folder = tmp_path_factory.mktemp("variants") / "both"
    build_tiny_pipeline().save_pretrained(folder)
    build_tiny_pipeline().to(torch.float16).save_pretrained(folder, variant="fp16")
    _fix_index(folder)
    return folder


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


def test_weight_kinds_and_the_variant_each_component_reads() -> None:
    assert weight_kinds(HALF_FILES) == {
        "image_encoder": {"fp16"},
        "unet": {"fp16"},
        "vae": {"fp16"},
    }
    assert weight_kinds(HALF_FILES + FULL_FILES)["unet"] == {"", "fp16"}
    assert weight_kinds(["unet/diffusion_pytorch_model.safetensors.index.json"])["unet"] == {""}
    # Only the half-size files: read them, whatever the plan.
    for plan in (FP32, Plan.uniform("bf16", "cpu"), Plan.uniform("fp16", "cpu")):
        assert set(choose_variants(HALF_FILES, plan).values()) == {"fp16"}
    # Both: the fp16 files only for a component the plan runs in fp16.
    mixed = Plan("cuda", image_encoder="fp16", unet="fp16", vae="fp32")
    assert choose_variants(HALF_FILES + FULL_FILES, mixed) == {
        "image_encoder": "fp16",
        "unet": "fp16",
        "vae": None,
    }
    bf16 = Plan.uniform("bf16", "cuda")
    assert set(choose_variants(HALF_FILES + FULL_FILES, bf16).values()) == {None}
    assert set(choose_variants(FULL_FILES, Plan.uniform("fp16", "cuda")).values()) == {None}


def test_a_folder_of_fp16_files_alone_loads_and_upcasts_exactly(
    half_only: Path, originals: dict[str, dict[str, torch.Tensor]]
) -> None:
    assert not list(half_only.rglob("model.safetensors"))
    pipe = load_pipeline(str(half_only), half_only.parent, FP32)
    for component, weights in originals.items():
        module = getattr(pipe, component)
        assert module.dtype == torch.float32, component
        state = module.state_dict()
        for key, tensor in weights.items():
            # fp32 -> fp16 (the file) -> fp32 (the load): the file's values, exactly.
            assert torch.equal(state[key], tensor.half().float()), f"{component}.{key}"


def test_both_files_each_component_reads_what_its_dtype_wants(
    both: Path, originals: dict[str, dict[str, torch.Tensor]]
) -> None:
    plan = Plan("cpu", image_encoder="fp16", unet="fp16", vae="fp32")
    pipe = load_pipeline(str(both), both.parent, plan)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    for key, tensor in originals["vae"].items():
        assert torch.equal(pipe.vae.state_dict()[key], tensor), f"vae.{key}: not the full file"
    for key, tensor in originals["unet"].items():
        assert torch.equal(pipe.unet.state_dict()[key], tensor.half()), f"unet.{key}"
    clear_cache()
    full = load_pipeline(str(both), both.parent, FP32)
    for key, tensor in originals["unet"].items():
        assert torch.equal(full.unet.state_dict()[key], tensor), f"fp32 plan, unet.{key}"


def test_a_half_only_folder_renders_through_the_worker(
    db: Database, settings: Settings, half_only: Path
) -> None:
    """A job naming a folder of fp16 files alone succeeds, on a worker whose own
    ``SVDFARM_MODEL`` is the tiny model: the job's model is the one rendered."""
    from svdfarm.celery_app import create_celery
    from worker.pipeline import cached_placement

    settings = settings.with_overrides(models=f"half={half_only},tiny=tiny")
    raw = {"num_frames": "4", "num_inference_steps": "2", "seed": "1", "model": "half"}
    submission = validate_submission(settings, raw, png_bytes(), "in.png")
    with db.session() as session:
        job_id: uuid.UUID = submit_job(
            session, create_celery(settings), settings, submission, by=By(Actor.API), owner="t"
        ).id
    assert settings.model == "tiny"
    assert run_job(db, settings, str(job_id), "w1@test") == "succeeded"
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state is JobState.SUCCEEDED, job and job.error
        assert job.model == str(half_only) and job.width == 64
    assert cached_placement(str(half_only), settings.models_dir) is not None
    assert cached_placement("tiny", settings.models_dir) is None


def test_a_hub_cache_of_fp16_files_alone_loads_offline(half_only: Path, tmp_path: Path) -> None:
    """The cache an `hf download --include '*.fp16.*'` leaves loads without the network."""
    cache_as_hub_model(half_only, tmp_path / "hf", "someorg/half-model")
    (result,) = load_in_subprocess(tmp_path, "http://127.0.0.1:9", 10.0, "someorg/half-model")
    assert result.get("loaded") == "StableVideoDiffusionPipeline", result
