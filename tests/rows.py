"""Rows for tests: jobs, attempts and workers inserted directly, read back, and waits on a
condition (a worker registering, a job reaching a phase)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from flask import Flask
from sqlalchemy import Engine, event, func, select, update

from svdfarm.db import Database
from svdfarm.models import Attempt, Job, Worker, utcnow
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, ErrorClass, JobState, WorkerState
from svdfarm.storage import Store, open_store

#: The queue :func:`add_job` routes its jobs to (a 16 GB CUDA card at fp16, the tiny model).
QUEUE = "svd.cuda.fp16.16g.tiny"
#: A job id no test makes: fixed, so that the ids of the tests parametrized with it are the same
#: in every pytest-xdist process (a random one differs, and xdist refuses to run).
UNKNOWN_JOB_ID = "0d15ea5e-0000-4000-8000-0000000f0404"

#: The queues a CPU worker consumes: :func:`add_worker`'s when it is given none.
CPU_QUEUES = [f"svd.cpu.fp32.{t}g.tiny" for t in (8, 12, 16, 24)]

#: The render parameters of a small job, for rows inserted directly.
#: The owner of a test client's key-less jobs in open mode (web.owners): its address.
LOCAL_OWNER = "addr:127.0.0.1"

SMALL_JOB = {
    "model": "tiny",
    "num_frames": 4,
    "num_inference_steps": 2,
    "fps": 7,
    "motion_bucket_id": 127,
    "noise_aug_strength": 0.02,
    "seed": 1,
    "decode_chunk_size": 8,
    "width": 64,
    "height": 64,
    "precision": "auto",
    "memory_estimate_bytes": 6_000_000_000,
}


# ---- reading rows back -----------------------------------------------------------------------


def load_job(app: Flask, job_id: str) -> Job:
    """The job row, read in a session of its own."""
    with app.extensions["svdfarm.db"].session() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


def read_job(db: Database, job_id: uuid.UUID) -> Job | None:
    """The job row in a fresh session (None when it is gone)."""
    with db.session() as session:
        return session.get(Job, job_id)


def submit_small_job(db: Database, settings: Settings, **fields: str) -> uuid.UUID:
    """Record and enqueue a small job (4 frames, 2 steps, seed 1 unless ``fields`` say
    otherwise) as the API does; returns its id."""
    from svdfarm.celery_app import create_celery
    from svdfarm.jobs import submit_job, validate_submission
    from svdfarm.lifecycle import By
    from svdfarm.states import Actor
    from tests.factories import png_bytes

    raw = {"num_frames": "4", "num_inference_steps": "2", "seed": "1", **fields}
    submission = validate_submission(settings, raw, png_bytes(), "in.png")
    celery = create_celery(settings)
    with db.session() as session:
        return submit_job(
            session, celery, settings, submission, by=By(Actor.API), owner="addr:127.0.0.1"
        ).id


def job_with_attempts(db: Database, job_id: uuid.UUID) -> Job:
    """The job row with its attempts loaded (it must exist)."""
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.attempts  # noqa: B018 - load them before the session closes
        return job


def job_count(app: Flask) -> int:
    """How many job rows the database holds."""
    with app.extensions["svdfarm.db"].session() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def broker_messages(settings: Settings) -> list[tuple[str, str]]:
    """``(queue, job id)`` of every message in the filesystem broker, oldest first."""
    folder = settings.broker_dir / "queue"
    found = []
    for path in sorted(folder.iterdir()) if folder.exists() else []:
        queue = path.name.split(".", 1)[1].removesuffix(".msg")  # <n>_<uuid>.<queue>.msg
        body = json.loads(base64.b64decode(json.loads(path.read_bytes())["body"]))
        found.append((queue, body[0][0]))
    return found


# ---- inserting rows --------------------------------------------------------------------------


def job_row(job_id: uuid.UUID, **fields: object) -> Job:
    """A job row with a small job's parameters; ``fields`` set or replace any column."""
    values: dict[str, object] = {**SMALL_JOB, "input_key": f"{job_id}/input.png", **fields}
    # The test client's own key-less job, unless the test names another owner.
    values.setdefault("owner", LOCAL_OWNER)
    if values.get("state", JobState.QUEUED) is JobState.QUEUED:
        # A queued row was sent to its queue already, unless the test says published_at=None
        # (a job that waits in the database for the dispatcher).
        values.setdefault("published_at", values.get("updated_at") or utcnow())
    return Job(id=job_id, **values)


