"""Counting CUDA devices for ``svdfarm up`` and ``worker --gpus all`` (:mod:`cli.gpus`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.gpus import GpuQueryFailed, nvidia_driver_present, torch_cuda_devices


def test_a_driver_is_seen_in_proc_or_by_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A card under /proc/driver/nvidia/gpus, or nvidia-smi on the PATH, means a driver."""
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert not nvidia_driver_present(gpus)
    assert not nvidia_driver_present(tmp_path / "absent")
    (gpus / "0000:01:00.0").mkdir()
    assert nvidia_driver_present(gpus)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n")
    smi.chmod(0o755)
    assert nvidia_driver_present(tmp_path / "absent")


def test_torch_is_asked_in_a_child_with_the_environment_given() -> None:
    """With no CUDA device visible (hidden here), torch in the child answers 0."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    assert torch_cuda_devices(env) == 0


def test_a_child_without_torch_fails_with_its_error(tmp_path: Path) -> None:
    """When the child cannot import torch, the error says so with the child's last line."""
    (tmp_path / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with pytest.raises(GpuQueryFailed, match="ImportError: torch is not installed here"):
        torch_cuda_devices(env)
