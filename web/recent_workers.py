"""The online workers as a web process last read them, for the status of queued jobs.

Every status read of a queued job says why it waits, which needs the online workers. Read
once a request, that is a query per request for an answer that changes with heartbeats, a
few seconds apart; so each process keeps what it last read for :data:`MAX_AGE_S` and reads
again after. A waiting reason is then at most that much older than the registry, which is
itself as old as the last heartbeats. Submits and routing always read the registry afresh.

The queues' dispatch orders, for a queued job's place, are kept the same way
(:func:`queue_orders`, :class:`svdfarm.dispatch.OrderCache`): read again once any job event
was recorded (looked for at most every quarter second), or after two seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from flask import current_app
from sqlalchemy.orm import Session

from svdfarm.dispatch import OrderCache
from svdfarm.models import Worker
from svdfarm.registry import online_workers
from svdfarm.settings import Settings

#: Seconds a process answers from the workers it last read.
MAX_AGE_S = 1.0


class RecentWorkers:
    """The online workers, read again once older than ``max_age_s``; safe across threads.

    The workers are detached from the session that read them, with every column loaded:
    read their attributes, never change them.
    """

    def __init__(self, max_age_s: float = MAX_AGE_S) -> None:
        """Nothing read yet."""
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._workers: Sequence[Worker] = ()
        self._read_at = -float("inf")

    def get(self, session: Session, settings: Settings) -> Sequence[Worker]:
        """The online workers, read with ``session`` when what was read is too old."""
        with self._lock:
            if time.monotonic() - self._read_at > self.max_age_s:
                workers = tuple(online_workers(session, settings))
                for worker in workers:  # so that nothing the session does later expires them
                    session.expunge(worker)
                self._workers = workers
                self._read_at = time.monotonic()
            return self._workers


def recent_workers(session: Session, settings: Settings) -> Sequence[Worker]:
    """The app's :class:`RecentWorkers`, read (with ``session``) when too old."""
    cache: RecentWorkers = current_app.extensions.setdefault(
        "svdfarm.recent_workers", RecentWorkers()
    )
    return cache.get(session, settings)


def queue_orders() -> OrderCache:
    """The app's cache of its queues' dispatch orders (:class:`OrderCache`)."""
    cache: OrderCache = current_app.extensions.setdefault("svdfarm.queue_orders", OrderCache())
    return cache
