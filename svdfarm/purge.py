"""Emptying the farm's queues (``svdfarm queues purge``): the broker's messages go, and the
jobs that were waiting in the database are canceled, so the two agree afterwards.

``celery purge`` alone empties the broker only: its jobs stay queued in the database, where
the reaper finds them without a message and publishes them again (on RabbitMQ, from the
queues' counts: :func:`svdfarm.reaper.unreadable_broker_lost`). Here the broker is emptied
first, then every job still queued on those queues is canceled through
:func:`svdfarm.lifecycle.cancel` with the reason ``purged``. A job submitted in between has its
message removed or, if it arrives after the
purge, dropped by the worker that finds the job canceled: either way nothing is left queued
without a message, and nothing canceled is run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from celery import Celery
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import select

from svdfarm import lifecycle
from svdfarm.db import Database
from svdfarm.depths import BrokerUnavailable
from svdfarm.lifecycle import By
from svdfarm.models import Job
from svdfarm.settings import Settings
from svdfarm.states import JobState

#: The reason a purged job's ``canceled`` event gives.
REASON = "purged"


@dataclass
class Purged:
    """What a purge did: messages removed per queue, and the ids of the jobs it canceled."""

    messages: dict[str, int] = field(default_factory=dict)
    canceled: list[str] = field(default_factory=list)

    @property
    def message_count(self) -> int:
        """Messages removed from every queue together."""
        return sum(self.messages.values())


def purge_messages(settings: Settings, celery: Celery, queues: Iterable[str]) -> dict[str, int]:
    """Remove every message waiting in ``queues``; the number removed from each.

    A message a worker has taken but not acknowledged is not waiting and stays (its job is
    canceled all the same, and the worker skips it). A queue the broker does not know holds
    nothing. Raises :class:`BrokerUnavailable` before removing anything when the broker
    cannot be reached.
    """
    if settings.embedded_broker:
        settings.ensure_dirs()  # the filesystem transport cannot list a folder that is not there
    removed: dict[str, int] = {}
    with celery.connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=1, interval_start=0.5)
            channel = connection.default_channel
        except Exception as exc:
            raise BrokerUnavailable(
                f"The broker at {maybe_sanitize_url(settings.broker_url)} could not be reached "
                f"({type(exc).__name__}: {exc}); nothing was purged. Check SVDFARM_BROKER_URL."
            ) from exc
        for queue in dict.fromkeys(queues):
            try:
                removed[queue] = int(channel.queue_purge(queue) or 0)
            except connection.channel_errors:  # AMQP: NOT_FOUND closes the channel
                removed[queue] = 0
                channel = connection.channel()
    return removed


def cancel_queued(db: Database, queues: Iterable[str], *, by: By) -> list[str]:
    """Cancel every job queued on ``queues`` (reason ``purged``); the ids canceled.

    Each job is locked and checked again before it is canceled, in a transaction of its own:
    one a worker claimed meanwhile is running, its message was not purged, and it is left alone.
    """
    wanted = list(dict.fromkeys(queues))
    with db.session() as session:
        ids = session.scalars(
            select(Job.id)
            .where(Job.state == JobState.QUEUED, Job.queue.in_(wanted))
            .order_by(Job.created_at, Job.id)
        ).all()
    canceled = []
    for job_id in ids:
        if _cancel_if_queued(db, job_id, by):
            canceled.append(str(job_id))
    return canceled


def _cancel_if_queued(db: Database, job_id: uuid.UUID, by: By) -> bool:
    """Cancel one job if it is still queued; True if it was."""
    with db.begin() as session:
        state = session.scalar(select(Job.state).where(Job.id == job_id).with_for_update())
        if state is not JobState.QUEUED:
            return False
        lifecycle.cancel(session, job_id, by=by, reason=REASON)
        return True


def purge(
    db: Database, settings: Settings, celery: Celery, queues: Iterable[str], *, by: By
) -> Purged:
    """Empty ``queues`` on the broker, then cancel the jobs queued on them (see the module)."""
    names = list(dict.fromkeys(queues))
    messages = purge_messages(settings, celery, names)
    return Purged(messages, cancel_queued(db, names, by=by))
