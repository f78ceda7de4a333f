"""Submitting jobs: validate, check the limits, record, store the input, then enqueue.

Nothing is written or enqueued for a refused request. A job row is committed before its id
goes on the queue, so a worker never receives an id the database does not know; when the
broker cannot take the id, the job stays queued in the database and the reaper
(:mod:`svdfarm.reaper`) publishes it once the broker is back. A client that retries with the
same ``Idempotency-Key`` gets the job its first request made.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from svdfarm import lifecycle
from svdfarm.catalog import find_entry, model_shape, queue_key
from svdfarm.celery_app import enqueue_render
from svdfarm.dispatch import Sending, Unmarked, mark_at_submit, send, slot_freed
from svdfarm.images import ImageError, ImageInfo, inspect_image
from svdfarm.lifecycle import By
from svdfarm.models import Job, Worker, utcnow
from svdfarm.params import FIELDS, OUTPUT_FIELDS, ParamError, RenderParams, parse_params
from svdfarm.queues import Route, Unroutable, route
from svdfarm.registry import default_model, online_queues
from svdfarm.settings import Settings
from svdfarm.space import LOW_SPACE_RETRY_AFTER_S, low_space
from svdfarm.states import Actor, JobState
from svdfarm.storage import Store, open_store
from svdfarm.users import MAX_PRIORITY, MIN_PRIORITY, Limits, limits_of, user_id_of
from svdfarm.webhook_urls import WebhookUrlError, check_url

log = logging.getLogger(__name__)


#: How long a client that hit the queue-full limit is asked to wait before trying again.
QUEUE_FULL_RETRY_AFTER_S = 10
#: The same for an owner at their own ``--max-queued`` limit.
OWNER_FULL_RETRY_AFTER_S = 30
#: The longest ``Idempotency-Key`` accepted (the column's size).
MAX_IDEMPOTENCY_KEY = 255
#: Who sends a submitted job to its queue (the web, as a dispatcher).
DISPATCH_BY = By(Actor.WEB)


class QueueUnavailable(RuntimeError):
    """The job was recorded but its id could not be put on the queue."""


class SubmitRefused(RuntimeError):
    """A valid request the farm will not take now: too many from this client, or full.

    ``status`` is 429 (this client's per-minute limit) or 503 (the farm's queue is full);
    ``retry_after`` says in whole seconds when trying again can succeed.
    """

    def __init__(self, message: str, status: int, retry_after: int) -> None:
        """A refusal with its HTTP status and Retry-After seconds."""
        super().__init__(message)
        self.status = status
        self.retry_after = max(1, retry_after)


class IdempotencyConflict(ValueError):
    """An ``Idempotency-Key`` reused for a different request."""


@dataclass(frozen=True)
class Submission:
    """A request that passed validation, ready to be recorded."""

    params: RenderParams
    image: ImageInfo
    data: bytes
    filename: str
    #: The fields as the client sent them (a blank seed stays blank: the random seed drawn
    #: for it must not make a retry look like another request).
    sent: tuple[tuple[str, str], ...] = ()
    #: The model it renders: a catalog entry's source (svdfarm.catalog).
    model: str = ""
    #: Its dispatch priority, -10..10 (checked against the owner's limit at submit).
    priority: int = 0
    #: Where the job's own webhook deliveries go (svdfarm.webhooks); None: nowhere.
    webhook_url: str | None = None

    def fingerprint(self) -> str:
        """A hash of what was asked (the fields as sent and the image bytes), for retries."""
        digest = hashlib.sha256()
        for name, value in self.sent:
            digest.update(f"{name}={value!r};".encode())
        digest.update(hashlib.sha256(self.data).digest())
        return digest.hexdigest()


#: The fields a submission may carry besides its image.
SUBMIT_FIELDS = (*FIELDS, "precision", *OUTPUT_FIELDS, "model", "priority", "webhook_url")
#: Unknown fields named one by one in a refusal (a form may hold up to 1,000 parts).
MAX_UNKNOWN_LISTED = 10


def repeated_fields(form: Any, files: Any, *, images: bool = True) -> dict[str, str]:
    """Fields (and the image, unless ``images`` is False: a batch's) sent more than once:
    refused, never one copy silently chosen.

    ``form`` and ``files`` are werkzeug MultiDicts (``request.form``, ``request.files``).
    """
    errors = {}
    for name in SUBMIT_FIELDS:
        count = len(form.getlist(name))
        if count > 1:
            label = FIELDS[name].label if name in FIELDS else name.replace("_", " ").capitalize()
            errors[name] = f"{label} was sent {count} times; send it once."
    sent = len(files.getlist("image"))
    if images and sent > 1:
        errors["image"] = f"Send one image; {sent} were sent (POST /api/v1/batches takes several)."
    return errors


def unknown_fields(form: Any, files: Any, also: Iterable[str] = ()) -> dict[str, str]:
    """Fields (text or file parts) the farm does not know, each with a message naming the
    accepted fields: refused, never silently ignored (``frames=14`` would render the default).

    ``also`` names the extra fields the caller itself takes (the form's ``csrf_token``).
    """
    accepted = ["image", *SUBMIT_FIELDS, *also]
    errors: dict[str, str] = {}
    unknown = [n for n in dict.fromkeys([*form.keys(), *files.keys()]) if n not in accepted]
    for name in unknown[:MAX_UNKNOWN_LISTED]:
        shown = name[:40]
        close = difflib.get_close_matches(name, accepted, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        errors[shown] = (
            f"Unknown field {shown!r}{hint}: the accepted fields are {', '.join(accepted)}."
        )
    return errors


def clean_filename(name: str) -> str:
    """The client's file name as display text: printable characters only, at most 255.

    It is never used as a path (inputs are stored under generated names); a NUL would not
    even fit in a PostgreSQL text column.
    """
    return "".join(c for c in name if c.isprintable())[:255]


def validate_submission(
    settings: Settings,
    fields: Mapping[str, Any],
    data: bytes | None,
    filename: str,
    *,
    served: Iterable[str] = (),
) -> Submission:
    """Check the image and every field; raise ParamError (field -> message) with all problems.

    ``model`` names a model of the catalog by id or source; blank, the first one a live
    worker serves (``served``, the sources live workers advertise), else ``SVDFARM_MODEL``'s.
    """
    errors: dict[str, str] = {}
    model = settings.model
    asked = str(fields.get("model") or "").strip()
    if asked:
        entry = find_entry(settings.catalog, asked)
        if entry is None:
            known = ", ".join(e.id for e in settings.catalog)
            errors["model"] = f"Unknown model {asked[:60]!r}: the known models are {known}."
        else:
            model = entry.source
    else:
        model = default_model(settings, set(served)).source
    status = 400
    try:
        priority = parse_priority(fields.get("priority"))
    except ParamError as exc:
        errors.update(exc.errors)
        priority = 0
    webhook_url = str(fields.get("webhook_url") or "").strip() or None
    if webhook_url is not None:
        try:
            webhook_url = check_url(webhook_url, allow_private=settings.webhook_allow_private)
        except WebhookUrlError as exc:
            errors["webhook_url"] = str(exc)
    info: ImageInfo | None = None
    if data is None:
        errors["image"] = "Choose an image to animate (PNG, JPEG or WebP)."
    else:
        try:
            info = inspect_image(data, settings.max_upload_bytes, settings.max_image_pixels)
        except ImageError as exc:
            errors["image"], status = str(exc), exc.status
    size = (info.width, info.height) if info else (1, 1)
    try:
        params = parse_params(fields, size, model)
    except ParamError as exc:
        errors.update(exc.errors)
    else:
        try:
            _route(settings, params, (), model)
        except Unroutable as exc:
            errors["job"] = str(exc)
    if errors or info is None or data is None:
        raise ParamError(errors, status)
    sent = tuple((name, str(fields.get(name, "") or "").strip()) for name in SUBMIT_FIELDS)
    return Submission(
        params=params,
        image=info,
        data=data,
        filename=clean_filename(filename),
        sent=sent,
        model=model,
        priority=priority,
        webhook_url=webhook_url,
    )


def parse_priority(value: Any) -> int:
    """The ``priority`` field: an integer from -10 to 10, blank = 0; else ParamError."""
    text = str(value or "").strip()
    if not text:
        return 0
    try:
        priority = int(text)
    except ValueError:
        priority = MAX_PRIORITY + 1
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ParamError(
            {
                "priority": f"Priority must be a whole number from {MIN_PRIORITY} to "
                f"{MAX_PRIORITY} (higher runs first); {text[:20]!r} is not."
            }
        )
    return priority


def check_owner(
    session: Session, owner: str, submissions: Iterable[Submission], *, count: int = 1
) -> Limits:
    """Refuse what the owner may not ask: a priority above their ``--max-priority``
    (ParamError, 403) or more waiting jobs than their ``--max-queued`` (SubmitRefused, 429).
    Returns the owner's limits."""
    limits = limits_of(session, [owner])[owner]
    highest = max((s.priority for s in submissions), default=0)
    if highest > limits.max_priority:
        raise ParamError(
            {
                "priority": f"Priority {highest} is above your limit of {limits.max_priority} "
                "(an admin can raise it: svdfarm users add --max-priority)."
            },
            403,
        )
    if limits.max_queued is None:
        return limits
    waiting = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.owner == owner, Job.state == JobState.QUEUED)
    )
    if (waiting or 0) + count > limits.max_queued:
        raise SubmitRefused(
            f"You have {waiting} job(s) waiting, and your limit is {limits.max_queued}: "
            f"wait for some to start, or cancel some. Try again in {OWNER_FULL_RETRY_AFTER_S} s.",
            429,
            OWNER_FULL_RETRY_AFTER_S,
        )
    return limits


