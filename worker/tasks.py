"""The worker's Celery task and process hooks: the render task, the worker registry row with
its heartbeats, and what ``inspect capabilities`` answers.

Heavy imports (torch, diffusers) happen inside the task, so the worker's parent process stays
light and never initialises CUDA before it forks its pool.

A render's message is acknowledged as soon as its pool process starts it (just before the
claim), not after the render: a broker's consumer timeout (RabbitMQ's ``consumer_timeout``,
30 minutes by default) or visibility timeout (Redis) then never cuts a long render short. The
database is the record from there on: a worker that dies is found by its heartbeats and the
reaper queues its job again with a new message; a stopping worker hands its job back and
publishes it. So that no second message waits unacknowledged behind a long render (prefetch
would reserve one once the first is acknowledged), the worker stops consuming while it renders
(:class:`_Intake`) and starts again when the render ends. See docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

from celery import Task, shared_task
from celery.signals import (
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from celery.worker.request import Request

from svdfarm.catalog import advertised_models
from svdfarm.celery_app import RENDER_TASK, is_direct_queue, settings_of
from svdfarm.control import WORKER_INFO
from svdfarm.db import database_for, forget_databases_after_fork, is_unavailable
from svdfarm.models import Worker, utcnow
from svdfarm.settings import Settings
from svdfarm.states import Actor, WorkerState

log = logging.getLogger(__name__)

#: Set by ``svdfarm worker`` so the worker advertises the probe it was routed by.
CAPABILITIES_ENV = "SVDFARM_WORKER_CAPABILITIES"
#: Seconds a cold shutdown may take before the worker exits regardless (see _exit_after).
COLD_EXIT_S = 10.0


#: Seconds between two looks of the worker's event loop at whether it renders (see _Intake).
INTAKE_TICK_S = 0.25
#: Task events sent once a render has ended, however it ended.
_ENDED_EVENTS = frozenset({"task-succeeded", "task-failed", "task-retried", "task-revoked"})


class RenderRequest(Request):  # type: ignore[misc]
    """A render's delivery, as the worker's main process handles it (see the module doc)."""

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        """The pool process started the render: stop consuming, then acknowledge."""
        _intake.pause()
        super().on_accepted(pid, time_accepted)

    def revoked(self) -> bool:
        """Also True (the message given back to the broker) when another render is running
        here: a delivery that reached this worker while it consumed mid-render (after a
        reconnection, an ``add_consumer``) would otherwise wait behind it unacknowledged."""
        if super().revoked():
            return True
        return _intake.bounce(self)

    def send_event(self, type: str, **fields: Any) -> None:
        """Send the task event; once the render has ended, consume again at once (the tick
        would within ``INTAKE_TICK_S``; Celery sends these after its bookkeeping of the end)."""
        super().send_event(type, **fields)
        if type in _ENDED_EVENTS:
            _intake.tick()


@shared_task(
    name=RENDER_TASK,
    bind=True,
    acks_late=False,
    reject_on_worker_lost=False,
    Request="worker.tasks:RenderRequest",
)
def render(self: Task, job_id: str) -> str:
    """Render the job with this id; the database says what to do and records what happened.

    A delivery of a job that a live worker renders (a duplicate message) is dropped: if that
    worker is lost, the reaper queues the job again with a new message.
    """
    from worker.execute import run_job

    settings = settings_of(self.app)
    hostname = self.request.hostname or socket.gethostname()
    db = database_for(settings.database_url)
    outcome = run_job(db, settings, job_id, hostname)
    # This worker is free again: the next job in dispatch order comes to it (or another).
    _dispatch_now(db, self.app, settings, hostname)
    return outcome.value


def _dispatch_now(db: Any, app: Any, settings: Settings, hostname: str) -> None:
    """A dispatch pass over every queue with waiting jobs; a failure is logged (the next
    periodic pass, by any worker, sends the jobs)."""
    from svdfarm.dispatch import dispatch
    from svdfarm.lifecycle import By

    try:
        with db.session() as session:
            dispatch(session, app, settings, by=By(Actor.WORKER, hostname))
    except Exception:
        log.exception("dispatch pass failed")


def _rendering() -> bool:
    """True while a render runs in this worker's pool (Celery's bookkeeping, main process)."""
    return _active_job_id() is not None


def _flagged() -> bool:
    """True while this worker is flagged (svdfarm.worker_health): its heartbeat read the
    flag on its row; it must not consume until an operator clears it."""
    return _registry.flagged


def _stopping() -> bool:
    """True once the worker is shutting down (it must not consume again)."""
    from celery.worker import state as worker_state

    return bool(_registry.draining or worker_state.should_stop or worker_state.should_terminate)


class _Intake:
    """Whether this worker takes messages: not while it renders.

    Every method runs in the worker's event loop (the main process's only thread that may use
    the broker connection): :meth:`pause` when a render starts, :meth:`bounce` for a delivery
    that arrives while one runs, :meth:`tick` every ``INTAKE_TICK_S`` to consume again once the
    render has ended (and to stop consuming again after the consumer reconnected mid-render).
    """

    def __init__(self) -> None:
        """Not attached to a consumer yet."""
        self.consumer: Any = None
        self.paused = False

    def attach(self, consumer: Any) -> None:
        """Follow ``consumer`` (the worker is ready) and start looking every tick."""
        self.consumer = consumer
        timer = getattr(consumer, "timer", None)
        if timer is not None:
            timer.call_repeatedly(INTAKE_TICK_S, self.tick)

    def _task_consumer(self) -> Any:
        """The kombu consumer of the farm's queues now (replaced after each reconnection)."""
        return getattr(self.consumer, "task_consumer", None)

    def _consuming(self) -> bool:
        """True when the task consumer holds a subscription on the broker."""
        return bool(getattr(self._task_consumer(), "_active_tags", None))

    def pause(self) -> None:
        """Cancel every subscription of the task consumer (the queues stay its own)."""
        task_consumer = self._task_consumer()
        if task_consumer is None:
            return
        try:
            task_consumer.cancel()
        except Exception:  # a broken connection: the consumer reconnects, and tick looks again
            log.warning("could not stop consuming while rendering", exc_info=True)
        self.paused = True

    def bounce(self, request: Any) -> bool:
        """Give ``request``'s message back to the broker when another render is running here
        (True), so another worker takes it; False when this worker is free to run it."""
        from celery.worker import state as worker_state

        running = [r for r in list(worker_state.active_requests) if r.id != request.id]
        if not any(r.name == RENDER_TASK for r in running):
            return False
        self.pause()
        log.info("job %s arrived while another renders here: given back to the queue", request.id)
        request.reject(requeue=True)
        worker_state.task_ready(request)
        return True

    def tick(self) -> None:
        """Consume again once nothing renders; stop again if a reconnection resumed it.

        A flagged worker (see :func:`_flagged`) stays paused, as while it renders, until its
        flag is cleared.
        """
        try:
            if _rendering() or _flagged():
                if self._consuming():
                    self.pause()
                return
            if self.paused and not _stopping():
                task_consumer = self._task_consumer()
                if task_consumer is not None:
                    task_consumer.consume()
                    self.paused = False
        except Exception:  # the next tick tries again
            log.warning("could not change whether the worker consumes", exc_info=True)


