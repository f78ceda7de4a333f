"""The Celery app: transport only. Jobs travel as ids; their truth lives in the database.

``celery -A svdfarm worker|inspect|control|purge`` finds :data:`app` here. The web side sends
tasks by name and never imports the worker's code.

The farm's :class:`Settings` ride on the app object (:func:`settings_of`), never in Celery's
config: ``celery inspect conf`` and Flower print that config to anyone who can reach the broker,
and the settings hold the database password, the secret key and the admin password.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import celeryd_init
from celery.utils.nodenames import WORKER_DIRECT_QUEUE_FORMAT, worker_direct
from kombu import Exchange, Queue

from svdfarm.catalog import catalog_keys
from svdfarm.embedded_broker import TRANSPORT
from svdfarm.queues import all_queues
from svdfarm.settings import Settings, load_settings

RENDER_TASK = "svdfarm.render"
DEFAULT_QUEUE = "svd.default"
#: How Celery ends the name of a worker's own queue (celery.utils.nodenames.worker_direct).
DIRECT_SUFFIX = WORKER_DIRECT_QUEUE_FORMAT.format(hostname="")
#: The attribute of a Celery app that holds its settings (off ``app.conf``: see the module doc).
_SETTINGS_ATTR = "svdfarm_settings"


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
        # Acknowledged when the render starts, not after it: no broker timeout on unacknowledged
        # messages (RabbitMQ's consumer_timeout, Redis's visibility timeout) can cut a long
        # render short. The database is the record from there: the reaper requeues and
        # publishes the job of a lost worker (its heartbeats stop, or its render process
        # died), and a worker consumes nothing while it renders (worker.tasks._Intake), so no
        # second message waits behind a render. See docs/RELIABILITY.md.
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        # A broker hiccup must not cancel a render in progress (Celery 6's coming default):
        # the claim token already makes a redelivered job harmless.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_concurrency": 1,
        # Each worker also consumes a queue of its own (``<hostname>.dq2``): the dispatcher
        # sends a model's jobs there to a worker that has the model loaded (svdfarm.dispatch).
        "worker_direct": True,
        "task_default_queue": DEFAULT_QUEUE,
        # Declared so that Celery's own tools know every queue (`celery purge`, Flower); workers
        # still consume only what -Q names (`svdfarm worker` always passes it).
        "task_queues": declared_queues(settings),
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "enable_utc": True,
        "timezone": "UTC",
    }
    if settings.embedded_broker:
        queue_dir = str(settings.broker_dir / "queue")
        # kombu's filesystem transport, each message written whole (svdfarm.embedded_broker).
        config["broker_transport"] = TRANSPORT
        config["broker_transport_options"] = {
            "data_folder_in": queue_dir,
            "data_folder_out": queue_dir,
            "processed_folder": str(settings.broker_dir / "processed"),
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
            # The server-less broker is a folder the worker lists: every 20 ms here (about
            # 0.7% of a core while idle, against 0.2% at 100 ms) so a job starts within
            # 10 ms on average instead of 50.
            "polling_interval": 0.02,
        }
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        # A message is acknowledged when its render starts, so this timeout only covers the
        # moment between delivery and start; kept longer than the longest job (the hard time
        # limit) plus an hour all the same, as a message held longer than it would be handed
        # to a second worker (celery#3541, #5935). A worker killed mid-job is not left to
        # it: the reaper requeues its job once its heartbeats stop. See docs/RELIABILITY.md.
        config["broker_transport_options"] = {
            "visibility_timeout": visibility_timeout_s(settings),
        }
    return config


def declared_queues(settings: Settings | None = None) -> list[Queue]:
    """Every queue of the farm, each as Celery would create it on first use (a direct exchange
    and a routing key of its own name), so declaring them changes no message's route."""
    return [Queue(name, Exchange(name), routing_key=name) for name in farm_queues(settings)]


def farm_queues(settings: Settings | None = None) -> list[str]:
    """The names of every queue the farm may use: the default one and every worker class's,
    bare and for each model of the catalog (of ``settings``, when given)."""
    keys = catalog_keys(settings.catalog) if settings else []
    return list(dict.fromkeys([DEFAULT_QUEUE, *all_queues(keys), *all_queues()]))


