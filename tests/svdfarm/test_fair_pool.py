"""The fair pool: connections go to waiters in the order they asked, a returned one is never
taken by a later caller, and a wait that runs out raises the pool's timeout."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import exc, text

from svdfarm.db import Database
from svdfarm.fair_pool import FairQueuePool, Turns
from tests.conftest import DATABASES


def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _queue_up(
    waiting: Callable[[], int], take: Callable[[Callable[[], None]], None], count: int
) -> list[int]:
    """Start ``count`` threads, each calling ``take(got)`` once the previous one waits;
    ``take`` calls ``got()`` when it has what it waited for, which appends the thread's number
    to the list returned."""
    order: list[int] = []
    for n in range(count):
        threading.Thread(target=take, args=(lambda n=n: order.append(n),), daemon=True).start()
        _until(lambda n=n: waiting() == n + 1)
    return order


def test_permits_go_to_the_waiters_in_the_order_they_asked() -> None:
    """Five waiters behind a taken permit get it back one at a time, first to last; a caller
    arriving while a handed-over permit is on its way does not get it."""
    turns = Turns(1)
    assert turns.acquire(0)
    order = _queue_up(turns.waiting, lambda got: turns.acquire(5) and got(), 5)
    for released in range(5):
        turns.release()
        assert not turns.acquire(0), "a newcomer took the permit owed to a waiter"
        _until(lambda released=released: len(order) == released + 1)
    assert order == [0, 1, 2, 3, 4]
    turns.release()
    assert turns.acquire(0)


def test_a_wait_that_runs_out_leaves_the_queue() -> None:
    """A timed-out waiter answers False and is no longer waiting: the next release goes to
    whoever waits next, or back to the count."""
    turns = Turns(1)
    assert turns.acquire(0)
    started = time.monotonic()
    assert not turns.acquire(0.05)
    assert time.monotonic() - started >= 0.05
    assert turns.waiting() == 0
    turns.release()
    assert turns.acquire(0)


@pytest.mark.parametrize("database_url", DATABASES[1:], indirect=True)
def test_pooled_connections_go_out_first_come_first_served(database_url: str) -> None:
    """On PostgreSQL, with both connections of a pool of 2 in use, four sessions wait; one
    connection given back goes from waiter to waiter in the order they came, and no
    connection is opened beyond 2."""
    db = Database(database_url, pool_size=2, max_overflow=0)
    pool = db.engine.pool
    assert isinstance(pool, FairQueuePool)
    held = [db.engine.connect() for _ in range(2)]
    backends = set()

    def take(got: Callable[[], None]) -> None:
        with db.engine.connect() as conn:
            got()
            backends.add(conn.execute(text("SELECT pg_backend_pid()")).scalar())

    try:
        order = _queue_up(pool.waiting, take, 4)
        held[0].close()
        _until(lambda: len(order) == 4)
        assert order == [0, 1, 2, 3]
        held[1].close()
        _until(lambda: pool.checkedout() == 0)
        assert len(backends) <= 2
    finally:
        db.dispose()


@pytest.mark.parametrize("database_url", DATABASES[1:], indirect=True)
def test_a_full_pool_times_out_with_the_pools_error(database_url: str) -> None:
    """Waiting longer than the pool's timeout raises SQLAlchemy's TimeoutError (the web
    answers it 503), and the pool still works after."""
    db = Database(database_url, pool_size=1, max_overflow=0)
    db.engine.pool._timeout = 0.05  # type: ignore[attr-defined]
    try:
        conn = db.engine.connect()
        with pytest.raises(exc.TimeoutError, match="all in use"):
            db.engine.connect()
        assert db.engine.pool.waiting() == 0  # type: ignore[attr-defined]
        conn.close()
        with db.engine.connect() as again:
            assert again.execute(text("SELECT 1")).scalar() == 1
    finally:
        db.dispose()
