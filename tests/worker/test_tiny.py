"""The built-in tiny model: deterministic, small, saved atomically and only once."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from svdfarm.params import model_base_side
from worker.tiny import NATIVE_SIDE, build_tiny_pipeline, save_tiny


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_build_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    first = build_tiny_pipeline()
    assert torch.equal(torch.rand(3), expected_next)
    second = build_tiny_pipeline()
    for name in ("unet", "vae", "image_encoder"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_saved_model_is_small_safetensors_named_like_svd(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableVideoDiffusionPipeline"
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    weights = sorted(
        p.relative_to(tiny_model_dir).parts[0] for p in tiny_model_dir.rglob("*.safetensors")
    )
    assert weights == ["image_encoder", "unet", "vae"]
    assert not list(tiny_model_dir.rglob("*.bin"))
    assert _folder_size(tiny_model_dir) < 15 * 1024 * 1024
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in tiny_model_dir.rglob("*"))


def test_native_size_is_64(tiny_model_dir: Path) -> None:
    """What the pipeline and svdfarm.params both derive from the saved configs."""
    unet = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    vae = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    assert unet["sample_size"] * vae_scale_factor == NATIVE_SIDE == 64
    assert model_base_side(str(tiny_model_dir)) == 64


def test_save_tiny_is_idempotent(tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat()
    assert save_tiny(tiny_model_dir) == tiny_model_dir
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_concurrent_saves_produce_one_complete_folder(tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    results: list[Path] = []
    errors: list[BaseException] = []

    def save() -> None:
        try:
            results.append(save_tiny(target))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=save) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [target] * 3
    assert (target / "model_index.json").is_file()
    leftovers = sorted(p.name for p in target.parent.iterdir())
    assert leftovers == [".tiny.lock", "tiny"]


def test_save_tiny_refuses_a_folder_holding_something_else(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="model_index.json"):
        save_tiny(target)
    assert (target / "notes.txt").read_text() == "mine"


def test_save_tiny_fills_an_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    assert save_tiny(target) == target
    assert (target / "model_index.json").is_file()
