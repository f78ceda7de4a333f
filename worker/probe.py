"""The worker's capability probe: what device it renders on and which dtypes really work there.

:class:`Capabilities` is plain data. A worker probes once, advertises ``as_dict()`` and the web
reads it back with ``Capabilities.from_dict``; neither of those touches torch, which is imported
only inside :func:`probe`. Reduced precision is judged twice: by what the driver claims
(``bf16_driver``) and by running a small conv + group norm + attention op in that dtype and
comparing it with fp32 (``bf16_op``, ``fp16``), because a driver can claim bf16 that is only
emulated, or kernels can be missing on the device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

OVERRIDE_ENV = "SVDFARM_CAPABILITIES"
DEVICES = ("cuda", "mps", "cpu")
_GIB = 1024**3


@dataclass(frozen=True)
class Capabilities:
    """What one worker can render with, as measured by :func:`probe`."""

    device: str
    name: str
    count: int
    total_memory_bytes: int | None
    free_memory_bytes: int | None
    compute_capability: str | None
    bf16_driver: bool
    bf16_op: bool
    fp16: bool
    torch_version: str
    diffusers_version: str | None
    cuda_version: str | None
    cpu_count: int

    @property
    def bf16(self) -> bool:
        """True when the driver claims bf16 and a real bf16 op gave the right answer."""
        return self.bf16_driver and self.bf16_op

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capabilities:
        """Read capabilities back from :meth:`as_dict` output, refusing unknown or bad fields."""
        if not isinstance(data, dict):
            raise ValueError(f"Capabilities must be a JSON object, got {type(data).__name__}.")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(
                f"Unknown capability field(s): {', '.join(unknown)}; "
                f"known fields are {', '.join(known)}."
            )
        missing = [name for name in known if name not in data]
        if missing:
            raise ValueError(f"Missing capability field(s): {', '.join(missing)}.")
        # field.type is the annotation's text, e.g. "int | None" (annotations are postponed).
        for name, field in known.items():
            _check_type(name, str(field.type), data[name])
        if data["device"] not in DEVICES:
            raise ValueError(
                f"Capability 'device' must be one of {', '.join(DEVICES)}, got {data['device']!r}."
            )
        return cls(**data)

    def summary(self) -> str:
        """One line for people: name, device, count, memory, compute capability, dtypes."""
        if self.device == "cpu":
            unit, memory_kind = "core", " RAM"
        else:
            unit, memory_kind = "GPU", ""
        parts = [self.device, f"{self.count} {unit}{'' if self.count == 1 else 's'}"]
        if self.total_memory_bytes is None:
            parts.append("memory unknown")
        else:
            parts.append(f"{self.total_memory_bytes / _GIB:.1f} GiB{memory_kind}")
        if self.compute_capability:
            parts.append(f"sm {self.compute_capability}")
        parts.append(f"bf16 {_bf16_word(self.bf16_driver, self.bf16_op)}")
        parts.append(f"fp16 {'yes' if self.fp16 else 'no'}")
        return f"{self.name} ({', '.join(parts)})"


def _check_type(name: str, annotation: str, value: Any) -> None:
    """Raise ValueError unless ``value`` fits the field's annotation (str, int, bool, or None)."""
    if value is None and "None" in annotation:
        return
    # bool is an int in Python; a count of True is a mistake worth refusing.
    if annotation.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation.startswith("bool"):
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"Capability {name!r} must be {annotation}, got {value!r}.")


def _bf16_word(driver: bool, op: bool) -> str:
    """How the summary words bf16 support, saying which half failed when they disagree."""
    if driver and op:
        return "yes"
    if driver:
        return "no (op failed)"
    return "no (not native)" if op else "no"


def probe(device: str | None = None) -> Capabilities:
    """Measure this machine's capabilities on ``device`` (None: cuda, then mps, then cpu).

    For cuda the probe runs on device index 0 of those ``CUDA_VISIBLE_DEVICES`` shows, and
    ``count`` is how many it shows. If the environment variable ``SVDFARM_CAPABILITIES`` holds a
    JSON object, its fields replace the measured ones, e.g. ``{"fp16": false}`` to keep a worker
    off fp16, or ``{"name": "H200 pool"}`` to pin a class; an unknown field is a ValueError.
    """
    import torch

    chosen = device or _best_device(torch)
    if chosen not in DEVICES:
        raise ValueError(f"Device must be one of {', '.join(DEVICES)} or None, got {chosen!r}.")
    if chosen == "cuda" and not torch.cuda.is_available():
        raise ValueError("Device 'cuda' was asked for but torch sees no CUDA device.")
    if chosen == "mps" and not torch.backends.mps.is_available():
        raise ValueError("Device 'mps' was asked for but torch sees no MPS device.")
    fields: dict[str, Any] = {
        "device": chosen,
        "bf16_op": _op_ok(chosen, torch.bfloat16),
        "fp16": _op_ok(chosen, torch.float16),
        "torch_version": str(torch.__version__),
        "diffusers_version": _package_version("diffusers"),
        "cuda_version": torch.version.cuda,
        "cpu_count": _usable_cpus(),
    }
    if chosen == "cuda":
        fields.update(_cuda_fields(torch))
    elif chosen == "mps":
        fields.update(_mps_fields(torch))
    else:
        total, free = _host_memory()
        fields.update(
            name=_cpu_name(),
            count=fields["cpu_count"],
            total_memory_bytes=total,
            free_memory_bytes=free,
            compute_capability=None,
            bf16_driver=True,  # torch's CPU kernels implement bf16 everywhere.
        )
    return _apply_override(Capabilities.from_dict(fields))


