"""Boundary casts: any mix of dtypes runs, without editing diffusers.

Each component's floating inputs are cast to the dtype of its own weights as it is called, and
its floating outputs to fp32, the dtype the pipeline's glue (latents, scheduler, guidance)
then works in. The image encoder and the UNet are called as modules, so forward hooks do it;
the pipeline calls the VAE through ``vae.encode`` and ``vae.decode``, so those two methods get
a thin wrapper on the instance. Turning casts off removes the hooks and the wrappers, so the
raw dtype errors can be seen (and recovered from by the ladder).

:func:`failing_component` names the component an exception came from by walking its
traceback, which works with casts on or off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

from worker.plans import COMPONENTS

_STATE = "_svdfarm_casts"
#: Arguments left alone: the UNet's timestep keeps fp32 precision (it embeds it itself).
_KEEP = {"unet": ({1}, {"timestep"})}


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating parameter (fp32 when it has none)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with each floating tensor in it (in tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, dict):  # includes diffusers' BaseOutput and transformers' ModelOutput
        for key in list(value.keys()):
            value[key] = cast_floats(value[key], dtype)
        return value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(cast_floats(item, dtype) for item in value)
    if isinstance(value, list):
        return [cast_floats(item, dtype) for item in value]
    return value


def _cast_arguments(
    component: str, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with floating tensors in the module's dtype."""
    dtype = _module_dtype(module)
    keep_positions, keep_names = _KEEP.get(component, (set(), set()))
    new_args = tuple(
        arg if i in keep_positions else cast_floats(arg, dtype) for i, arg in enumerate(args)
    )
    new_kwargs = {
        name: value if name in keep_names else cast_floats(value, dtype)
        for name, value in kwargs.items()
    }
    return new_args, new_kwargs


def _wrap_method(
    component: str, module: torch.nn.Module, method: Callable[..., Any]
) -> Callable[..., Any]:
    """``method`` of ``module`` with its inputs cast in and its outputs cast to fp32."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _cast_arguments(component, module, args, kwargs)
        return cast_floats(method(*args, **kwargs), torch.float32)

    return wrapper


def set_casts(pipe: Any, enabled: bool) -> None:
    """Install (or remove) the boundary casts on a pipeline; calling it twice is harmless."""
    installed = getattr(pipe, _STATE, None)
    if enabled and installed is None:
        handles: list[Any] = []
        for component in ("image_encoder", "unet"):
            module = getattr(pipe, component)

            def pre(
                mod: torch.nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                component: str = component,
            ) -> tuple[tuple[Any, ...], dict[str, Any]]:
                return _cast_arguments(component, mod, args, kwargs)

            def post(_mod: torch.nn.Module, _args: Any, _kwargs: Any, output: Any) -> Any:
                return cast_floats(output, torch.float32)

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        vae = pipe.vae
        for name in ("encode", "decode"):
            setattr(vae, name, _wrap_method("vae", vae, getattr(type(vae), name).__get__(vae)))
        setattr(pipe, _STATE, handles)
    elif not enabled and installed is not None:
        for handle in installed:
            handle.remove()
        for name in ("encode", "decode"):
            pipe.vae.__dict__.pop(name, None)
        delattr(pipe, _STATE)


def casts_enabled(pipe: Any) -> bool:
    """True when the boundary casts are installed on ``pipe``."""
    return getattr(pipe, _STATE, None) is not None


def failing_component(exc: BaseException, pipe: Any) -> str | None:
    """The component ("image_encoder", "unet" or "vae") whose call raised ``exc``, if any.

    Walks the traceback from the outside in and returns the first frame that belongs to one of
    the pipeline's components: the call the pipeline made, not a layer deep inside it.
    """
    components = {id(getattr(pipe, name, None)): name for name in COMPONENTS}
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in components:
            return components[id(owner)]
        tb = tb.tb_next
    return None
