"""Dtype plans: where the pipeline runs, the dtype of each of its three models, and the memory
knobs. A plan is plain data, written on each attempt and shown by its ``name``.

torch is imported inside the functions that need it, so reading a plan stays cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPES = ("fp32", "bf16", "fp16")
COMPONENTS = ("image_encoder", "unet", "vae")
DEVICES = ("cuda", "mps", "cpu")
OFFLOADS = ("none", "model", "sequential")

# The order and short names used in Plan.name: the UNet first, it dominates time and memory.
_SHORT_NAMES = {"unet": "unet", "image_encoder": "enc", "vae": "vae"}


@dataclass(frozen=True)
class Plan:
    """A device, a dtype for each pipeline component, and how to spend memory.

    ``casts`` turns on the boundary casts (each component's inputs cast to its dtype, its
    outputs to fp32) that make any mix of dtypes valid. ``offload`` moves components to the
    CPU between uses (``model``) or layer by layer (``sequential``); ``forward_chunking`` runs
    the UNet's feed-forward layers in chunks; ``decode_chunk_size`` is how many frames the VAE
    decodes at once.
    """

    device: str
    image_encoder: str
    unet: str
    vae: str
    decode_chunk_size: int = 8
    offload: str = "none"
    forward_chunking: bool = False
    casts: bool = True

    def __post_init__(self) -> None:
        """Refuse a dtype, device or knob the worker does not know, naming the value."""
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
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload must be one of {', '.join(OFFLOADS)}, got {self.offload!r}")
        if self.decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be at least 1, got {self.decode_chunk_size}")

    @classmethod
    def uniform(cls, dtype: str, device: str, **knobs: Any) -> Plan:
        """A plan with the same dtype for every component."""
        return cls(device=device, image_encoder=dtype, unet=dtype, vae=dtype, **knobs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Read a plan back from :meth:`as_dict` (extra keys such as ``name`` are ignored)."""
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})

    @property
    def is_uniform(self) -> bool:
        """True when every component has the same dtype."""
        return len({self.image_encoder, self.unet, self.vae}) == 1

    @property
    def dtypes_name(self) -> str:
        """The dtypes as a person reads them: ``bf16`` or ``bf16 unet+enc, fp32 vae``."""
        if self.is_uniform:
            return self.unet
        groups: dict[str, list[str]] = {}
        for component, short in _SHORT_NAMES.items():
            groups.setdefault(getattr(self, component), []).append(short)
        return ", ".join(f"{dtype} {'+'.join(names)}" for dtype, names in groups.items())

    @property
    def name(self) -> str:
        """A short readable name, e.g. ``bf16 unet+enc, fp32 vae, chunk 4 on cuda``."""
        parts = [self.dtypes_name, f"chunk {self.decode_chunk_size}"]
        if self.offload != "none":
            parts.append(f"{self.offload} offload")
        if self.forward_chunking:
            parts.append("ff chunking")
        if not self.casts:
            parts.append("no casts")
        return f"{', '.join(parts)} on {self.device}"

    def as_dict(self) -> dict[str, Any]:
        """The plan's fields and name as a JSON-ready dict (stored on the attempt)."""
        return {**asdict(self), "name": self.name}

    def key(self) -> tuple[Any, ...]:
        """A hashable key: equal plans give equal keys."""
        return tuple(asdict(self).values())

    def dtype_of(self, component: str) -> str:
        """The dtype name of ``component`` ("image_encoder", "unet" or "vae")."""
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {', '.join(COMPONENTS)}, got {component!r}")
        return str(getattr(self, component))

    def torch_dtype(self, component: str) -> torch.dtype:
        """The ``torch.dtype`` of ``component``."""
        return to_torch_dtype(self.dtype_of(component))

    def with_changes(self, **changes: Any) -> Plan:
        """A copy with some fields replaced (dtypes by component name, or knobs)."""
        return replace(self, **changes)

    def all_fp32(self) -> Plan:
        """The same plan with every component in fp32: the last resort of the ladder."""
        return replace(self, image_encoder="fp32", unet="fp32", vae="fp32")


def parse_dtypes(text: str) -> dict[str, str]:
    """Parse ``image_encoder=bf16,unet=fp32,vae=bf16`` (any subset) into a dict."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        component, sep, dtype = item.partition("=")
        component, dtype = component.strip(), dtype.strip().lower()
        if not sep or component not in COMPONENTS or dtype not in DTYPES:
            raise ValueError(
                f"bad dtype override {item!r}: use component=dtype with a component of "
                f"{', '.join(COMPONENTS)} and a dtype of {', '.join(DTYPES)}"
            )
        result[component] = dtype
    return result


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
