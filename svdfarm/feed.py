"""The live feed: jobs' events and progress as they happen, fanned out to many watchers.

Writers do nothing of their own. On PostgreSQL, triggers (migration ``f0a5b7c9d145``) send a
NOTIFY on the channel :data:`CHANNEL` when a job event is inserted (payload
``e:<event id>@<schema>``) and when a job's phase, step or preview changes
(``p:<job id>@<schema>``); PostgreSQL delivers them at commit, in commit order, so a job's
events arrive in the order they were written. The listener ignores other schemas' (the
channel is the whole database's).

Each process that serves watchers runs one :class:`Feed`: one thread (a greenlet under
gevent) holding one ``LISTEN`` connection. For each batch of notifications it reads what
changed once, with one or two queries whatever the number of watchers, and puts a
:class:`Message` on the queue of every :class:`Watch` that wants it (a job's watchers, or an
owner's). SQLite has no NOTIFY: there the feed reads the new events every
:data:`POLL_S` seconds (again one query per process, not one per watcher), and the progress
of the jobs being watched. Where notifications may have been lost (the listener reconnected),
the feed reads the events written since the last one it saw.

A watcher that falls :data:`QUEUE_LIMIT` messages behind is dropped (:attr:`Watch.overflowed`):
its stream ends and the client resumes from its last event id.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from svdfarm.db import Database
from svdfarm.models import Job, JobEvent
from svdfarm.states import JobState

log = logging.getLogger(__name__)

#: The PostgreSQL channel the triggers notify.
CHANNEL = "svdfarm_feed"
#: Seconds between reads of new events on SQLite (no NOTIFY there).
POLL_S = 0.5
#: Seconds the PostgreSQL listener waits for a notification before it looks again (and
#: notices that it was stopped).
LISTEN_WAIT_S = 1.0
#: Messages a watcher may fall behind before it is dropped.
QUEUE_LIMIT = 1000
#: Seconds a new watch waits for a starting listener, so that nothing written after the
#: watcher's replay is missed (the listener's first read starts from the newest event).
READY_WAIT_S = 5.0
#: Events read at most per catch-up query.
CATCH_UP_LIMIT = 1000
#: The job states in which progress moves.
MOVING = (JobState.RUNNING, JobState.CANCEL_REQUESTED)


class MessageKind(Enum):
    """What a :class:`Message` carries."""

    EVENT = "event"  # one row of job_events: it has an id, a client can resume after it
    PROGRESS = "progress"  # the job's phase, step and preview now: no id, the next replaces it


@dataclass(frozen=True)
class Message:
    """One thing to tell a job's watchers: an event (with its id) or the job's progress."""

    kind: MessageKind
    job_id: uuid.UUID
    owner: str
    data: dict[str, Any]
    event_id: int | None = None
    #: True for the event that ends a life of the job (succeeded, failed, canceled).
    terminal: bool = False
    #: The message as the web sends it, once made (by the first watcher that sends it).
    encoded: list[str] = field(default_factory=list, compare=False, repr=False)


#: Turns a job (and the event, for an event message) into a message's data, once per process.
Describe = Callable[[Job, JobEvent | None], dict[str, Any]]


class Watch:
    """One watcher's subscription: one job's messages, or every job of some owners'."""

    def __init__(
        self,
        feed: Feed,
        *,
        job_id: uuid.UUID | None = None,
        owners: frozenset[str] = frozenset(),
    ) -> None:
        """Watch ``job_id``, or the jobs of ``owners`` when no job is named."""
        self.feed, self.job_id, self.owners = feed, job_id, owners
        self.queue: queue.Queue[Message] = queue.Queue(maxsize=QUEUE_LIMIT)
        self.overflowed = False

    def wants(self, message: Message) -> bool:
        """True when this watcher follows the message's job."""
        if self.job_id is not None:
            return message.job_id == self.job_id
        return message.owner in self.owners

    def offer(self, message: Message) -> None:
        """Queue ``message``; a watcher too far behind is marked overflowed instead."""
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(message)
        except queue.Full:
            self.overflowed = True

    def get(self, timeout_s: float) -> Message | None:
        """The next message, or None after ``timeout_s`` without one."""
        try:
            return self.queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop watching."""
        self.feed.unwatch(self)

    def __enter__(self) -> Watch:
        """The watch itself; closed on leaving the block."""
        return self

    def __exit__(self, *_exc: object) -> None:
        """Stop watching."""
        self.close()


@dataclass
class _Watchers:
    """The watches of one process, by job and by owner."""

    by_job: dict[uuid.UUID, set[Watch]] = field(default_factory=lambda: defaultdict(set))
    by_owner: dict[str, set[Watch]] = field(default_factory=lambda: defaultdict(set))

    def add(self, watch: Watch) -> None:
        """Index ``watch``."""
        if watch.job_id is not None:
            self.by_job[watch.job_id].add(watch)
        for owner in watch.owners:
            self.by_owner[owner].add(watch)

    def remove(self, watch: Watch) -> None:
        """Forget ``watch``."""
        if watch.job_id is not None:
            self._discard(self.by_job, watch.job_id, watch)
        for owner in watch.owners:
            self._discard(self.by_owner, owner, watch)

    @staticmethod
    def _discard(index: dict[Any, set[Watch]], key: Any, watch: Watch) -> None:
        """Remove ``watch`` from ``index[key]``, and the key once empty."""
        found = index.get(key)
        if found is not None:
            found.discard(watch)
            if not found:
                del index[key]

    def of(self, message: Message) -> list[Watch]:
        """The watches that want ``message``."""
        return [*self.by_job.get(message.job_id, ()), *self.by_owner.get(message.owner, ())]

    def __bool__(self) -> bool:
        """True while anyone watches."""
        return bool(self.by_job or self.by_owner)


def listen_conninfo(url: str) -> str | None:
    """The libpq connection string of a PostgreSQL SQLAlchemy URL, None for other databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def parse_payload(payload: str, schema: str) -> tuple[MessageKind, int | uuid.UUID] | None:
    """A notification's payload as (kind, event id or job id); None when malformed or from
    another schema than ``schema``."""
    kind, _, rest = payload.partition(":")
    value, _, of = rest.partition("@")
    if of != schema:
        return None
    try:
        if kind == "e":
            return MessageKind.EVENT, int(value)
        if kind == "p":
            return MessageKind.PROGRESS, uuid.UUID(value)
    except ValueError:
        pass
    return None


