"""Celery remote control: ``celery -A svdfarm inspect capabilities``.

Registered wherever the Celery app is imported, so the command line knows the command and the
worker answers it. The worker fills :data:`WORKER_INFO` when it starts.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

#: What this worker process advertises: its probe, its models and how it was started.
WORKER_INFO: dict[str, Any] = {}


@inspect_command()
def capabilities(state: Any) -> dict[str, Any]:
    """This worker's hardware probe, the models it serves (sources: Hub ids, folders, ``tiny``)
    and the queues it consumes right now."""
    consumer = getattr(state, "consumer", None)
    task_consumer = getattr(consumer, "task_consumer", None)
    queues = sorted(q.name for q in getattr(task_consumer, "queues", []) or [])
    return {
        "hostname": getattr(consumer, "hostname", None) or WORKER_INFO.get("hostname"),
        "capabilities": WORKER_INFO.get("capabilities"),
        "summary": WORKER_INFO.get("summary"),
        "models": WORKER_INFO.get("models", []),
        "queues": queues,
    }