_intake = _Intake()


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """A forked pool process must not share the parent's database connections."""
    forget_databases_after_fork()


def _capabilities() -> dict[str, Any]:
    """The probe this worker advertises: handed over by ``svdfarm worker``, else taken now."""
    given = os.environ.get(CAPABILITIES_ENV)
    if given:
        data: dict[str, Any] = json.loads(given)
        return data
    from worker.probe import probe_in_subprocess

    return probe_in_subprocess()


def _active_job_id() -> uuid.UUID | None:
    """The id of the render this worker process is running, if any (task id = job id)."""
    from celery.worker import state as worker_state

    for request in list(worker_state.active_requests):
        if request.name == RENDER_TASK:
            try:
                return uuid.UUID(request.id)
            except ValueError:
                continue
    return None


class _Registry:
    """This worker's row: written at start, refreshed by heartbeats, offline at the end."""

    def __init__(self) -> None:
        """Nothing registered yet."""
        self.consumer: Any = None
        self.settings: Settings | None = None
        self.hostname = ""
        self.draining = False
        self.stop = threading.Event()
        self.beating_since: float | None = None
        self.reaper_celery: Any = None
        self.publish_celery: Any = None
        self.stop_timer = False
        self.hand_back_reason = ""
        #: Whether the row is flagged (svdfarm.worker_health), as the last heartbeat read it.
        self.flagged = False

    def queues(self) -> list[str]:
        """The farm's queues this worker consumes right now (add/cancel_consumer change
        them); its own queue (``worker_direct``) is left out: it serves only this worker."""
        task_consumer = getattr(self.consumer, "task_consumer", None)
        names = (q.name for q in getattr(task_consumer, "queues", []) or [])
        return sorted(name for name in names if not is_direct_queue(name))

    def start(self, consumer: Any) -> None:
        """Register the worker and start beating."""
        self.consumer, self.hostname = consumer, consumer.hostname
        self.settings = settings_of(consumer.app)
        capabilities = _capabilities()
        from worker.probe import Capabilities

        summary = Capabilities.from_dict(capabilities).summary()
        models = advertised_models(
            self.settings.catalog,
            self.settings.worker_models,
            self.settings.model,
            self.settings.models_dir,
        )
        WORKER_INFO.update(
            hostname=self.hostname, capabilities=capabilities, summary=summary, models=models
        )
        # The models ride beside the probe in the row's JSON: the web reads which it serves.
        capabilities = {**capabilities, "models": models}
        now = utcnow()
        with database_for(self.settings.database_url).begin() as session:
            row = session.get(Worker, self.hostname)
            if row is None:
                row = Worker(hostname=self.hostname)
                session.add(row)
            row.capabilities = capabilities
            row.queues = self.queues()
            # A flag outlives a restart: it is cleared by an operator, not by the worker.
            self.flagged = row.flagged_at is not None
            row.state = WorkerState.DRAINING if self.flagged else WorkerState.IDLE
            row.started_at = row.last_heartbeat = now
            row.current_job_id = None
            row.loaded_model = None  # a new render process holds no model yet
        log.info("worker %s registered; queues: %s", self.hostname, ", ".join(self.queues()))
        if self.flagged:
            log.error(
                "worker %s is flagged: it takes no job until an operator clears it "
                "(admin workers page, or svdfarm workers clear)",
                self.hostname,
            )
        self.beating_since = time.monotonic()
        threading.Thread(target=self._beat, name="svdfarm-heartbeat", daemon=True).start()
        if self.settings.reap_interval_s:
            threading.Thread(target=self._reaper, name="svdfarm-reaper", daemon=True).start()
        threading.Thread(target=self._dispatcher, name="svdfarm-dispatch", daemon=True).start()
        threading.Thread(target=self._webhooks, name="svdfarm-webhooks", daemon=True).start()

    def _dispatcher(self) -> None:
        """A dispatch pass now (this worker is new and idle), then every
        ``DISPATCH_INTERVAL_S``: jobs waiting in the database reach idle workers even when
        nobody submits or finishes (after a cancel, a priority change, a worker's start)."""
        from svdfarm.dispatch import DISPATCH_INTERVAL_S

        assert self.settings is not None
        if self.publish_celery is None:
            from svdfarm.celery_app import create_celery

            self.publish_celery = create_celery(self.settings)
        db = database_for(self.settings.database_url)
        wait = 0.0
        while not self.stop.wait(wait):
            wait = DISPATCH_INTERVAL_S
            if not self.draining:
                _dispatch_now(db, self.publish_celery, self.settings, self.hostname)

    def _webhooks(self) -> None:
        """Every ``SEND_INTERVAL_S``, a pass of the webhook sender (svdfarm.webhook_sender):
        the due deliveries, sent from this thread only, never from a web request. A failed
        pass is logged and tried again next time."""
        from svdfarm.webhook_sender import SEND_INTERVAL_S, send_due

        assert self.settings is not None
        db = database_for(self.settings.database_url)
        while not self.stop.wait(SEND_INTERVAL_S):
            try:
                send_due(db, self.settings)
            except Exception as exc:
                if is_unavailable(exc):
                    log.warning("webhooks: database unavailable (%s)", type(exc).__name__)
                else:
                    log.exception("webhook pass failed")

    def _beat(self) -> None:
        """Every heartbeat interval: the time, the queues, and draining once stopping.

        It also reads the row's flag (svdfarm.worker_health): while set, the worker shows as
        draining and its intake stays paused (:meth:`_Intake.tick`); once an operator clears
        it, the next beat lets it consume again. Nothing else runs in this thread, so a slow
        broker or reaper never delays a beat.
        """
        assert self.settings is not None
        while not self.stop.wait(self.settings.heartbeat_interval_s):
            try:
                with database_for(self.settings.database_url).begin() as session:
                    row = session.get(Worker, self.hostname)
                    if row is None:
                        continue
                    row.last_heartbeat = utcnow()
                    row.queues = self.queues()
                    # The job this worker really runs now, from Celery's own bookkeeping in
                    # this (main) process: if the pool process rendering it dies, the job is
                    # released here, and its redelivery can be claimed elsewhere.
                    active = _active_job_id()
                    row.current_job_id = active
                    self._follow_flag(row.flagged_at is not None)
                    if self.draining or self.flagged:
                        row.state = WorkerState.DRAINING
                    else:
                        row.state = WorkerState.BUSY if active else WorkerState.IDLE
            except Exception as exc:  # a database hiccup must not kill the heartbeat
                self.beating_since = None
                if is_unavailable(exc):
                    log.warning(
                        "heartbeat not written: database unavailable (%s)", type(exc).__name__
                    )
                else:
                    log.exception("heartbeat failed")
                continue
            if self.beating_since is None:
                self.beating_since = time.monotonic()

    def _follow_flag(self, flagged: bool) -> None:
        """Note whether the row is flagged now, saying so when that changes (the intake's
        next tick pauses or resumes consuming)."""
        if flagged and not self.flagged:
            log.error(
                "worker %s was flagged: it takes no job until an operator clears it", self.hostname
            )
        elif self.flagged and not flagged:
            log.warning("worker %s: its flag was cleared, it takes jobs again", self.hostname)
        self.flagged = flagged

    def _reaper(self) -> None:
        """Every reap interval, a pass of the reaper (jobs of lost workers, messages the broker
        lost), once this worker's heartbeats have gone through for ``offline_after_s``: after
        the database was unreachable every worker's heartbeat is old, and each must get the
        time to beat again before anyone is judged lost (this one included)."""
        assert self.settings is not None
        wait = min(self.settings.reap_interval_s, 5.0)
        while not self.stop.wait(wait):
            wait = self.settings.reap_interval_s
            since = self.beating_since
            if since is None or time.monotonic() - since < self.settings.offline_after_s:
                continue
            self._reap()

    def _reap(self) -> None:
        """One pass of the reaper; a failure is logged and tried again next time."""
        assert self.settings is not None
        from svdfarm.reaper import reap

        if self.reaper_celery is None:
            # Its own app and connections: publishing through the worker's app from this
            # thread would share connections with the consumer's event loop.
            from svdfarm.celery_app import create_celery

            self.reaper_celery = create_celery(self.settings)
        try:
            reaped = reap(
                database_for(self.settings.database_url),
                self.settings,
                self.reaper_celery,
                name=self.hostname,
            )
        except Exception:
            log.exception("reaper pass failed")
            return
        if reaped:
            log.warning("reaper: %s", reaped)

    def set_state(self, state: WorkerState) -> None:
        """Write a new state now (draining, offline)."""
        if self.settings is None:
            return
        with database_for(self.settings.database_url).begin() as session:
            row = session.get(Worker, self.hostname)
            if row is not None:
                row.state = state
                row.last_heartbeat = utcnow()
                if state is WorkerState.OFFLINE:
                    row.current_job_id = None


