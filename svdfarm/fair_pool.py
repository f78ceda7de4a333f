"""A connection pool that hands its connections out in the order they were asked for.

SQLAlchemy's :class:`~sqlalchemy.pool.QueuePool` wakes a waiter when a connection comes back,
but the waiter must then take the connection from the queue itself: a request that asks in
between takes it first. Under gevent (``svdfarm web``'s default) a web process serves all its
requests at once, new ones arrive all the time, and a waiter can be overtaken again and again:
measured on the status endpoint at 64 clients (``bench.web_load``), the 99th percentile was 5.5
times the median with QueuePool and 3.9 times with this pool.
:class:`FairQueuePool` puts a first-come-first-served gate in front of the queue: a returned
connection's turn goes straight to the longest waiter, and nobody passes it.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from sqlalchemy import exc
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool


class Turns:
    """A counting semaphore whose permits go to waiters in the order they asked.

    Built on :mod:`threading`, so it is a thread's lock in threads and a greenlet's under
    gevent's monkey-patching. A permit released while someone waits is handed to the first
    waiter directly; it never returns to the count for another caller to take.
    """

    def __init__(self, permits: int) -> None:
        """Start with ``permits`` free permits."""
        self._lock = threading.Lock()
        self._free = permits
        self._waiters: deque[threading.Event] = deque()

    def acquire(self, timeout: float) -> bool:
        """Take a permit, waiting at most ``timeout`` seconds behind the earlier callers;
        False when the time ran out."""
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):
            return True
        with self._lock:
            try:
                self._waiters.remove(turn)
            except ValueError:
                return True  # handed a permit just as the wait ran out: it is ours
            return False

    def release(self) -> None:
        """Give a permit back: to the first waiter, or to the count when none waits."""
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._free += 1

    def waiting(self) -> int:
        """How many callers wait for a permit now."""
        return len(self._waiters)


class FairQueuePool(QueuePool):
    """A :class:`~sqlalchemy.pool.QueuePool` whose callers get connections first come, first
    served (:class:`Turns` for each of ``pool_size + max_overflow`` connections).

    The queue underneath never makes anyone wait: a caller holding a turn finds a pooled
    connection, or room to open one. An unlimited overflow (-1) needs no turns.
    """

    def __init__(
        self,
        creator: Any,
        pool_size: int = 5,
        max_overflow: int = 10,
        timeout: float = 30.0,
        **kw: Any,
    ) -> None:
        """Like :class:`~sqlalchemy.pool.QueuePool`."""
        super().__init__(
            creator, pool_size=pool_size, max_overflow=max_overflow, timeout=timeout, **kw
        )
        limited = max_overflow >= 0 and pool_size > 0
        self._turns = Turns(pool_size + max_overflow) if limited else None

    def _do_get(self) -> ConnectionPoolEntry:
        if self._turns is None:
            return super()._do_get()
        if not self._turns.acquire(self._timeout):
            raise exc.TimeoutError(
                f"connection pool of {self.size()} (overflow {self._max_overflow}) all in use, "
                f"waited {self._timeout:.1f} s",
                code="3o7r",
            )
        try:
            return super()._do_get()
        except BaseException:
            self._turns.release()
            raise

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        try:
            super()._do_return_conn(record)
        finally:
            if self._turns is not None:
                self._turns.release()

    def waiting(self) -> int:
        """How many callers wait for a connection now."""
        return 0 if self._turns is None else self._turns.waiting()