def add_job(
    db: Database,
    settings: Settings,
    state: JobState = JobState.FAILED,
    *,
    error_class: ErrorClass | None = ErrorClass.OUT_OF_MEMORY,
    worker: str = "gpu1@farm",
    model: str = "tiny",
    filename: str = "cat.png",
    error: str | None = "CUDA out of memory. Tried to allocate 2.00 GiB",
    finished_at: datetime | None = None,
    duration_s: float = 42.0,
    traceback: str = 'Traceback (most recent call last):\n  File "render.py"\nOutOfMemoryError',
    sent: bool = True,
) -> uuid.UUID:
    """Insert a job on :data:`QUEUE` in ``state`` with its input file in storage and, unless
    queued, one attempt by ``worker`` (failed when ``error_class`` and the job failed). A
    queued one was sent to its queue, unless ``sent`` is False (it waits in the database)."""
    job_id = uuid.uuid4()
    finished = finished_at or utcnow()
    started = finished - timedelta(seconds=duration_s)
    ended = state in (JobState.FAILED, JobState.SUCCEEDED, JobState.CANCELED)
    storage = open_store(settings)
    storage.write_bytes(Store.key(job_id, "input.png"), b"not really a png")
    with db.begin() as session:
        session.add(
            job_row(
                job_id,
                state=state,
                created_at=started - timedelta(seconds=5),
                started_at=started if state is not JobState.QUEUED else None,
                finished_at=finished if ended else None,
                model=model,
                queue=QUEUE,
                input_key=Store.key(job_id, "input.png"),
                input_filename=filename,
                phase="done" if ended else "denoising",
                progress=0.5,
                step=1,
                error=error if state is JobState.FAILED else None,
                **({} if sent else {"published_at": None}),
            )
        )
        if state is not JobState.QUEUED:
            failed = error_class is not None and state is JobState.FAILED
            session.add(
                Attempt(
                    job_id=job_id,
                    number=1,
                    worker=worker,
                    plan_name="fp16 unet+enc, fp32 vae, chunk 8 on cuda",
                    plan={"name": "fp16", "reason": "the card has no bf16"},
                    started_at=started,
                    finished_at=finished if ended else None,
                    outcome=AttemptOutcome.FAILED if failed else AttemptOutcome.SUCCEEDED,
                    error_class=error_class if failed else None,
                    error_type="torch.OutOfMemoryError" if failed else None,
                    message=error if failed else None,
                    traceback=traceback if failed else None,
                    duration_s=duration_s,
                    peak_memory_bytes=15_300_000_000,
                )
            )
    return job_id


def add_delivery(db: Database, job_id: uuid.UUID, url: str, **fields: Any) -> int:
    """Insert a webhook delivery of ``job_id`` to ``url``: a ``job.succeeded`` of the job's
    owner (:data:`LOCAL_OWNER`), pending and due now, unless ``fields`` say otherwise; its id."""
    from svdfarm.models import WebhookDelivery
    from svdfarm.webhook_states import DeliveryState, WebhookEvent

    now = utcnow()
    event = fields.pop("event_type", WebhookEvent.SUCCEEDED)
    values: dict[str, Any] = {
        "msg_id": f"msg_{uuid.uuid4().hex}",
        "owner": LOCAL_OWNER,
        "payload": json.dumps({"type": event.value, "timestamp": now.isoformat(), "data": {}}),
        "created_at": now,
        "state": DeliveryState.PENDING,
        "attempts": 0,
        "next_try_at": now,
        "redeliveries": 0,
        **fields,
    }
    with db.begin() as session:
        row = WebhookDelivery(job_id=job_id, url=url, event_type=event, **values)
        session.add(row)
        session.flush()
        return row.id


