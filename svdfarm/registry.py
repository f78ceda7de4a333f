"""The worker registry as the web reads it: who is online, what they consume, why a job waits.

A worker is online while its heartbeats keep coming; three missed beats make it offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from svdfarm.catalog import CatalogEntry, find_entry, model_defaults
from svdfarm.models import Job, Worker, utcnow
from svdfarm.params import defaults_for, size_presets
from svdfarm.queues import parse_queue, queue_model
from svdfarm.settings import Settings
from svdfarm.states import JobState, WorkerState


def effective_state(worker: Worker, settings: Settings, now: datetime | None = None) -> WorkerState:
    """The worker's state, offline when its last heartbeat is too old."""
    now = now or utcnow()
    if now - worker.last_heartbeat > timedelta(seconds=settings.offline_after_s):
        return WorkerState.OFFLINE
    return worker.state


#: The workers whose last heartbeat is at or after ``recent``, by hostname; built once (every
#: submit reads it).
_RECENT_WORKERS = (
    select(Worker).where(Worker.last_heartbeat >= bindparam("recent")).order_by(Worker.hostname)
)


def online_workers(session: Session, settings: Settings) -> Sequence[Worker]:
    """Workers that are not offline, by hostname.

    The database leaves out every worker whose heartbeat is too old, so a table that keeps
    the rows of long-gone workers costs the status page and the submit nothing.
    """
    now = utcnow()
    recent = now - timedelta(seconds=settings.offline_after_s)
    rows = session.scalars(_RECENT_WORKERS, {"recent": recent}).all()
    return [w for w in rows if effective_state(w, settings, now) is not WorkerState.OFFLINE]


def serves(worker: Worker, model: str | None) -> bool:
    """True when ``worker`` serves ``model`` (a source); any model for ``None``, and for a
    worker that advertises no list (one started before workers advertised their models)."""
    models = (worker.capabilities or {}).get("models")
    return model is None or not isinstance(models, list) or model in models


def online_queues(
    session: Session,
    settings: Settings,
    model: str | None = None,
    *,
    online: Sequence[Worker] | None = None,
) -> set[str]:
    """Every queue at least one online worker consumes and will take new jobs from; with
    ``model``, only the queues of workers that serve it.

    A draining worker is finishing its last job: routing does not count on it. ``online``:
    the online workers when the caller has just read them; else read.
    """
    return {
        q
        for w in (online_workers(session, settings) if online is None else online)
        if w.state is not WorkerState.DRAINING and w.flagged_at is None and serves(w, model)
        for q in w.queues
    }


def waiting_reason(
    session: Session, settings: Settings, job: Job, online: Sequence[Worker] | None = None
) -> str | None:
    """Why a queued job waits, for its status page: no worker for its class, or who can take it.

    ``online``: the online workers when the caller has them (read a moment ago); else read.
    """
    if job.state is not JobState.QUEUED or not job.queue:
        return None
    if online is None:
        online = online_workers(session, settings)
    consumers = [w for w in online if job.queue in w.queues]
    if not consumers:
        try:
            wanted = parse_queue(job.queue).describe()
            model = queue_model(job.queue)
            wanted += f" that has the model {model}" if model else ""
        except ValueError:
            wanted = f"a worker on queue {job.queue}"
        return f"waiting: no worker online that can take it ({wanted} is needed)"
    busy = sum(1 for w in consumers if w.current_job_id is not None)
    # Its place in line is the dispatcher's to say (svdfarm.dispatch.place_of): priorities and
    # fair share order the queue, not the age alone.
    return f"waiting: in queue {job.queue}; {len(consumers)} worker(s) can take it, {busy} busy"


def served_models(
    session: Session, settings: Settings, *, online: Sequence[Worker] | None = None
) -> set[str]:
    """The models (sources) that online workers taking new jobs serve (``SVDFARM_WORKER_MODELS``
    or what they found on their machine; ``inspect capabilities`` shows the same).
    ``online``: the online workers when the caller has just read them; else read."""
    return {
        model
        for w in (online_workers(session, settings) if online is None else online)
        if w.state is not WorkerState.DRAINING
        for model in (w.capabilities or {}).get("models") or []
        if isinstance(model, str)
    }


def default_model(settings: Settings, served: set[str]) -> CatalogEntry:
    """The model a job without one renders: the first of the catalog a live worker serves
    (tiny on a CPU-only demo, SVD-XT on a GPU farm); with none, ``SVDFARM_MODEL``'s."""
    entries = settings.catalog
    for entry in entries:
        if entry.source in served:
            return entry
    return find_entry(entries, settings.model) or entries[0]


def models_listing(
    session: Session, settings: Settings, served: set[str] | None = None
) -> dict[str, Any]:
    """``GET /api/v1/models``: each model of the catalog with its defaults (read from its
    configs where this machine has them), its size presets, and whether a live worker serves
    it now (``served``, read from the registry when not given); and the default model's id."""
    served = served_models(session, settings) if served is None else served
    models = []
    for entry in settings.catalog:
        own = model_defaults(entry.source, settings.models_dir)
        defaults = {**defaults_for(entry.source), **own}
        defaults["sizes"] = [
            {"width": p.width, "height": p.height} for p in size_presets(entry.source)
        ]
        models.append(
            {
                "id": entry.id,
                "source": entry.source,
                "defaults": defaults,
                "available": entry.source in served,
            }
        )
    return {"models": models, "default": default_model(settings, served).id}