def _route(
    settings: Settings, params: RenderParams, online: Iterable[str], model: str = ""
) -> Route:
    """The queue a job of ``model`` (default ``SVDFARM_MODEL``) goes to: its model's queue,
    with that model's memory estimate (raises Unroutable when no worker class could run it)."""
    return route(
        params.num_frames,
        params.width,
        params.height,
        params.decode_chunk_size,
        params.precision,
        allow_cpu=settings.allow_cpu,
        online_queues=online,
        shape=model_shape(model or settings.model, settings.models_dir),
        model_key=queue_key(settings.catalog, model or settings.model),
    )


def check_idempotency_key(key: str | None) -> str | None:
    """The ``Idempotency-Key`` header's value, or None; raises ParamError when malformed."""
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise ParamError(
            {
                "Idempotency-Key": "The Idempotency-Key header must be 1 to "
                f"{MAX_IDEMPOTENCY_KEY} printable ASCII characters (a UUID is a good choice)."
            }
        )
    return key


def find_idempotent(
    session: Session, key: str, submission: Submission, *, owner: str | None = None
) -> Job | None:
    """The job an earlier request with ``key`` made, or None.

    Raises :class:`IdempotencyConflict` when the key was used for a different request, or
    by another owner (whose job is not shown).
    """
    job = session.scalar(select(Job).where(Job.idempotency_key == key))
    if job is not None and owner is not None and job.owner != owner:
        raise IdempotencyConflict(
            "This Idempotency-Key was already used by another client; use a new key."
        )
    if job is not None and job.request_hash != submission.fingerprint():
        raise IdempotencyConflict(
            "This Idempotency-Key was already used for a different request (other image or "
            "settings); use a new key for a new job."
        )
    return job