_registry = _Registry()


@worker_ready.connect
def _register(sender: Any = None, **_: Any) -> None:
    """Record the worker, its probe and queues once it is ready, and start heartbeats."""
    try:
        _intake.attach(sender)
    except Exception:
        log.exception("could not follow the worker's consumer")
    try:
        _registry.start(sender)
    except Exception:  # the registry must never stop a worker from working
        log.exception("could not register the worker in the database")


@worker_shutting_down.connect
def _draining(how: str = "Warm", **_: Any) -> None:
    """Stopping: a warm stop (SIGTERM, a first Ctrl-C, ``control shutdown``) takes no new job
    and lets the running one finish; a cold stop (SIGQUIT, a second Ctrl-C) hands it back now.

    After ``SVDFARM_STOP_TIMEOUT`` seconds of a warm stop, a job still running is handed back
    to the queue and published again (its first message was acknowledged when it started):
    the worker sends itself SIGQUIT, Celery's cold shutdown, which cancels the render.
    """
    _registry.draining = True
    try:
        _registry.set_state(WorkerState.DRAINING)
    except Exception:
        log.exception("could not mark the worker draining")
    if _registry.settings is None:
        return
    if how == "Cold":
        # Celery has already cancelled the running task; the database says which job it was.
        reason = _registry.hand_back_reason or "was told to stop at once (SIGQUIT, or Ctrl-C twice)"
        try:
            _hand_back_running(reason)
        except Exception:  # the reaper requeues it once this worker's heartbeats stop
            log.exception("could not hand the running job back")
        threading.Thread(
            target=_exit_after, args=(COLD_EXIT_S,), name="svdfarm-exit", daemon=True
        ).start()
    elif how == "Warm" and not _registry.stop_timer:
        _registry.stop_timer = True  # a second SIGTERM or Ctrl-C starts no second timer
        timeout = _registry.settings.stop_timeout_s
        threading.Thread(
            target=_hand_back_after, args=(timeout,), name="svdfarm-stop", daemon=True
        ).start()