def visibility_timeout_s(settings: Settings) -> int:
    """Seconds Redis waits before handing an unacknowledged message to another worker."""
    return settings.task_time_limit_s + 3600


def render_cut_short(celery: Celery) -> str | None:
    """Why this app's broker could take a render's message back before the render ends (a
    warning for ``svdfarm worker`` to print at start), or None when it cannot.

    Only a message acknowledged after the render (``acks_late``) is held that long: RabbitMQ
    closes the channel once its ``consumer_timeout`` passes (30 minutes by default; it cannot
    be read over AMQP, so a longer hard time limit is warned about), and Redis hands the
    message to another worker after its visibility timeout.
    """
    settings = settings_of(celery)
    task = celery.tasks.get(RENDER_TASK)
    acks_late = bool(task.acks_late if task is not None else celery.conf.task_acks_late)
    if not acks_late or settings.embedded_broker:
        return None
    limit = settings.task_time_limit_s
    if settings.broker_url.startswith(("redis://", "rediss://")):
        timeout = int((celery.conf.broker_transport_options or {}).get("visibility_timeout", 3600))
        if timeout > limit:
            return None
        return (
            f"Redis's visibility timeout ({timeout} s) is not longer than "
            f"SVDFARM_TASK_TIME_LIMIT ({limit} s): a longer render would be handed to a second "
            "worker"
        )
    if limit <= RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_S:
        return None
    return (
        f"renders may last up to SVDFARM_TASK_TIME_LIMIT ({limit} s) and their messages are "
        "acknowledged after the render: unless the broker's consumer_timeout (RabbitMQ: "
        f"{RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_S} s by default) is longer, it closes the "
        "worker's channel mid-render and the worker exits"
    )


#: RabbitMQ's ``consumer_timeout`` when its configuration does not set one (30 minutes).
RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_S = 1800


def create_celery(settings: Settings) -> Celery:
    """Build a Celery app for ``settings``; the worker's tasks are included by name."""
    import svdfarm.control  # noqa: F401 - registers `inspect capabilities` on both sides

    celery = Celery("svdfarm", include=["worker.tasks"])
    celery.conf.update(celery_config(settings))
    setattr(celery, _SETTINGS_ATTR, settings)
    return celery


def settings_of(celery: Celery) -> Settings:
    """The :class:`Settings` a Celery app was built from."""
    settings: Settings = getattr(celery, _SETTINGS_ATTR)
    return settings


def enqueue_render(celery: Celery, job_id: str, queue: str, *, worker: str | None = None) -> None:
    """Put a job id on ``queue``, or on ``worker``'s own queue (:func:`direct_queue`) when
    given; the job row must already be committed."""
    settings = settings_of(celery)
    if settings.embedded_broker:
        settings.ensure_dirs()  # the filesystem transport cannot create its own folders
    target: str | Queue = worker_direct(worker) if worker else queue
    celery.send_task(RENDER_TASK, args=[job_id], task_id=job_id, queue=target)


def direct_queue(worker: str) -> str:
    """The name of ``worker``'s own queue (Celery's ``worker_direct``: ``<hostname>.dq2``)."""
    return str(worker_direct(worker).name)


def is_direct_queue(name: str) -> bool:
    """True for a worker's own queue (:func:`direct_queue`), not one of the farm's."""
    return name.endswith(DIRECT_SUFFIX)


@celeryd_init.connect
def _prepare_worker(
    sender: Any = None, instance: Any = None, options: Any = None, **_: Any
) -> None:
    """Create the data folders (and the embedded broker's) before the worker connects; a
    worker started without ``-Q`` consumes the default queue only, as before every queue was
    declared (else a bare ``celery -A svdfarm worker`` would take every class's jobs)."""
    celery: Celery | None = getattr(instance, "app", None)
    settings = getattr(celery, _SETTINGS_ATTR, None)
    if celery is None or settings is None:
        return
    settings.ensure_dirs()
    if not (options or {}).get("queues"):
        celery.amqp.queues.select([DEFAULT_QUEUE])


app = create_celery(load_settings())
