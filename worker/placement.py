"""Putting a loaded pipeline into a plan's shape, in place: component dtypes, device or CPU
offload, feed-forward chunking, boundary casts.

Re-casting never reloads from disk, and never loses precision: weights are loaded in the first
plan's dtypes; casting up (bf16 -> fp32) and back to the loaded dtype is exact. Before the
first cast that would round (down from the loaded dtype, or between bf16 and fp16), a CPU copy
of that component's as-loaded weights is kept, and every later cast of it starts from that
copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from worker.casts import set_casts
from worker.plans import COMPONENTS, Plan

_EXACT_UP = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


class Placement:
    """A cached pipeline and what is needed to move it from one plan to another."""

    def __init__(self, pipe: Any) -> None:
        """Remember the dtypes each component was loaded in."""
        self.pipe = pipe
        self.loaded = {c: _dtype_of(getattr(pipe, c)) for c in COMPONENTS}
        self.masters: dict[str, dict[str, torch.Tensor]] = {}
        #: The plan the pipeline is in; None before the first apply and while one runs.
        self.plan: Plan | None = None
        #: accelerate's offload hooks may be installed (set before they are).
        self.offloaded = False

    def _cast(self, component: str, want: torch.dtype) -> None:
        """Cast one component to ``want`` in place, exactly."""
        module = getattr(self.pipe, component)
        have = _dtype_of(module)
        if have == want:
            return
        if component in self.masters:
            module.to(dtype=want)
            module.load_state_dict(self.masters[component])
            return
        if want == self.loaded[component] or (have, want) in _EXACT_UP:
            module.to(dtype=want)
            return
        # This cast rounds: keep the as-loaded weights to start every later cast from.
        self.masters[component] = {
            name: tensor.detach().to("cpu", dtype=self.loaded[component], copy=True)
            if tensor.is_floating_point()
            else tensor.detach().to("cpu", copy=True)
            for name, tensor in module.state_dict().items()
        }
        module.to(dtype=want)

    def ready_for(self, plan: Plan) -> bool:
        """True when the pipeline is already in ``plan``'s shape: :meth:`apply` does nothing."""
        return plan == self.plan and not self.offloaded

    def apply(self, plan: Plan) -> None:
        """Re-cast and re-place the pipeline for ``plan``.

        The plan already in place (every job after a worker's first) costs nothing: without
        offload hooks there is nothing to redo. Only what differs from the plan in place is
        redone: moving to a device walks every module, which took tens of milliseconds per
        job even when every tensor was already there.
        """
        if self.ready_for(plan):
            return
        with _quiet_diffusers():
            self._apply(plan)

    def _apply(self, plan: Plan) -> None:
        """:meth:`apply`, with diffusers' warnings about deliberate casts silenced."""
        pipe = self.pipe
        # Until this apply completes the state is unknown: a failure leaves None, and the
        # next apply redoes everything.
        placed, self.plan = self.plan, None
        if self.offloaded:
            pipe.remove_all_hooks()  # accelerate's offload hooks, before anything moves
            self.offloaded = False
            placed = None  # the hooks left weights on either device: place them again
        for component in COMPONENTS:
            self._cast(component, plan.torch_dtype(component))
        if plan.offload != "none":
            self.offloaded = True
            if plan.offload == "model":
                pipe.enable_model_cpu_offload(device=plan.device)
            else:
                pipe.enable_sequential_cpu_offload(device=plan.device)
        elif placed is None or placed.device != plan.device:
            pipe.to(plan.device)
        if placed is None or placed.forward_chunking != plan.forward_chunking:
            _set_forward_chunking(pipe.unet, plan.forward_chunking)
        set_casts(pipe, plan.casts)
        self.plan = plan


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warnings about casting loaded models and fp16 on CPU: we cast on
    purpose, per component, and the boundary casts make those plans run."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _set_forward_chunking(unet: Any, enabled: bool) -> None:
    """Run the UNet's feed-forward layers in chunks of one (less memory), or not."""
    if enabled:
        unet.enable_forward_chunking(chunk_size=1, dim=0)
        return
    for module in unet.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(chunk_size=None, dim=0)
