"""The retry ladder: after a failed attempt, the next plan to try, or none.

- dtype mismatch: the failing component to fp32, then everything in fp32;
- out of memory: the same plan once more after freeing memory, then lower-memory rungs at the
  same precision (half the decode chunk with feed-forward chunking, decode chunk 1, model
  offload, sequential offload), then fp32 with sequential offload; offload needs an accelerator;
- non-finite output: the VAE to fp32, then everything in fp32;
- anything else: no retry.

Each rung is tried at most once; the number of attempts is capped by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

from svdfarm.states import ErrorClass
from worker.plans import Plan, device_type

#: The ladder never runs more attempts than this, whatever the settings say.
HARD_CAP = 10


def _first_new(
    candidates: list[tuple[Plan, str]], tried: Sequence[Plan]
) -> tuple[Plan, str] | None:
    """The first candidate plan not tried yet."""
    seen = {plan.key() for plan in tried}
    for plan, why in candidates:
        if plan.key() not in seen:
            return plan, why
    return None


def _memory_rungs(plan: Plan, tried: Sequence[Plan]) -> tuple[Plan, str] | None:
    """The next lower-memory rung after an out-of-memory error."""
    keys = [p.key() for p in tried]
    # One second chance, after memory is freed, for the first plan that ran out of memory.
    if keys.count(plan.key()) == 1 and len(set(keys)) == len(keys):
        return plan, "out of memory: freed cached memory, same plan once more"
    candidates: list[tuple[Plan, str]] = []
    if not plan.forward_chunking:
        half = max(1, plan.decode_chunk_size // 2)
        candidates.append(
            (
                plan.with_changes(decode_chunk_size=half, forward_chunking=True),
                f"out of memory: decode {half} frames at a time, UNet feed-forward in chunks",
            )
        )
    if plan.decode_chunk_size > 1:
        candidates.append(
            (
                plan.with_changes(decode_chunk_size=1, forward_chunking=True),
                "out of memory: decode frames one at a time",
            )
        )
    low = plan.with_changes(decode_chunk_size=1, forward_chunking=True)
    if device_type(plan.device) != "cpu":
        if plan.offload == "none":
            candidates.append(
                (low.with_changes(offload="model"), "out of memory: model CPU offload")
            )
        candidates += [
            (low.with_changes(offload="sequential"), "out of memory: sequential CPU offload"),
            (
                low.with_changes(offload="sequential").all_fp32(),
                "out of memory: fp32 with sequential CPU offload (last resort)",
            ),
        ]
    return _first_new(candidates, tried)


def next_plan(
    plan: Plan, error: ErrorClass, component: str | None, tried: Sequence[Plan]
) -> tuple[Plan, str] | None:
    """The plan after ``plan`` failed with ``error`` (in ``component`` when known), and why.

    ``tried`` lists every plan already attempted for this job, ``plan`` included. None means
    the ladder has nothing left: the job fails.
    """
    if len(tried) >= HARD_CAP:
        return None
    fp32 = (plan.all_fp32(), f"{error.value.replace('_', '-')}: everything in fp32 (last resort)")
    if error is ErrorClass.DTYPE_MISMATCH:
        candidates = []
        if component and plan.dtype_of(component) != "fp32":
            candidates.append(
                (
                    plan.with_changes(**{component: "fp32"}),
                    f"dtype mismatch in {component}: {component} to fp32",
                )
            )
        return _first_new([*candidates, fp32], tried)
    if error is ErrorClass.NON_FINITE:
        candidates = []
        if plan.vae != "fp32":
            candidates.append((plan.with_changes(vae="fp32"), "non-finite output: VAE to fp32"))
        return _first_new([*candidates, fp32], tried)
    if error is ErrorClass.OUT_OF_MEMORY:
        return _memory_rungs(plan, tried)
    return None
