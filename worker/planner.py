"""Choosing the first plan for a job from the worker's capabilities, the job's size and the
precision the user asked for. What happens after a failure is :mod:`worker.ladder`'s job.

- ``auto``: bf16 everywhere on a CUDA device that really supports it (driver and a real op);
  fp16 for the image encoder and UNet with an fp32 VAE where only fp16 is (and on Apple's MPS,
  whose bf16 support varies by OS version); fp32 on CPU, where bf16 and fp16 are emulated and
  slower than fp32.
- ``bf16`` on a device without it: the same as ``auto`` would pick there, and the attempt
  records why (the user's wish cannot be met; the job is not refused).
- ``fp16`` / ``fp32``: honoured as asked (fp16 without fp16 support falls back to fp32).
- A per-component override (``--dtypes``, or an admin's per-job override) wins over all this.
"""

from __future__ import annotations

from typing import Protocol

from svdfarm.params import PRECISIONS, RenderParams
from worker.plans import Plan


class Caps(Protocol):
    """What the planner reads of a worker's capabilities (see :mod:`worker.probe`)."""

    device: str
    name: str
    bf16_driver: bool
    bf16_op: bool
    fp16: bool

    @property
    def bf16(self) -> bool:
        """bf16 is really supported: the driver says so and a real op gave a finite result."""
        ...


def _auto(caps: Caps, **knobs: object) -> Plan:
    """The plan ``auto`` picks on this device."""
    if caps.device in ("cuda", "mps"):
        if caps.device == "cuda" and caps.bf16:
            return Plan.uniform("bf16", caps.device, **knobs)  # type: ignore[arg-type]
        if caps.fp16:
            return Plan(caps.device, "fp16", "fp16", "fp32", **knobs)  # type: ignore[arg-type]
    return Plan.uniform("fp32", caps.device, **knobs)  # type: ignore[arg-type]


def first_plan(
    caps: Caps,
    params: RenderParams,
    precision: str | None = None,
    *,
    casts: bool = True,
    dtypes: dict[str, str] | None = None,
) -> tuple[Plan, str | None]:
    """The first rung for a job, and the reason when the user's precision could not be met."""
    precision = (precision or params.precision).strip().lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    knobs = {
        "decode_chunk_size": max(1, min(params.decode_chunk_size, params.num_frames)),
        "casts": casts,
    }
    reason = None
    if precision == "auto":
        plan = _auto(caps, **knobs)
    elif precision == "bf16" and not caps.bf16:
        plan = _auto(caps, **knobs)
        why = "its driver says no" if not caps.bf16_driver else "a test op in bf16 failed"
        reason = (
            f"bf16 was asked for, but {caps.name} ({caps.device}) cannot run it ({why}); "
            f"running {plan.dtypes_name} instead"
        )
    elif precision == "fp16" and not caps.fp16:
        plan = Plan.uniform("fp32", caps.device, **knobs)  # type: ignore[arg-type]
        reason = f"fp16 was asked for, but {caps.name} ({caps.device}) cannot run it; using fp32"
    else:
        plan = Plan.uniform(precision, caps.device, **knobs)  # type: ignore[arg-type]
    if dtypes:
        plan = plan.with_changes(**dtypes)
    return plan, reason
