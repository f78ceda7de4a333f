"""The capability probe: the real probe on this machine, the op test, JSON round trips,
the ``SVDFARM_CAPABILITIES`` override and the one-line summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch

from worker import probe as probe_module
from worker.probe import OVERRIDE_ENV, Capabilities, _agrees, _cgroup_memory, _op_ok, probe

ON_CPU_ONLY = not torch.cuda.is_available() and not torch.backends.mps.is_available()


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measure this machine, whatever the environment running the tests pins."""
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)


def h200(**changes: object) -> Capabilities:
    """Capabilities as an H200 worker reports them."""
    fields: dict[str, object] = {
        "device": "cuda",
        "name": "NVIDIA H200",
        "count": 1,
        "total_memory_bytes": 150_106_374_144,
        "free_memory_bytes": 149_000_000_000,
        "compute_capability": "9.0",
        "bf16_driver": True,
        "bf16_op": True,
        "fp16": True,
        "torch_version": "2.13.0+cu128",
        "diffusers_version": "0.42.1",
        "cuda_version": "12.8",
        "cpu_count": 16,
    }
    fields.update(changes)
    return Capabilities.from_dict(fields)


def test_real_probe_on_cpu() -> None:
    caps = probe("cpu")
    assert caps.device == "cpu"
    assert caps.name.strip()
    assert caps.count == caps.cpu_count >= 1
    assert caps.total_memory_bytes and caps.total_memory_bytes > 0
    assert caps.free_memory_bytes and 0 < caps.free_memory_bytes <= caps.total_memory_bytes
    assert caps.compute_capability is None
    assert caps.bf16_driver is True
    # torch 2.13 has CPU kernels for conv, group norm and matmul in both half types.
    assert caps.bf16_op is True and caps.fp16 is True and caps.bf16 is True
    assert caps.torch_version == str(torch.__version__)
    assert caps.diffusers_version == diffusers.__version__
    assert caps.cuda_version == torch.version.cuda


@pytest.mark.skipif(not ON_CPU_ONLY, reason="this machine has an accelerator")
def test_best_device_without_accelerator_is_cpu() -> None:
    assert probe().device == "cpu"


def test_half_dtypes_come_from_the_op_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_module, "_agrees", lambda *_: False)
    caps = probe("cpu")
    assert (caps.bf16_driver, caps.bf16_op, caps.fp16, caps.bf16) == (True, False, False, False)


def test_op_test_fails_for_a_dtype_without_cpu_kernels() -> None:
    # conv2d has no float8 kernel on CPU: the op raises and the probe answers False.
    assert _op_ok("cpu", torch.float8_e4m3fn) is False
    assert _op_ok("cpu", torch.float32) is True


def test_comparison_refuses_nan_inf_wrong_values_and_shapes() -> None:
    reference = torch.linspace(-2.0, 2.0, 12).reshape(3, 4)
    assert _agrees(reference.clone(), reference, torch.bfloat16)
    assert _agrees(reference.to(torch.bfloat16).float(), reference, torch.bfloat16)
    with_nan = reference.clone()
    with_nan[1, 2] = float("nan")
    assert not _agrees(with_nan, reference, torch.bfloat16)
    assert not _agrees(reference + torch.tensor(float("inf")), reference, torch.float16)
    assert not _agrees(reference + 0.5, reference, torch.float16)
    assert not _agrees(reference.flatten(), reference, torch.float16)


def test_round_trip_through_json() -> None:
    for caps in (probe("cpu"), h200(), h200(compute_capability=None, total_memory_bytes=None)):
        text = json.dumps(caps.as_dict())
        assert Capabilities.from_dict(json.loads(text)) == caps


def test_from_dict_refuses_bad_input() -> None:
    good = h200().as_dict()
    with pytest.raises(ValueError, match="Unknown capability field.*bf16, vram"):
        Capabilities.from_dict({**good, "vram": 1, "bf16": True})
    with pytest.raises(ValueError, match="Missing capability field.*cpu_count"):
        Capabilities.from_dict({k: v for k, v in good.items() if k != "cpu_count"})
    with pytest.raises(ValueError, match="'count' must be int, got True"):
        Capabilities.from_dict({**good, "count": True})
    with pytest.raises(ValueError, match="'fp16' must be bool, got 'yes'"):
        Capabilities.from_dict({**good, "fp16": "yes"})
    with pytest.raises(ValueError, match="'device' must be one of cuda, mps, cpu, got 'tpu'"):
        Capabilities.from_dict({**good, "device": "tpu"})


