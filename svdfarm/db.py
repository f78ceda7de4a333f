"""Database engine, sessions and migrations for SQLite (embedded) and PostgreSQL."""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from svdfarm.fair_pool import FairQueuePool

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

log = logging.getLogger(__name__)
T = TypeVar("T")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL and a busy timeout let the web and a worker share one SQLite file."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


#: Indexes the migrations make on PostgreSQL only, outside the models (pg_trgm's, for the
#: admin's search): autogenerate must not take them for strays to drop.
TRIGRAM_INDEXES = frozenset(
    {"ix_jobs_error_trgm", "ix_jobs_input_filename_trgm", "ix_attempts_message_trgm"}
)


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic's filter for autogenerate: everything but :data:`TRIGRAM_INDEXES`."""
    return not (type_ == "index" and reflected and name in TRIGRAM_INDEXES)


def make_engine(url: str, pool_size: int = 5, max_overflow: int = 10) -> Engine:
    """Create an engine for ``url``, tuned for the dialect; a PostgreSQL pool keeps
    ``pool_size`` connections, opens ``max_overflow`` more under load, and hands them out
    first come, first served (:class:`~svdfarm.fair_pool.FairQueuePool`)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(
        url, poolclass=FairQueuePool, pool_size=pool_size, max_overflow=max_overflow
    )
    event.listen(engine, "checkout", _drop_if_closed)
    event.listen(engine, "connect", _postgresql_settings)
    return engine


def _postgresql_settings(dbapi_connection: Any, _record: Any) -> None:
    """JIT off: the farm's queries read a page from an index and take a millisecond, but over
    a long history the planner's cost estimates pass JIT's threshold and compiling would cost
    tens of milliseconds a query (measured at 1,000,000 jobs: 40 ms of a 48 ms list page)."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET jit = off")
    dbapi_connection.commit()


def _drop_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Before the pool hands out a PostgreSQL connection: refuse it when the server has closed
    it (restarted, or the backend was terminated), and the pool opens new ones instead.

    This replaces SQLAlchemy's pre-ping, which costs a round trip on every checkout, with a
    look at the socket: an idle connection gets nothing from the server unless it is being
    closed (its last message, then the end of the stream), so anything to read means it is
    gone. Like the pre-ping, a failed check invalidates the whole pool: after a restart every
    pooled connection is dead. A restart in the instant after the check fails that one request
    (503), as it would with the pre-ping.
    """
    if dbapi_connection.closed or dbapi_connection.broken or _readable(dbapi_connection.fileno()):
        raise sa_exc.InvalidatePoolError("the database server closed the connection")


def _readable(fd: int) -> bool:
    """True when the socket ``fd`` has something to read (or is closed), without waiting."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # Windows: no poll()


class Database:
    """An engine and its session factory; one per process and database URL."""

    def __init__(self, url: str, *, pool_size: int = 5, max_overflow: int = 10) -> None:
        """Create the engine (lazily connecting) for ``url``, its pool ``pool_size``
        connections and ``max_overflow`` more under load (PostgreSQL)."""
        self.url = url
        self.engine = make_engine(url, pool_size, max_overflow)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        # The same pool, each statement its own transaction: no BEGIN and no ROLLBACK round
        # trips. Reads lose nothing: under READ COMMITTED each statement has its own snapshot.
        reads = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.read_sessionmaker = sessionmaker(reads, expire_on_commit=False)

    def session(self) -> Session:
        """A new session; the caller closes it."""
        return self.sessionmaker()

    def read_session(self) -> Session:
        """A new session for work that only reads: every statement commits on its own, so
        nothing written through it is atomic. The caller closes it."""
        return self.read_sessionmaker()

    @contextmanager
    def begin(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self.sessionmaker.begin() as session:
            yield session

    def dispose(self, close: bool = True) -> None:
        """Drop pooled connections; ``close=False`` in a forked child leaves the parent's alone."""
        self.engine.dispose(close=close)


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database could not be reached, not a bug in a query."""
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


def retrying(fn: Callable[[], T], *, timeout_s: float, what: str) -> T:
    """Call ``fn`` (one whole transaction) until it works while the database is unreachable.

    Waits 0.5 s, then twice as long each time up to 10 s, for at most ``timeout_s``; errors
    other than an unreachable database are raised at once, and so is the last one.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as exc:
            left = deadline - time.monotonic()
            if not is_unavailable(exc) or left <= 0:
                raise
            log.warning(
                "%s: database unavailable (%s); trying again in %.1f s",
                what,
                type(exc).__name__,
                min(delay, left),
            )
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)


_databases: dict[str, Database] = {}


def database_for(url: str) -> Database:
    """The process-wide :class:`Database` for ``url`` (created on first use)."""
    if url not in _databases:
        _databases[url] = Database(url)
    return _databases[url]


def forget_databases_after_fork() -> None:
    """In a forked worker child: never reuse the parent's pooled connections."""
    for database in _databases.values():
        database.dispose(close=False)


def alembic_config(url: str) -> Any:
    """An Alembic config for our migrations folder and ``url``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``."""
    from alembic import command

    make_engine(url).dispose()  # creates the SQLite folder when needed
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision``."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def revision_of(url: str) -> tuple[str | None, bool]:
    """The revision the database at ``url`` is at (None: no migration applied), and whether
    it is the newest one."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    return current, current == head
