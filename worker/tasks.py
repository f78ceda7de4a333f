"""The worker's Celery task and process hooks. Heavy imports (torch, diffusers) happen inside
the task, so the worker's parent process stays light and forks cleanly.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from svdfarm.celery_app import RENDER_TASK, settings_of
from svdfarm.db import database_for, forget_databases_after_fork
from svdfarm.models import Worker, utcnow
from svdfarm.states import WorkerState

log = logging.getLogger(__name__)


@shared_task(name=RENDER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def render(self: Task, job_id: str) -> str:
    """Render the job with this id; the database says what to do and records what happened."""
    from worker.execute import run_job

    settings = settings_of(self.app)
    hostname = self.request.hostname or socket.gethostname()
    return run_job(database_for(settings.database_url), settings, job_id, hostname)


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """A forked pool process must not share the parent's database connections."""
    forget_databases_after_fork()


def _set_worker_row(sender: Any, state: WorkerState) -> None:
    """Insert or update this worker's row in the registry."""
    app = getattr(sender, "app", None)
    hostname = getattr(sender, "hostname", None)
    if app is None or hostname is None:
        return
    settings = settings_of(app)
    queues = sorted(q.name for q in app.amqp.queues.consume_from.values())
    now = utcnow()
    with database_for(settings.database_url).begin() as session:
        row = session.get(Worker, hostname)
        if row is None:
            row = Worker(hostname=hostname, started_at=now)
            session.add(row)
        elif state is WorkerState.IDLE:
            row.started_at = now
        row.queues = queues
        row.state = state
        row.last_heartbeat = now
        row.current_job_id = None


@worker_ready.connect
def _register(sender: Any = None, **_: Any) -> None:
    """Record the worker as idle and listening once it is ready."""
    try:
        _set_worker_row(sender, WorkerState.IDLE)
    except Exception:  # the registry must never stop a worker from working
        log.exception("could not register the worker in the database")


@worker_shutdown.connect
def _unregister(sender: Any = None, **_: Any) -> None:
    """Mark the worker offline when it stops."""
    try:
        _set_worker_row(sender, WorkerState.OFFLINE)
    except Exception:
        log.exception("could not mark the worker offline")