def _hand_back_after(timeout_s: float) -> None:
    """If the worker has not stopped within ``timeout_s``, cancel its job back to the queue."""
    if _registry.stop.wait(timeout_s):
        return
    job_id = _active_job_id()
    if job_id is None:
        return
    log.warning("stop timeout of %s s passed: handing the running job back", timeout_s)
    _registry.hand_back_reason = f"was stopped and its stop timeout of {timeout_s:g} s passed"
    try:
        _hand_back(job_id, _registry.hand_back_reason)
    except Exception:  # the cold shutdown tries again
        log.exception("could not record the hand-back of job %s", job_id)
    os.kill(os.getpid(), signal.SIGQUIT)


def _exit_after(timeout_s: float) -> None:
    """Exit ``timeout_s`` seconds into a cold shutdown if the worker is still here.

    The pool process Celery kills in a cold shutdown can die holding the lock of billiard's
    result queue; the pool's finaliser then waits for that lock forever, at exit. The job
    is already back in the queue and its message restored by then.
    """
    time.sleep(timeout_s)
    log.warning("still stopping %g s into the cold shutdown: exiting now", timeout_s)
    from billiard.process import active_children

    for child in active_children():  # pool processes, which would outlive this one
        if child.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGKILL)
    _registry.stop.set()
    try:
        _registry.set_state(WorkerState.OFFLINE)
    except Exception:
        log.exception("could not mark the worker offline")
    logging.shutdown()
    os._exit(1)


