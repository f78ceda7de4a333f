"""Sorting exceptions into error classes, and the message a user sees for each.

The class decides what the ladder does next: a dtype mismatch, running out of memory or
non-finite output are worth another attempt with a different plan; anything else is not.
Torch is never imported here: this module is loaded by code that must stay light, and an
exception can only be a torch one if torch is already in ``sys.modules``.
"""

from __future__ import annotations

import errno
import re
import sys
from typing import Any

from svdfarm.states import ErrorClass

# The mixed-dtype messages torch 2.13 raises (checked against real calls in the tests), and
# diffusers' attention checks, which raise ValueError("Query and key must have the same dtype.").
_DTYPE_PATTERN = re.compile(
    r"same (?:dtype|scalar type|datatype)"  # linear, addmm, addmv, dot, SDPA, index_add
    r"|type \([^)]*\) should be the same"  # conv: "Input type (float) and bias type (...)"
    r"|\bexpected scalar type"  # bmm, baddbmm, einsum, conv without bias
    r"|mixed dtype"  # layer_norm, group_norm, batch_norm on CPU
    r"|dtypes must be the same|dtypes match"  # baddbmm's input, index_put
    r"|type promoting not supported|dtype to be equal to|to match query dtype|but got dtype",
    re.IGNORECASE,
)
# Conv says "Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor) should be
# the same" when only the devices differ; that is a placement bug another dtype cannot fix.
_CONV_TYPES = re.compile(r"input type \(([^)]*)\) and \w+ type \(([^)]*)\) should", re.IGNORECASE)
_OOM_MARKERS = (
    "out of memory",  # "CUDA out of memory", "CUDA error: out of memory", "MPS backend out of ..."
    "alloc_failed",  # CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED
    "can't allocate memory",  # DefaultCPUAllocator on Linux and macOS
    "not enough memory",  # DefaultCPUAllocator on Windows
    "cannot allocate memory",  # errno 12 as the OS words it
)


#: OS errors that mean the worker's disk or store cannot take the files, not a bad job.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
_STORAGE_MARKERS = ("no space left on device", "disk quota exceeded", "read-only file system")


class JobCanceled(Exception):
    """Raised from the step callback when a person canceled the running job."""


class NonFiniteOutput(RuntimeError):
    """The pipeline produced NaN or infinite values."""


def classify(exc: BaseException) -> ErrorClass:
    """The error class of an exception raised while rendering, looking through its causes."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        found = _classify_one(link)
        if found is not ErrorClass.OTHER:
            return found
        # A wrapper raised while handling an OOM is still an OOM, unless it said "from None".
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return ErrorClass.OTHER


def _classify_one(exc: BaseException) -> ErrorClass:
    """The error class of one exception, without its causes."""
    from celery.exceptions import SoftTimeLimitExceeded

    from worker.pipeline import ModelUnavailable

    if isinstance(exc, ModelUnavailable):
        return ErrorClass.MODEL_UNAVAILABLE
    if isinstance(exc, SoftTimeLimitExceeded):
        return ErrorClass.TIMEOUT
    if isinstance(exc, NonFiniteOutput):
        return ErrorClass.NON_FINITE
    if _is_storage_error(exc):
        return ErrorClass.STORAGE
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (
        torch is not None and isinstance(exc, torch.OutOfMemoryError)
    ):
        return ErrorClass.OUT_OF_MEMORY
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(m in text.lower() for m in _OOM_MARKERS):
        return ErrorClass.OUT_OF_MEMORY
    if isinstance(exc, (RuntimeError, TypeError, ValueError)) and _DTYPE_PATTERN.search(text):
        conv = _CONV_TYPES.search(text)
        if conv is None or _float_kind(conv[1]) != _float_kind(conv[2]):
            return ErrorClass.DTYPE_MISMATCH
    return ErrorClass.OTHER


def _is_storage_error(exc: BaseException) -> bool:
    """True for a full or broken disk (ENOSPC, EDQUOT, EROFS, EIO; ffmpeg's words for them)
    and for errors of the S3 client (botocore): the job is fine, its storage is not."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return True
    if type(exc).__module__.split(".")[0] in {"botocore", "boto3"}:
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _STORAGE_MARKERS)


def _float_kind(type_name: str) -> str:
    """The floating-point kind in a torch type name such as ``torch.cuda.HalfTensor``."""
    lowered = type_name.lower()
    # bfloat16 before float: "c10::BFloat16" contains both.
    return next((k for k in ("bfloat16", "half", "double", "float") if k in lowered), lowered)


def check_finite(values: Any, where: str) -> None:
    """Raise :class:`NonFiniteOutput` if a torch tensor or numpy array holds NaN or infinity."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(values, torch.Tensor):
        if not (values.is_floating_point() or values.is_complex()):
            return
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return
        total, nan = values.numel(), int(torch.isnan(values).sum())
        bad, dtype = total - int(finite.sum()), str(values.dtype).removeprefix("torch.")
    else:
        import numpy as np

        array = np.asarray(values)
        if not np.issubdtype(array.dtype, np.inexact):
            return
        finite_array = np.isfinite(array)
        if finite_array.all():
            return
        total, nan = array.size, int(np.isnan(array).sum())
        bad, dtype = total - int(finite_array.sum()), str(array.dtype)
    raise NonFiniteOutput(
        f"NaN/inf in {where}: {nan} NaN and {bad - nan} infinite of {total} values ({dtype}); "
        "a plan with a wider dtype (fp32) for the component that made them avoids this."
    )


def user_message(
    error_class: ErrorClass, exc: BaseException, *, time_limit_s: float | None = None
) -> str:
    """What the status page says about a failed job; ``time_limit_s`` is the soft time limit
    a timeout hit (``SVDFARM_TASK_SOFT_TIME_LIMIT``)."""
    detail = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
    if error_class is ErrorClass.MODEL_UNAVAILABLE:
        return str(exc)
    if error_class is ErrorClass.TIMEOUT:
        limit = f"its time limit of {time_limit_s:g} s" if time_limit_s else "its time limit"
        return (
            f"The render took longer than {limit} (SVDFARM_TASK_SOFT_TIME_LIMIT) and was "
            "stopped. Submit fewer frames, fewer steps or a smaller size, or ask an operator "
            "to raise the limit."
        )
    if error_class is ErrorClass.STORAGE:
        return (
            f"The worker could not store the video: its disk is full or its store failed "
            f"({detail.rstrip('.')}). The job and its input are kept and it goes back to the "
            "queue by itself in a minute (a few times in a row at most). Operators: free space "
            "under the storage folder (svdfarm cleanup, SVDFARM_RETENTION) or fix the store."
        )
    if error_class is ErrorClass.OUT_OF_MEMORY:
        return f"The worker ran out of memory ({detail}). Try fewer frames or a smaller size."
    if error_class is ErrorClass.NON_FINITE:
        return (
            f"The render produced invalid pixels ({detail}). "
            "Choose precision fp32 and submit again."
        )
    if error_class is ErrorClass.DTYPE_MISMATCH:
        return (
            f"The model's parts disagreed on number precision ({detail}). "
            "Choose precision fp32 and submit again; an operator can requeue the job."
        )
    # The detail ends a sentence of ours: its own full stop would make two.
    return (
        f"The render failed: {type(exc).__name__}: {detail.rstrip('.')}. "
        "The attempt is recorded with its traceback; an operator can requeue the job."
    )
