"""The webhooks' enums: the events an endpoint may subscribe to, the state of a delivery,
and which job event becomes which webhook event.

Kept apart from :mod:`svdfarm.webhooks` so the models can use them without importing it.
"""

from __future__ import annotations

import enum

from svdfarm.states import EventType


class WebhookEvent(str, enum.Enum):
    """What a delivery tells its receiver (the payload's ``type``)."""

    QUEUED = "job.queued"
    STARTED = "job.started"
    PROGRESS = "job.progress"
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELED = "job.canceled"

    @classmethod
    def parse(cls, text: str) -> WebhookEvent:
        """The event named ``text`` (``job.succeeded`` or ``succeeded``), else ValueError."""
        name = text.strip().lower()
        for member in cls:
            if name in (member.value, member.value.removeprefix("job.")):
                return member
        known = ", ".join(m.value for m in cls)
        raise ValueError(f"Unknown webhook event {text[:40]!r}: the events are {known}.")


#: What an endpoint gets when it names no events, and what a job's own ``webhook_url`` gets:
#: every event but ``job.progress`` (opt-in: one per phase of the render).
DEFAULT_EVENTS: tuple[WebhookEvent, ...] = tuple(
    e for e in WebhookEvent if e is not WebhookEvent.PROGRESS
)

#: The job event each webhook event comes from. A requeue starts a new life of the job: it
#: is queued again, so it is a ``job.queued`` as well.
FROM_JOB_EVENT: dict[EventType, WebhookEvent] = {
    EventType.SUBMITTED: WebhookEvent.QUEUED,
    EventType.REQUEUED: WebhookEvent.QUEUED,
    EventType.STORAGE_RETRIED: WebhookEvent.QUEUED,
    EventType.CLAIMED: WebhookEvent.STARTED,
    EventType.PHASE: WebhookEvent.PROGRESS,
    EventType.SUCCEEDED: WebhookEvent.SUCCEEDED,
    EventType.FAILED: WebhookEvent.FAILED,
    EventType.CANCELED: WebhookEvent.CANCELED,
}


class DeliveryState(str, enum.Enum):
    """Where one delivery stands."""

    #: Not delivered yet: waiting for its next try (or being sent now).
    PENDING = "pending"
    #: The receiver answered 2xx.
    DELIVERED = "delivered"
    #: Given up: retried for three days, or the receiver answered 410 Gone.
    FAILED = "failed"
    #: Never to be sent: its endpoint was removed or disabled, or its URL answered 410 before.
    CANCELED = "canceled"