def check_limits(
    session: Session, settings: Settings, client: str | None, *, count: int = 1
) -> None:
    """Raise :class:`SubmitRefused` when the store is nearly full, or ``count`` more jobs
    (a batch's) would put ``client`` over its per-minute limit or the farm over its queue
    limit; both limits count what the database holds, so every web process agrees.

    On PostgreSQL one client's submits are serialised by an advisory lock, so its limit is
    exact; the farm-wide queue limit is not serialised (that would make every submit wait for
    every other) and can be passed by the number of submits in flight at the same moment.
    """
    if full := low_space(settings):
        raise SubmitRefused(full, 503, LOW_SPACE_RETRY_AFTER_S)
    now = utcnow()
    rate = settings.submit_rate_per_minute
    if rate and client:
        if session.get_bind().dialect.name == "postgresql":
            # One client's concurrent submits count one after another (until commit).
            session.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                {"key": f"svdfarm-submit:{client}"},
            )
        window_start = now - timedelta(minutes=1)
        recent = session.execute(
            select(func.count(), func.min(Job.created_at)).where(
                Job.client == client, Job.created_at > window_start
            )
        ).one()
        if count > rate:
            raise SubmitRefused(
                f"Too many jobs at once: {count} in one batch, and at most {rate} per minute "
                "from one client. Send a smaller batch.",
                429,
                60,
            )
        if recent[0] + count > rate:
            oldest = recent[1] or now
            wait = math.ceil((oldest - window_start).total_seconds())
            raise SubmitRefused(
                f"Too many submissions: at most {rate} per minute from one client. "
                f"Try again in {max(1, wait)} s.",
                429,
                wait,
            )
    limit = settings.max_queued_jobs
    if limit:
        queued = session.scalar(
            select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED)
        )
        if (queued or 0) + count > limit:
            raise SubmitRefused(
                f"The farm is full ({queued} of at most {limit} jobs are waiting). "
                f"Try again in {QUEUE_FULL_RETRY_AFTER_S} s.",
                503,
                QUEUE_FULL_RETRY_AFTER_S,
            )


def new_job(
    settings: Settings,
    submission: Submission,
    *,
    client: str | None,
    online: Iterable[str],
    owner: str = "",
    idempotency_key: str | None = None,
) -> Job:
    """The row of a new job of ``owner`` for ``submission``, routed among the ``online``
    queues (not added to a session)."""
    job_id = uuid.uuid4()
    routed = _route(settings, submission.params, online, submission.model)
    return Job(
        id=job_id,
        model=submission.model or settings.model,
        input_key=Store.key(job_id, f"input.{submission.image.extension}"),
        input_filename=submission.filename,
        queue=routed.queue,
        memory_estimate_bytes=routed.memory_bytes,
        client=(client or None) and client[:64],
        owner=owner[:80],
        priority=submission.priority,
        webhook_url=submission.webhook_url,
        idempotency_key=idempotency_key,
        request_hash=submission.fingerprint() if idempotency_key is not None else None,
        **submission.params.as_dict(),
    )