def add_worker(
    db: Database,
    hostname: str,
    queues: list[str] | None = None,
    heartbeat_age_s: float = 1.0,
    *,
    state: WorkerState = WorkerState.IDLE,
    current_job_id: uuid.UUID | None = None,
    capabilities: dict[str, Any] | None = None,
    loaded_model: str | None = None,
) -> None:
    """Insert a worker row, started an hour ago, whose last heartbeat was ``heartbeat_age_s``
    seconds ago.

    ``queues`` default to :data:`CPU_QUEUES`; ``capabilities`` to the device of the first
    queue (``{"device": "cuda"}`` for ``svd.cuda.…``), ``cpu`` when it consumes none;
    ``loaded_model`` is the catalog key of the model it holds loaded.
    """
    queues = CPU_QUEUES if queues is None else queues
    if capabilities is None:
        capabilities = {"device": queues[0].split(".")[1] if queues else "cpu"}
    now = utcnow()
    with db.begin() as session:
        session.add(
            Worker(
                hostname=hostname,
                capabilities=capabilities,
                queues=list(queues),
                state=state,
                started_at=now - timedelta(hours=1),
                last_heartbeat=now - timedelta(seconds=heartbeat_age_s),
                current_job_id=current_job_id,
                loaded_model=loaded_model,
            )
        )


# ---- waiting ---------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], object],
    what: str,
    timeout_s: float,
    details: Callable[[], str] | None = None,
) -> float:
    """Poll ``predicate`` every 0.2 s until it is true; the seconds that took.

    Past ``timeout_s`` it fails naming ``what``, with ``details()`` (a log, say) when given.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            more = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{more}")
        time.sleep(0.2)
    return time.monotonic() - start


def wait_for_worker(
    db: Database,
    hostname: str,
    process: subprocess.Popen[bytes],
    log: Callable[[], str],
    timeout_s: float = 120,
) -> None:
    """Block until the worker process has registered itself; fail with its log if it died."""

    def registered() -> bool:
        """Whether the worker's row exists; fails at once when its process has exited."""
        assert process.poll() is None, f"worker {hostname} exited early:\n{log()}"
        with db.session() as session:
            return session.get(Worker, hostname) is not None

    wait_until(registered, f"worker {hostname} to register", timeout_s, log)


def ended_job(db: Database, settings: Settings, age: timedelta) -> uuid.UUID:
    """A succeeded job that ended ``age`` ago, with its input, video and poster stored."""
    job_id = add_job(db, settings, JobState.SUCCEEDED, finished_at=utcnow() - age)
    store = open_store(settings)
    video, poster = Store.key(job_id, "video.mp4"), Store.key(job_id, "poster.png")
    store.write_bytes(video, b"mp4")
    store.write_bytes(poster, b"png")
    with db.begin() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(video_key=video, poster_key=poster)
        )
    return job_id


def stored_names(settings: Settings, job_id: uuid.UUID) -> list[str]:
    """The names of the job's stored files, sorted."""
    keys = open_store(settings).list_keys(f"{job_id}/")
    return sorted(key.split("/", 1)[1] for key in keys)


def send_two_cancel_one(db: Database, settings: Settings) -> tuple[uuid.UUID, uuid.UUID]:
    """Two queued jobs sent to :data:`QUEUE`, the second then canceled by the admin while
    its message is still in the broker; their ids (kept, canceled)."""
    from svdfarm.actions import cancel_job
    from svdfarm.celery_app import create_celery, enqueue_render
    from svdfarm.lifecycle import By
    from svdfarm.states import Actor

    kept, canceled = (add_job(db, settings, JobState.QUEUED) for _ in range(2))
    celery = create_celery(settings)
    try:
        for job_id in (kept, canceled):
            enqueue_render(celery, str(job_id), QUEUE)
    finally:
        celery.close()
    with db.session() as session:
        assert cancel_job(session, canceled, by=By(Actor.ADMIN)).done
    return kept, canceled


def set_owner(db: Database, job_id: uuid.UUID, owner: str = LOCAL_OWNER) -> uuid.UUID:
    """Give a job inserted directly an owner (:data:`LOCAL_OWNER`: the test client's, so its
    pages and API show the job); returns the id."""
    with db.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(owner=owner))
    return job_id


@contextmanager
def recorded_statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements ``engine`` runs while the block runs, in order."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(args[2])

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)
