"""Job states, attempt outcomes and error classes: plain enums with readable labels."""

from __future__ import annotations

import enum


class _Readable(str, enum.Enum):
    """A string enum whose members have a label a person reads."""

    @property
    def label(self) -> str:
        """The value as a person reads it."""
        return self.value.replace("_", " ")


class JobState(_Readable):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCEL_REQUESTED = "cancel_requested"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        """True once the job will not change again without a requeue."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)


class AttemptOutcome(str, enum.Enum):
    """How one try at rendering a job ended."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class ErrorClass(_Readable):
    """What kind of failure an attempt met; decides whether and how to retry."""

    DTYPE_MISMATCH = "dtype_mismatch"
    OUT_OF_MEMORY = "out_of_memory"
    NON_FINITE = "non_finite"
    MODEL_UNAVAILABLE = "model_unavailable"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    OTHER = "other"


class WorkerState(str, enum.Enum):
    """What a worker is doing, as seen from its heartbeats."""

    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    OFFLINE = "offline"