def _hand_back_running(reason: str) -> None:
    """Hand back every job the database says this worker is rendering."""
    from svdfarm.deliveries import jobs_running_on

    assert _registry.settings is not None
    with database_for(_registry.settings.database_url).session() as session:
        job_ids = jobs_running_on(session, _registry.hostname)
    for job_id in job_ids:
        if _hand_back(job_id, reason):
            log.warning("job %s handed back to the queue: this worker %s", job_id, reason)


def _hand_back(job_id: uuid.UUID, reason: str) -> bool:
    """Record that this worker gives the job back (not lost: stopped) and queue it again in
    the database, where the dispatcher finds it; False when the job was no longer running."""
    from svdfarm import lifecycle

    assert _registry.settings is not None
    message = f"The worker {_registry.hostname} {reason}: the job was handed back to the queue."
    by = lifecycle.By(Actor.WORKER, _registry.hostname)
    with database_for(_registry.settings.database_url).begin() as session:
        if not lifecycle.hand_back(session, job_id, by=by, message=message):
            return False
    # Another worker's dispatch pass sends it on (this one is draining: never to it).
    return True


@worker_shutdown.connect
def _unregister(**_: Any) -> None:
    """Mark the worker offline when it stops."""
    _registry.stop.set()
    try:
        _registry.set_state(WorkerState.OFFLINE)
    except Exception:
        log.exception("could not mark the worker offline")