def _best_device(torch: Any) -> str:
    """The first of cuda, mps, cpu that torch can use."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _cuda_fields(torch: Any) -> dict[str, Any]:
    """Name, count, memory, compute capability and bf16 claim of CUDA device 0."""
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    with torch.cuda.device(0):
        # Without emulation: a pre-Ampere GPU "supports" bf16 only by slow emulation.
        bf16_driver = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "total_memory_bytes": int(total),
        "free_memory_bytes": int(free),
        "compute_capability": f"{props.major}.{props.minor}",
        "bf16_driver": bf16_driver,
    }


def _mps_fields(torch: Any) -> dict[str, Any]:
    """Name, memory and bf16 claim of the Apple GPU."""
    total: int | None = None
    free: int | None = None
    try:
        total = int(torch.mps.recommended_max_memory())
        free = max(0, total - int(torch.mps.current_allocated_memory()))
    except (AttributeError, RuntimeError):
        pass
    get_name = getattr(torch.backends.mps, "get_name", None)
    return {
        "name": get_name() if get_name else "Apple GPU",
        "count": 1,
        "total_memory_bytes": total,
        "free_memory_bytes": free,
        "compute_capability": None,
        # Torch's MPS backend refuses bf16 before macOS 14.
        "bf16_driver": bool(torch.backends.mps.is_macos_or_newer(14, 0)),
    }


def _op_ok(device: str, dtype: torch.dtype) -> bool:
    """Whether a small conv + group norm + attention op in ``dtype`` on ``device`` matches fp32."""
    import torch
    import torch.nn.functional as F

    def op(pixels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = F.group_norm(F.conv2d(pixels, weight, padding=1), 2).flatten(2).transpose(1, 2)
        scores = h @ h.transpose(1, 2) * h.shape[-1] ** -0.5
        return torch.softmax(scores, dim=-1) @ h

    generator = torch.Generator("cpu").manual_seed(0)
    pixels = torch.randn(2, 4, 16, 16, generator=generator)
    weight = torch.randn(8, 4, 3, 3, generator=generator) * 0.3
    reference = op(pixels, weight)
    try:
        result = op(pixels.to(device, dtype), weight.to(device, dtype)).float().cpu()
    except Exception as exc:  # a missing kernel is an answer, not a crash
        log.info("%s op on %s failed: %s", dtype, device, exc)
        return False
    return _agrees(result, reference, dtype)


def _agrees(result: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when ``result`` is finite and within a few ulps of ``dtype`` of the fp32 reference."""
    import torch

    if result.shape != reference.shape or not bool(torch.isfinite(result).all()):
        return False
    # Eight units in the last place at 1.0, scaled by the output's size: measured errors are
    # about half of this for bf16 and fp16, and a broken kernel is off by far more.
    tolerance = max(1e-3, 8 * torch.finfo(dtype).eps) * max(1.0, float(reference.abs().max()))
    return float((result.float() - reference).abs().max()) <= tolerance


def _apply_override(measured: Capabilities) -> Capabilities:
    """Measured capabilities with the fields from ``SVDFARM_CAPABILITIES`` replaced."""
    raw = os.environ.get(OVERRIDE_ENV, "").strip()
    if not raw:
        return measured
    try:
        override = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{OVERRIDE_ENV} is not valid JSON ({exc}): {raw[:200]!r}") from exc
    if not isinstance(override, dict):
        raise ValueError(f"{OVERRIDE_ENV} must be a JSON object, got {raw[:200]!r}.")
    try:
        return Capabilities.from_dict({**measured.as_dict(), **override})
    except ValueError as exc:
        raise ValueError(f"{OVERRIDE_ENV}: {exc}") from exc


def _package_version(name: str) -> str | None:
    """An installed package's version, without importing it (diffusers is slow to import)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity, which containers narrow), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            # x86 says "model name"; some ARM kernels only say "Hardware" or "Model".
            if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _host_memory() -> tuple[int | None, int | None]:
    """Total and available RAM in bytes, capped by a cgroup v2 memory limit when there is one."""
    total: int | None
    free: int | None
    try:
        info = dict(
            line.split(":", 1)
            for line in Path("/proc/meminfo").read_text().splitlines()
            if ":" in line
        )
        total = int(info["MemTotal"].split()[0]) * 1024
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total, free = _sysconf_memory()
    limit, used = _cgroup_memory(Path("/sys/fs/cgroup"))
    # In a container MemTotal is the host's; the cgroup limit is what the kernel will enforce.
    if limit is not None and total is not None and limit < total:
        total = limit
        free = max(0, limit - used) if free is None else min(free, max(0, limit - used))
    return total, free


def _sysconf_memory() -> tuple[int | None, int | None]:
    """Total and available RAM from sysconf, where the platform has those names."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None, None
    try:
        free: int | None = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        free = None  # macOS has no SC_AVPHYS_PAGES
    return total, free


def _cgroup_memory(root: Path) -> tuple[int | None, int]:
    """The cgroup v2 memory limit and usage under ``root``; (None, 0) when unlimited or absent."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None, 0
        return int(limit), int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None, 0


def probe_in_subprocess(timeout_s: float = 300.0) -> dict[str, Any]:
    """Probe in a child process and return ``as_dict()``.

    A Celery worker's parent process must not initialise CUDA before it forks its pool, so the
    command line probes in a throwaway process instead.
    """
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "worker.probe"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the capability probe failed: {done.stderr.strip()[-2000:]}")
    data: dict[str, Any] = json.loads(done.stdout)
    return data


if __name__ == "__main__":
    print(json.dumps(probe().as_dict()))
