"""What waits in each queue: jobs queued in the database, and messages held by the broker.

Shared by ``svdfarm queues``, the admin's workers page and ``/metrics``. What *waits* is
counted from the database (:func:`waiting_jobs`), the source of truth: the broker's count
(:func:`queue_depths`) also holds the messages of jobs canceled while queued (a worker drops
each one when it comes to it) and misses those the broker lost (the reaper publishes them
again), and no broker says whose a message is without reading it (AMQP cannot read one
without taking it). The message count is still shown beside it, so a difference can be seen.

A passive ``queue_declare`` asks the broker for a queue's message count without creating it; a
queue the broker does not know (AMQP answers NOT_FOUND) holds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery import Celery
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from svdfarm.models import Job
from svdfarm.settings import Settings
from svdfarm.states import JobState


class BrokerUnavailable(RuntimeError):
    """The broker could not be reached to count messages."""


def waiting_jobs(session: Session, queues: Iterable[str] = ()) -> dict[str, int]:
    """Jobs queued in the database on each of ``queues`` (zero for none), and on any other
    queue that has some, in the order given, then by name."""
    counts = dict(
        session.execute(
            select(Job.queue, func.count()).where(Job.state == JobState.QUEUED).group_by(Job.queue)
        ).all()
    )
    names = list(dict.fromkeys([*queues, *sorted(q for q in counts if q)]))
    return {queue: int(counts.get(queue, 0)) for queue in names}


def queue_depths(
    settings: Settings,
    queues: Iterable[str],
    *,
    celery: Celery | None = None,
    max_retries: int = 1,
) -> dict[str, int]:
    """Messages the broker holds in each of ``queues``, in the order given (those of canceled
    jobs included: see the module doc).

    ``celery`` is the app to connect with (the web passes its own); without one, a Celery app
    is made for ``settings`` and closed afterwards. Raises :class:`BrokerUnavailable` when the
    broker cannot be reached after ``max_retries`` connection retries, so a page or a scrape
    fails fast instead of waiting on a dead broker.
    """
    from svdfarm.celery_app import create_celery

    if celery is None:
        own = create_celery(settings)
        try:
            return queue_depths(settings, queues, celery=own, max_retries=max_retries)
        finally:
            own.close()
    names = list(dict.fromkeys(queues))
    if settings.embedded_broker:
        settings.ensure_dirs()  # the filesystem transport cannot list a folder that is not there
    depths: dict[str, int] = {}
    with celery.connection_for_read() as connection:
        try:
            connection.ensure_connection(max_retries=max_retries, interval_start=0.5)
            channel = connection.default_channel
        except Exception as exc:
            raise BrokerUnavailable(
                f"The broker at {maybe_sanitize_url(settings.broker_url)} could not be reached "
                f"({type(exc).__name__}: {exc}); check SVDFARM_BROKER_URL and that it is up."
            ) from exc
        if connection.transport.driver_type == "redis":
            return _redis_depths(channel, names)
        for queue in names:
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except Exception:  # a broker that does not know the queue (AMQP): nothing waits
                depths[queue] = 0
                # AMQP closes a channel after NOT_FOUND; the next queue needs a fresh one.
                channel = connection.channel()
    return depths


def _redis_depths(channel: Any, names: list[str]) -> dict[str, int]:
    """Every queue's message count from Redis in one round trip: kombu keeps a queue as one
    list per priority step, and its own ``queue_declare`` asks for them a queue at a time (one
    round trip each: 72 queues took ~0.4 s a scrape)."""
    steps = list(channel.priority_steps)
    with channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
        for queue in names:
            for step in steps:
                pipe.llen(channel._q_for_pri(queue, step))
        sizes = pipe.execute()
    return {
        queue: sum(int(n) for n in sizes[i * len(steps) : (i + 1) * len(steps)])
        for i, queue in enumerate(names)
    }
