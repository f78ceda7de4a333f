"""Sorting exceptions into error classes, and the message a user sees for each."""

from __future__ import annotations

from svdfarm.states import ErrorClass

_DTYPE_MARKERS = (
    "should be the same",
    "expected scalar type",
    "must have the same dtype",
    "expected both inputs to have same dtype",
)
_OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "mps backend out of memory",
)


class JobCanceled(Exception):
    """Raised from the step callback when a person canceled the running job."""


class NonFiniteOutput(RuntimeError):
    """The pipeline produced NaN or infinite values."""


def classify(exc: BaseException) -> ErrorClass:
    """The error class of an exception raised while rendering."""
    from celery.exceptions import SoftTimeLimitExceeded

    from worker.pipeline import ModelUnavailable

    if isinstance(exc, ModelUnavailable):
        return ErrorClass.MODEL_UNAVAILABLE
    if isinstance(exc, SoftTimeLimitExceeded):
        return ErrorClass.TIMEOUT
    if isinstance(exc, NonFiniteOutput):
        return ErrorClass.NON_FINITE
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return ErrorClass.OUT_OF_MEMORY
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and any(m in text for m in _OOM_MARKERS):
        return ErrorClass.OUT_OF_MEMORY
    if isinstance(exc, (RuntimeError, TypeError)) and any(m in text for m in _DTYPE_MARKERS):
        return ErrorClass.DTYPE_MISMATCH
    return ErrorClass.OTHER


def user_message(error_class: ErrorClass, exc: BaseException) -> str:
    """What the status page says about a failed job."""
    detail = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
    if error_class is ErrorClass.MODEL_UNAVAILABLE:
        return str(exc)
    if error_class is ErrorClass.TIMEOUT:
        return "The render took longer than the time limit and was stopped."
    if error_class is ErrorClass.OUT_OF_MEMORY:
        return f"The worker ran out of memory ({detail}). Try fewer frames or a smaller size."
    return (
        f"The render failed: {type(exc).__name__}: {detail}. "
        "The attempt is recorded with its traceback; an operator can requeue the job."
    )
