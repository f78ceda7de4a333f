"""Dtype plans: where the pipeline runs and the dtype of each of its three models.

A plan is plain data, written on each attempt and shown on the admin page by its ``name``.
For now every plan is uniform (one dtype for all components); the fields are per component so
mixed plans, offload and boundary casts can be added without changing the shape.

torch is imported inside the functions that need it, so reading a plan stays cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from svdfarm.params import PRECISIONS

if TYPE_CHECKING:
    import torch

DTYPES = ("fp32", "bf16", "fp16")
COMPONENTS = ("image_encoder", "unet", "vae")
DEVICES = ("cuda", "mps", "cpu")

# The order and short names used in Plan.name: the UNet first, it dominates time and memory.
_SHORT_NAMES = {"unet": "unet", "image_encoder": "enc", "vae": "vae"}


@dataclass(frozen=True)
class Plan:
    """A device and one dtype ("fp32", "bf16" or "fp16") for each pipeline component."""

    device: str
    image_encoder: str
    unet: str
    vae: str

    def __post_init__(self) -> None:
        """Refuse a dtype or device the worker does not know, naming the value."""
        for component in COMPONENTS:
            dtype = getattr(self, component)
            if dtype not in DTYPES:
                raise ValueError(
                    f"{component} dtype must be one of {', '.join(DTYPES)}, got {dtype!r}"
                )
        if device_type(self.device) not in DEVICES:
            raise ValueError(
                f"device must be one of {', '.join(DEVICES)} (optionally cuda:N), "
                f"got {self.device!r}"
            )

    @classmethod
    def uniform(cls, dtype: str, device: str) -> Plan:
        """A plan with the same dtype for every component."""
        return cls(device=device, image_encoder=dtype, unet=dtype, vae=dtype)

    @property
    def is_uniform(self) -> bool:
        """True when every component has the same dtype."""
        return len({self.image_encoder, self.unet, self.vae}) == 1

    @property
    def name(self) -> str:
        """A short readable name, e.g. ``fp32 on cpu`` or ``bf16 unet+enc, fp32 vae on cuda``."""
        if self.is_uniform:
            return f"{self.unet} on {self.device}"
        groups: dict[str, list[str]] = {}
        for component, short in _SHORT_NAMES.items():
            groups.setdefault(getattr(self, component), []).append(short)
        parts = [f"{dtype} {'+'.join(names)}" for dtype, names in groups.items()]
        return f"{', '.join(parts)} on {self.device}"

    def as_dict(self) -> dict[str, str]:
        """The plan's fields and name as a JSON-ready dict (stored on the attempt)."""
        return {**asdict(self), "name": self.name}

    def key(self) -> tuple[str, ...]:
        """A hashable key for caches: equal plans give equal keys."""
        return (self.device, self.image_encoder, self.unet, self.vae)

    def dtype_of(self, component: str) -> str:
        """The dtype name of ``component`` ("image_encoder", "unet" or "vae")."""
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {', '.join(COMPONENTS)}, got {component!r}")
        return str(getattr(self, component))

    def torch_dtype(self, component: str) -> torch.dtype:
        """The ``torch.dtype`` of ``component``."""
        return to_torch_dtype(self.dtype_of(component))


def to_torch_dtype(dtype: str) -> torch.dtype:
    """Map "fp32" / "bf16" / "fp16" to the torch dtype."""
    import torch

    mapping = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in mapping:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return mapping[dtype]


def device_type(device: str) -> str:
    """The device's type without an index: ``cuda:1`` -> ``cuda``."""
    return device.split(":", 1)[0]


def detect_device() -> str:
    """The best device torch can use here: "cuda", "mps" or "cpu"."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def bf16_supported(device: str) -> bool:
    """Whether ``device`` runs bf16 natively (CUDA: Ampere or newer; CPU: always)."""
    kind = device_type(device)
    if kind == "cpu":
        return True
    if kind == "cuda":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    # MPS bf16 depends on the macOS version; fp16 is the precision Apple devices are known to run.
    return False


def choose_plan(precision: str, device: str | None = None) -> tuple[Plan, str | None]:
    """Pick the plan for a requested ``precision`` ("auto", "bf16", "fp16" or "fp32").

    ``auto`` means bf16 on CUDA when supported (else fp16), fp16 on MPS and fp32 on CPU. An
    explicit precision is honoured as a uniform plan, except bf16 on a device without bf16,
    which becomes fp16. Returns the plan and, when the request was changed, the reason why.
    """
    precision = precision.strip().lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = device or detect_device()
    kind = device_type(device)
    if kind not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")

    if precision == "auto":
        if kind == "cuda":
            dtype = "bf16" if bf16_supported(device) else "fp16"
        elif kind == "mps":
            dtype = "fp16"
        else:
            dtype = "fp32"
        return Plan.uniform(dtype, device), None

    if precision == "bf16" and not bf16_supported(device):
        reason = f"bf16 was asked for but {device} does not support bf16; using fp16 instead."
        return Plan.uniform("fp16", device), reason
    return Plan.uniform(precision, device), None
