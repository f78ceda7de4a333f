"""How many messages wait in each Celery queue, read from the broker itself.

Shared by ``svdfarm queues``, the admin's workers page and ``/metrics``. A passive
``queue_declare`` asks the broker for a queue's message count without creating it; a queue the
broker does not know (AMQP answers NOT_FOUND) has nothing waiting.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from kombu.utils.url import maybe_sanitize_url

from svdfarm.settings import Settings


class BrokerUnavailable(RuntimeError):
    """The broker could not be reached to count messages."""


def queue_depths(
    settings: Settings,
    queues: Iterable[str],
    *,
    celery: Celery | None = None,
    max_retries: int = 1,
) -> dict[str, int]:
    """Messages waiting in each of ``queues``, in the order given.

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
        for queue in names:
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except Exception:  # a broker that does not know the queue (AMQP): nothing waits
                depths[queue] = 0
                # AMQP closes a channel after NOT_FOUND; the next queue needs a fresh one.
                channel = connection.channel()
    return depths
