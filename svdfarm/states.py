"""Job states and their groupings, phases, claim and run outcomes, event types, actors and
error classes: plain enums with readable labels.

The moves between job states, and who may make each, are in :mod:`svdfarm.lifecycle`.
"""

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
        return self in _TERMINAL

    @property
    def active(self) -> bool:
        """True while a worker may be rendering the job (running, or asked to stop)."""
        return self in _ACTIVE

    @property
    def claimable(self) -> bool:
        """True when a delivery of the job may claim it (running: its worker was lost)."""
        return self in _CLAIMABLE

    @classmethod
    def terminal_states(cls) -> tuple[JobState, ...]:
        """The states a job ends in: succeeded, failed, canceled."""
        return _TERMINAL

    @classmethod
    def active_states(cls) -> tuple[JobState, ...]:
        """The states in which a worker may be rendering the job."""
        return _ACTIVE

    @classmethod
    def claimable_states(cls) -> tuple[JobState, ...]:
        """The states a delivery may claim the job from."""
        return _CLAIMABLE


_TERMINAL = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)
_ACTIVE = (JobState.RUNNING, JobState.CANCEL_REQUESTED)
_CLAIMABLE = (JobState.QUEUED, JobState.RUNNING)


class Phase(_Readable):
    """What a job is doing inside its state: waiting, loading, denoising and so on."""

    QUEUED = "queued"
    LOADING = "loading"
    DENOISING = "denoising"
    DECODING = "decoding"
    ENCODING = "encoding"
    DONE = "done"

    @property
    def rendering(self) -> bool:
        """True in the phases whose progress moves with the render (an ETA can be given)."""
        return self in (Phase.DENOISING, Phase.DECODING, Phase.ENCODING)


class Actor(_Readable):
    """Who makes a move: the web form, an API client, the admin, the CLI, a worker, a reaper."""

    WEB = "web"
    API = "api"
    ADMIN = "admin"
    CLI = "cli"
    WORKER = "worker"
    REAPER = "reaper"


class EventType(_Readable):
    """What a row of ``job_events`` says happened."""

    SUBMITTED = "submitted"
    PUBLISHED = "published"
    PUBLISH_FAILED = "publish_failed"
    CLAIMED = "claimed"
    PHASE = "phase"
    ATTEMPT_FAILED = "attempt_failed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCEL_REQUESTED = "cancel_requested"
    CANCELED = "canceled"
    REQUEUED = "requeued"
    WORKER_LOST = "worker_lost"
    HANDED_BACK = "handed_back"
    EXPIRED = "expired"
    STORAGE_RETRIED = "storage_retried"
    PRIORITY_CHANGED = "priority_changed"
    #: A worker would not take the job (it failed here, or the worker is flagged): it waits
    #: for the dispatcher again, to go to another worker (svdfarm.worker_health).
    DECLINED = "declined"

    @property
    def terminal(self) -> bool:
        """True for the events that end a life of the job (one per life)."""
        return self in (EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELED)

    @property
    def new_life(self) -> bool:
        """True for the events that queue an ended job again (a new life begins)."""
        return self in (EventType.REQUEUED, EventType.STORAGE_RETRIED)


class ClaimOutcome(_Readable):
    """Why a delivery of a job did not become a render (or that it did)."""

    CLAIMED = "claimed"
    MISSING = "missing"
    CANCELED = "canceled"
    FINISHED = "finished"
    RUNNING_ELSEWHERE = "running_elsewhere"
    POISONED = "poisoned"
    TAKEN = "taken"
    #: The worker gave the job back for another one (svdfarm.worker_health).
    DECLINED = "declined"


class RunOutcome(_Readable):
    """How one delivery of a job to a worker ended (the Celery task's return value)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    SUPERSEDED = "superseded"
    MISSING = "missing"
    FINISHED = "finished"
    RUNNING_ELSEWHERE = "running_elsewhere"
    POISONED = "poisoned"
    TAKEN = "taken"
    DECLINED = "declined"
    #: The attempt failed here, and the job went back to the queue for another worker.
    HANDED_BACK = "handed_back"


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
    STORAGE = "storage"
    OTHER = "other"


class WorkerState(str, enum.Enum):
    """What a worker is doing, as seen from its heartbeats."""

    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    OFFLINE = "offline"