def test_capabilities_need_no_torch() -> None:
    # The web reads workers' capabilities and must not pay for importing torch.
    code = (
        "import json, sys\n"
        "from worker.probe import Capabilities\n"
        f"caps = Capabilities.from_dict(json.loads({json.dumps(json.dumps(h200().as_dict()))}))\n"
        "print(caps.summary())\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == h200().summary()


def test_override_replaces_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    measured = probe("cpu")
    monkeypatch.setenv(OVERRIDE_ENV, '{"fp16": false, "name": "pinned class", "count": 1}')
    caps = probe("cpu")
    assert (caps.fp16, caps.name, caps.count) == (False, "pinned class", 1)
    assert caps.torch_version == measured.torch_version
    assert caps.total_memory_bytes and caps.bf16_op == measured.bf16_op


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"fp16": false, "vram_gb": 80}', "Unknown capability field.*vram_gb"),
        ('{"fp16": "no"}', "'fp16' must be bool"),
        ("[1, 2]", "must be a JSON object"),
        ("{fp16: false}", "is not valid JSON"),
    ],
)
def test_override_refuses_bad_values(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv(OVERRIDE_ENV, value)
    with pytest.raises(ValueError, match=f"^{OVERRIDE_ENV}.*{message}"):
        probe("cpu")


def test_probe_refuses_unknown_or_missing_devices() -> None:
    with pytest.raises(ValueError, match="Device must be one of cuda, mps, cpu or None, got 'tpu'"):
        probe("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            probe("cuda")


def test_summary_text() -> None:
    assert h200().summary() == "NVIDIA H200 (cuda, 1 GPU, 139.8 GiB, sm 9.0, bf16 yes, fp16 yes)"
    assert h200(count=8, bf16_op=False, fp16=False).summary() == (
        "NVIDIA H200 (cuda, 8 GPUs, 139.8 GiB, sm 9.0, bf16 no (op failed), fp16 no)"
    )
    assert h200(name="Tesla T4", bf16_driver=False, compute_capability="7.5").summary() == (
        "Tesla T4 (cuda, 1 GPU, 139.8 GiB, sm 7.5, bf16 no (not native), fp16 yes)"
    )
    cpu = h200(
        device="cpu",
        name="Intel Xeon Platinum 8480+",
        count=2,
        total_memory_bytes=int(23.4 * 1024**3),
        compute_capability=None,
    )
    assert (
        cpu.summary()
        == "Intel Xeon Platinum 8480+ (cpu, 2 cores, 23.4 GiB RAM, bf16 yes, fp16 yes)"
    )
    apple = h200(device="mps", name="Apple M2", total_memory_bytes=None, compute_capability=None)
    assert apple.summary() == "Apple M2 (mps, 1 GPU, memory unknown, bf16 yes, fp16 yes)"
    real = probe("cpu")
    assert real.summary().startswith(f"{real.name} (cpu, {real.count} core")


def test_cgroup_limit(tmp_path: Path) -> None:
    assert _cgroup_memory(tmp_path) == (None, 0)
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert _cgroup_memory(tmp_path) == (None, 0)
    (tmp_path / "memory.max").write_text("8589934592\n")
    assert _cgroup_memory(tmp_path) == (8589934592, 1000)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_real_probe_on_cuda() -> None:
    caps = probe("cuda")
    props = torch.cuda.get_device_properties(0)
    assert (caps.name, caps.count) == (props.name, torch.cuda.device_count())
    assert caps.compute_capability == f"{props.major}.{props.minor}"
    assert caps.free_memory_bytes and caps.total_memory_bytes
    assert 0 < caps.free_memory_bytes <= caps.total_memory_bytes
    assert caps.fp16 is True
    assert caps.bf16_driver is (props.major >= 8)
