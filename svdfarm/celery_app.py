"""The Celery app: transport only. Jobs travel as ids; their truth lives in the database.

``celery -A svdfarm worker|inspect|control`` finds :data:`app` here. The web side sends
tasks by name and never imports the worker's code.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import celeryd_init

from svdfarm.settings import Settings, load_settings

RENDER_TASK = "svdfarm.render"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Lower-case Celery settings for long GPU jobs (see the design notes)."""
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # A killed worker's job goes back to the queue; the task itself is idempotent.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A broker hiccup must not cancel a render in progress (Celery 6's coming default):
        # the claim token already makes a redelivered job harmless.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_concurrency": 1,
        "task_default_queue": "svd.default",
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "enable_utc": True,
        "timezone": "UTC",
    }
    if settings.embedded_broker:
        queue_dir = str(settings.broker_dir / "queue")
        config["broker_transport_options"] = {
            "data_folder_in": queue_dir,
            "data_folder_out": queue_dir,
            "processed_folder": str(settings.broker_dir / "processed"),
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        # Longer than the longest job (the hard time limit) plus an hour: a shorter one makes
        # Redis hand a job that is still rendering to a second worker (celery#3541, #5935).
        # A worker killed mid-job is not left to this timeout: the reaper (svdfarm.reaper)
        # requeues its job once its heartbeats stop. See docs/RELIABILITY.md.
        config["broker_transport_options"] = {
            "visibility_timeout": visibility_timeout_s(settings),
        }
    return config


def visibility_timeout_s(settings: Settings) -> int:
    """Seconds Redis waits before handing an unacknowledged message to another worker."""
    return settings.task_time_limit_s + 3600


def create_celery(settings: Settings) -> Celery:
    """Build a Celery app for ``settings``; the worker's tasks are included by name."""
    import svdfarm.control  # noqa: F401 - registers `inspect capabilities` on both sides

    celery = Celery("svdfarm", include=["worker.tasks"])
    celery.conf.update(celery_config(settings))
    celery.conf.svdfarm_settings = settings
    return celery


def settings_of(celery: Celery) -> Settings:
    """The :class:`Settings` a Celery app was built from."""
    settings: Settings = celery.conf.svdfarm_settings
    return settings


def enqueue_render(celery: Celery, job_id: str, queue: str) -> None:
    """Put a job id on ``queue``; the job row must already be committed."""
    settings = settings_of(celery)
    if settings.embedded_broker:
        settings.ensure_dirs()  # the filesystem transport cannot create its own folders
    celery.send_task(RENDER_TASK, args=[job_id], task_id=job_id, queue=queue)


@celeryd_init.connect
def _prepare_worker(sender: Any = None, conf: Any = None, **_: Any) -> None:
    """Create the data folders (and the embedded broker's) before the worker connects."""
    settings = getattr(conf, "svdfarm_settings", None) if conf is not None else None
    if settings is not None:
        settings.ensure_dirs()


app = create_celery(load_settings())