def progress_signature(job: Job) -> tuple[Any, ...]:
    """What a progress message shows of ``job``: a message is sent only when it changes."""
    return (job.state, job.phase, job.step, job.preview_key)


class Feed:
    """A process's live feed: one listener, any number of :class:`Watch` es."""

    def __init__(self, url: str, *, describe: Describe) -> None:
        """Feed from the database at ``url``; ``describe`` makes each message's data (once
        per message). The listener reads through an engine of its own: it never waits for a
        connection behind the requests of its process (which may be waiting for it)."""
        self.url, self.describe = url, describe
        self.conninfo = listen_conninfo(url)
        self._db: Database | None = None
        self._lock = threading.Lock()
        self._watchers = _Watchers()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_event_id: int | None = None
        self._shown: dict[uuid.UUID, tuple[Any, ...]] = {}
        #: Set once the listener is listening (tests wait for it before they write).
        self.ready = threading.Event()

    # -- watchers -----------------------------------------------------------------------------

    def watch(self, *, job_id: uuid.UUID | None = None, owners: Iterable[str] = ()) -> Watch:
        """Start watching a job (``job_id``) or an owner's jobs (``owners``); starts the
        listener on first use, and waits (up to :data:`READY_WAIT_S`) until it listens, so
        whatever the caller reads after this is either in its read or comes to the watch.
        Close the watch (or use it as a context manager) when done."""
        watch = Watch(self, job_id=job_id, owners=frozenset(owners))
        with self._lock:
            self._watchers.add(watch)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="svdfarm-feed", daemon=True)
                self._thread.start()
        if not self.ready.wait(READY_WAIT_S):
            log.warning("live feed: the listener is not ready; live events may be late")
        return watch

    def unwatch(self, watch: Watch) -> None:
        """Stop delivering to ``watch``."""
        with self._lock:
            self._watchers.remove(watch)

    def watching(self) -> int:
        """How many watches are open (each counted once)."""
        with self._lock:
            found = {w for ws in self._watchers.by_job.values() for w in ws}
            found.update(w for ws in self._watchers.by_owner.values() for w in ws)
        return len(found)

    def stop(self, timeout_s: float = 2 * LISTEN_WAIT_S) -> None:
        """Stop the listener and wait (up to ``timeout_s``) until it has closed its
        connections: call it before the database is disposed of."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        if self._db is not None:
            self._db.dispose()
            self._db = None

    def _deliver(self, messages: Iterable[Message]) -> None:
        """Hand each message to the watches that want it."""
        with self._lock:
            for message in messages:
                for watch in self._watchers.of(message):
                    watch.offer(message)

    def _watched(self) -> tuple[set[uuid.UUID], set[str]]:
        """The jobs and the owners watched now."""
        with self._lock:
            return set(self._watchers.by_job), set(self._watchers.by_owner)

    # -- reading what changed -----------------------------------------------------------------

    def _event_messages(self, rows: Iterable[tuple[JobEvent, Job]]) -> list[Message]:
        """Messages for events read with their jobs, in id order."""
        messages = []
        for event, job in rows:
            if self._last_event_id is None or event.id > self._last_event_id:
                self._last_event_id = event.id
            messages.append(
                Message(
                    MessageKind.EVENT,
                    job.id,
                    job.owner,
                    self.describe(job, event),
                    event_id=event.id,
                    terminal=event.type.terminal,
                )
            )
        return messages

    def events_by_id(self, session: Session, ids: Iterable[int]) -> list[Message]:
        """The messages of the events ``ids`` (those still there), in id order."""
        wanted = sorted(set(ids))
        if not wanted:
            return []
        rows = session.execute(
            select(JobEvent, Job)
            .join(Job, Job.id == JobEvent.job_id)
            .where(JobEvent.id.in_(wanted))
            .order_by(JobEvent.id)
        ).all()
        return self._event_messages(rows)

    def events_since(self, session: Session) -> list[Message]:
        """The messages of the events written after the last one this feed saw."""
        if self._last_event_id is None:
            self._last_event_id = session.scalar(select(func.max(JobEvent.id))) or 0
            return []
        rows = session.execute(
            select(JobEvent, Job)
            .join(Job, Job.id == JobEvent.job_id)
            .where(JobEvent.id > self._last_event_id)
            .order_by(JobEvent.id)
            .limit(CATCH_UP_LIMIT)
        ).all()
        return self._event_messages(rows)

    def progress_of(self, session: Session, jobs: Iterable[Job]) -> list[Message]:
        """Progress messages for those of ``jobs`` whose progress changed since the last one."""
        messages = []
        for job in jobs:
            signature = progress_signature(job)
            if self._shown.get(job.id) == signature:
                continue
            self._shown[job.id] = signature
            messages.append(
                Message(MessageKind.PROGRESS, job.id, job.owner, self.describe(job, None))
            )
        if len(self._shown) > 10 * QUEUE_LIMIT:  # jobs long finished: forget them
            self._shown.clear()
        return messages

    def progress_by_id(self, session: Session, job_ids: Iterable[uuid.UUID]) -> list[Message]:
        """Progress messages for the jobs ``job_ids`` that are watched and still moving."""
        jobs, owners = self._watched()
        wanted = set(job_ids)
        if not wanted or not (jobs or owners):
            return []
        rows = session.scalars(select(Job).where(Job.id.in_(sorted(wanted)))).all()
        return self.progress_of(session, [j for j in rows if j.id in jobs or j.owner in owners])

    def progress_of_watched(self, session: Session) -> list[Message]:
        """Progress messages for every watched job that is moving (SQLite's poll)."""
        jobs, owners = self._watched()
        found: list[Job] = []
        if jobs:
            found += session.scalars(
                select(Job).where(Job.id.in_(sorted(jobs)), Job.state.in_(MOVING))
            ).all()
        if owners:
            found += session.scalars(
                select(Job).where(Job.owner.in_(sorted(owners)), Job.state.in_(MOVING))
            ).all()
        return self.progress_of(session, {j.id: j for j in found}.values())

    # -- the listener -------------------------------------------------------------------------

    def _run(self) -> None:
        """The listener thread: until stopped, listen (PostgreSQL) or poll (SQLite)."""
        while not self._stop.is_set():
            try:
                if self.conninfo is None:
                    self._poll()
                else:
                    self._listen(self.conninfo)
            except Exception:
                log.warning("live feed: listener failed; again in 1 s", exc_info=True)
                self.ready.clear()
                self._stop.wait(1.0)

    def _read(self, read: Callable[[Session], list[Message]]) -> None:
        """Run ``read`` in a short session and deliver what it found."""
        if self._db is None:
            self._db = Database(self.url)
        with self._db.read_session() as session:
            messages = read(session)
        self._deliver(messages)

    def _poll(self) -> None:
        """SQLite: read new events and the watched jobs' progress every :data:`POLL_S`."""
        self._read(self.events_since)
        self.ready.set()
        while not self._stop.wait(POLL_S):
            if not self._watchers:
                self._read(self.events_since)  # keep the last id current, cheaply
                continue
            self._read(lambda s: self.events_since(s) + self.progress_of_watched(s))

    def _listen(self, conninfo: str) -> None:
        """PostgreSQL: LISTEN, then read what each batch of notifications names."""
        import psycopg

        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            schema = conn.execute("SELECT current_schema()").fetchone()[0]  # type: ignore[index]
            # What was written while nobody listened (first start: only the last id).
            self._read(self.events_since)
            self.ready.set()
            while not self._stop.is_set():
                events: set[int] = set()
                progress: set[uuid.UUID] = set()
                for note in conn.notifies(timeout=LISTEN_WAIT_S, stop_after=1):
                    parsed = parse_payload(note.payload, schema)
                    if parsed is None:
                        continue
                    kind, value = parsed
                    if kind is MessageKind.EVENT:
                        events.add(int(value))  # type: ignore[arg-type]
                    else:
                        progress.add(value)  # type: ignore[arg-type]
                if not (events or progress):
                    continue
                if not self._watchers:
                    if events:
                        self._last_event_id = max(max(events), self._last_event_id or 0)
                    continue
                self._read(partial(self._batch, events, progress))

    def _batch(self, events: set[int], progress: set[uuid.UUID], session: Session) -> list[Message]:
        """The messages of one batch of notifications: its events, then its progress."""
        return self.events_by_id(session, events) + self.progress_by_id(session, progress)