def submit_job(
    session: Session,
    celery: Celery,
    settings: Settings,
    submission: Submission,
    *,
    client: str | None = None,
    idempotency_key: str | None = None,
    by: By,
    owner: str,
    online: Sequence[Worker] | None = None,
) -> Job:
    """Record a validated submission of ``owner``, store its image, commit, and let the
    dispatcher send it (:mod:`svdfarm.dispatch`).

    ``by`` is who submits (the web form or an API client); ``online``, the online workers
    when the caller has just read them (routing reads them otherwise). With ``idempotency_key``, a
    request already made with that key by the same owner returns its job instead
    (:class:`IdempotencyConflict` when the request differs). Raises :class:`SubmitRefused`
    when a limit says no, ParamError when the owner may not ask that priority; nothing is
    written then.
    """
    if idempotency_key is not None:
        earlier = find_idempotent(session, idempotency_key, submission, owner=owner)
        if earlier is not None:
            return earlier
    limits = check_owner(session, owner, [submission])
    # The per-address rate is for anonymous owners; a user has limits of their own.
    check_limits(session, settings, client if user_id_of(owner) is None else None)
    storage = open_store(settings)
    job = new_job(
        settings,
        submission,
        client=client,
        online=online_queues(session, settings, submission.model or None, online=online),
        owner=owner,
        idempotency_key=idempotency_key,
    )
    job_id, input_key, queue = job.id, job.input_key, job.queue
    try:
        lifecycle.submit(session, job, by=by)
        storage.write_bytes(input_key, submission.data)
        # An idle queue with nothing else waiting: marked sent in this same commit.
        marked = mark_at_submit(session, settings, job, limits, by=DISPATCH_BY)
        session.commit()
    except IntegrityError:
        # The same key raced in from a concurrent retry: answer with the job that won.
        session.rollback()
        storage.delete_job(job_id)
        if idempotency_key is not None:
            earlier = find_idempotent(session, idempotency_key, submission, owner=owner)
            if earlier is not None:
                return earlier
        raise
    except BaseException:
        session.rollback()
        storage.delete_job(job_id)
        raise
    if isinstance(marked, Sending):
        send(session, celery, marked, by=DISPATCH_BY)
    elif marked is Unmarked.FOR_PASS or _slot_freed(session, settings, queue):
        dispatch_after_submit(session, celery, settings, [queue])
    # Otherwise no consumer is free; the next one to be runs a pass.
    return job


def _slot_freed(session: Session, settings: Settings, queue: str) -> bool:
    """:func:`svdfarm.dispatch.slot_freed` after a committed submit; False when it cannot be
    read (the submit has succeeded; the next periodic pass sends the job)."""
    try:
        return slot_freed(session, settings, queue)
    except Exception:
        session.rollback()
        log.exception("could not look for a free slot after submit; the next pass sends the job")
        return False


def dispatch_after_submit(
    session: Session, celery: Celery, settings: Settings, queues: Iterable[str]
) -> None:
    """Run a dispatch pass for the queues new jobs went to: on an idle farm the job is sent
    at once. A pass that fails (the broker or the database down) leaves the jobs waiting in
    the database for the next pass; the submit has succeeded either way."""
    from svdfarm.dispatch import dispatch

    try:
        dispatch(session, celery, settings, queues=set(queues), by=DISPATCH_BY)
    except Exception:
        session.rollback()
        log.exception("dispatch after submit failed; the next pass sends the job")


def publish(
    session: Session, celery: Celery, job: Job, *, by: By, seen_updated_at: datetime | None = None
) -> bool:
    """Put a queued job's id on its queue; False when it was not (logged and recorded).

    The ``published`` event is committed before the id is sent, so a worker's claim always
    comes after it. When the broker refuses, the job stays queued in the database and the
    reaper publishes it later: a broker outage delays jobs and loses none. With
    ``seen_updated_at`` only a job nobody touched since is published (one reaper of many).
    """
    if not lifecycle.publish(session, job.id, by=by, seen_updated_at=seen_updated_at):
        session.rollback()
        return False
    session.commit()
    try:
        enqueue_render(celery, str(job.id), job.queue)
    except Exception as exc:
        log.warning(
            "could not enqueue job %s (%s: %s); the reaper will publish it later",
            job.id,
            type(exc).__name__,
            exc,
        )
        lifecycle.publish_failed(session, job.id, by=by, error=type(exc).__name__)
        session.commit()
        return False
    return True
