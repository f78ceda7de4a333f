"""How many CUDA devices this machine's workers would see, found without importing torch here.

``svdfarm up`` and ``svdfarm worker --gpus all`` start worker processes; they must not load
torch themselves (seconds of import, and CUDA initialised in a parent that forks is a CUDA
error in its children). Without an NVIDIA driver (no ``/proc/driver/nvidia/gpus`` entry, no
``nvidia-smi``) the answer is 0 at once; with one, torch is asked in a child process, because
it alone knows whether it was built with CUDA and which cards ``CUDA_VISIBLE_DEVICES`` shows.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

#: Run in a child process: the number of CUDA devices torch can use there.
COUNT_SCRIPT = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


class GpuQueryFailed(RuntimeError):
    """The child process that asks torch for its CUDA devices failed."""


def nvidia_driver_present(gpus_dir: Path = NVIDIA_GPUS) -> bool:
    """True when an NVIDIA driver shows a card (Linux's /proc) or ``nvidia-smi`` is installed."""
    try:
        if gpus_dir.is_dir() and any(gpus_dir.iterdir()):
            return True
    except OSError:
        pass
    return shutil.which("nvidia-smi") is not None


def torch_installed() -> bool:
    """True when torch can be imported here (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


def torch_cuda_devices(env: Mapping[str, str] | None = None, timeout_s: float = 120.0) -> int:
    """How many CUDA devices torch sees in a child process with ``env`` (default: this one's).

    Raises :class:`GpuQueryFailed` with the child's error when it cannot say (no torch, a
    broken driver).
    """
    try:
        done = subprocess.run(
            [sys.executable, "-c", COUNT_SCRIPT],
            env=dict(os.environ if env is None else env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GpuQueryFailed(f"torch took over {timeout_s:g} s to count CUDA devices") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].isdigit():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GpuQueryFailed(f"asking torch for CUDA devices failed: {last}")
    return int(lines[-1])


def cuda_device_count(env: Mapping[str, str] | None = None) -> int:
    """How many CUDA devices a worker started with ``env`` would render on; 0 without a driver.

    Never imports torch in this process. Raises :class:`GpuQueryFailed` when a driver is
    present but torch could not be asked.
    """
    if not nvidia_driver_present():
        return 0
    return torch_cuda_devices(env)
