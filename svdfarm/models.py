"""Typed SQLAlchemy 2 models: jobs, their attempts and events, and the workers that run them.

The database is the source of truth; the broker only carries job ids.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    Uuid,
    and_,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from svdfarm.states import (
    Actor,
    AttemptOutcome,
    ErrorClass,
    EventType,
    JobState,
    Phase,
    WorkerState,
)
from svdfarm.webhook_states import DeliveryState, WebhookEvent

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Refuse naive datetimes and store aware ones in UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use svdfarm.models.utcnow()")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Attach UTC to what the driver returns when it lost the zone."""
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def _enum(cls: type) -> Enum:
    """A portable enum column: VARCHAR of the values, no native type to migrate."""
    return Enum(
        cls,
        native_enum=False,
        length=32,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    """Declarative base with constraint names Alembic can rely on."""

    metadata = MetaData(naming_convention=NAMING)


class Job(Base):
    """One image-to-video request, from submit to its MP4."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_client_created_at", "client", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    state: Mapped[JobState] = mapped_column(_enum(JobState), index=True, default=JobState.QUEUED)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    model: Mapped[str] = mapped_column(String(500))
    num_frames: Mapped[int] = mapped_column(Integer)
    num_inference_steps: Mapped[int] = mapped_column(Integer)
    fps: Mapped[int] = mapped_column(Integer)
    motion_bucket_id: Mapped[int] = mapped_column(Integer)
    noise_aug_strength: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(BigInteger)
    decode_chunk_size: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    precision: Mapped[str] = mapped_column(String(8))
    min_guidance_scale: Mapped[float] = mapped_column(Float, default=1.0)
    max_guidance_scale: Mapped[float] = mapped_column(Float, default=3.0)
    # The files asked for ("mp4,webm,gif,frames"; the MP4 always) and ping-pong looping.
    output_formats: Mapped[str] = mapped_column(String(64), default="mp4")
    loop: Mapped[bool] = mapped_column(Boolean, default=False)
    # Admin overrides, None = the worker decides: boundary casts on/off, per-component dtypes.
    casts: Mapped[bool | None] = mapped_column(Boolean)
    dtypes: Mapped[dict[str, str] | None] = mapped_column(JSON)

    # Where the job was routed and the memory it was estimated to need (svdfarm.queues).
    queue: Mapped[str] = mapped_column(String(100), default="", index=True)
    memory_estimate_bytes: Mapped[int] = mapped_column(BigInteger, default=0)

    input_key: Mapped[str] = mapped_column(String(200))
    input_filename: Mapped[str] = mapped_column(String(255), default="")
    video_key: Mapped[str | None] = mapped_column(String(200))
    poster_key: Mapped[str | None] = mapped_column(String(200))
    # Every output's key by format ("mp4", "webm", "gif", "frames"), set with video_key.
    output_keys: Mapped[dict[str, str] | None] = mapped_column(JSON)
    # The latest preview of a running render (worker.previews), under its claim's token.
    preview_key: Mapped[str | None] = mapped_column(String(200))
    # The batch the job was submitted in, if any (svdfarm.batches).
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("batches.id", ondelete="SET NULL"), index=True
    )
    #: Its place in the batch (images in the order sent, each image's seeds in order).
    batch_index: Mapped[int | None] = mapped_column(Integer)
    # When retention (svdfarm.retention) deleted the outputs, and the input; None: still kept.
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    input_expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    phase: Mapped[Phase] = mapped_column(_enum(Phase), default=Phase.QUEUED)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)

    # Who asked (the client address, for the per-client submit limit) and, for API clients
    # that retry, their Idempotency-Key with a hash of the request it was first used for.
    client: Mapped[str | None] = mapped_column(String(64))
    # Who owns the job (svdfarm.users: ``user:<id>``, or an anonymous owner in open mode):
    # only they and the admin see it; fair share and the per-owner limits count by it.
    owner: Mapped[str] = mapped_column(String(80), default="")
    # Dispatch order (svdfarm.dispatch): higher first, -10..10.
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # When the dispatcher put the queued job's id on its queue; None: it waits in the database.
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The worker the dispatcher sent it to on that worker's own queue (it had the job's model
    # loaded); None: on the job's queue, for any of its consumers.
    sent_to: Mapped[str | None] = mapped_column(String(255))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Set by each claim: only the holder of the latest claim may finish the job.
    claim_token: Mapped[str | None] = mapped_column(String(32))
    # Where this job's own webhook deliveries go (svdfarm.webhooks); None: none of its own.
    webhook_url: Mapped[str | None] = mapped_column(String(2000))

    attempts: Mapped[list[Attempt]] = relationship(
        back_populates="job",
        order_by="Attempt.number",
        cascade="all, delete-orphan",
        lazy="selectin",
    )

    def params(self) -> dict[str, Any]:
        """The SVD parameters of this job, as the API shows them."""
        return {
            "num_frames": self.num_frames,
            "num_inference_steps": self.num_inference_steps,
            "fps": self.fps,
            "motion_bucket_id": self.motion_bucket_id,
            "noise_aug_strength": self.noise_aug_strength,
            "seed": self.seed,
            "decode_chunk_size": self.decode_chunk_size,
            "width": self.width,
            "height": self.height,
            "precision": self.precision,
            "min_guidance_scale": self.min_guidance_scale,
            "max_guidance_scale": self.max_guidance_scale,
            "output_formats": self.output_formats,
            "loop": self.loop,
        }

    def output_key(self, output: str) -> str | None:
        """The storage key of one output format (the MP4's is ``video_key``), or None."""
        if output == "mp4":
            return self.video_key
        return (self.output_keys or {}).get(output)


def list_order() -> ColumnElement[datetime]:
    """What lists of jobs sort by, newest first: when the job finished, else when it came."""
    return func.coalesce(Job.finished_at, Job.created_at)


# Lists read a page from its edge in these orders (web/admin.py), whatever the history's size.
Index("ix_jobs_list_order", list_order(), Job.id)
Index("ix_jobs_state_list_order", Job.state, list_order(), Job.id)
Index("ix_jobs_model", Job.model)
# The caller's jobs, newest first (GET /api/v1/jobs, "My jobs").
Index("ix_jobs_owner_created", Job.owner, Job.created_at, Job.id)
# The dispatcher reads the waiting jobs of a queue in its order (svdfarm/dispatch.py).
Index(
    "ix_jobs_waiting",
    Job.queue,
    Job.owner,
    Job.priority,
    Job.created_at,
    postgresql_where=and_(Job.state == JobState.QUEUED, Job.published_at.is_(None)),
    sqlite_where=and_(Job.state == JobState.QUEUED, Job.published_at.is_(None)),
)
# Jobs sent to one worker's own queue and not yet taken (svdfarm/dispatch.py, the reaper).
Index(
    "ix_jobs_sent_to",
    Job.sent_to,
    postgresql_where=and_(Job.state == JobState.QUEUED, Job.sent_to.is_not(None)),
    sqlite_where=and_(Job.state == JobState.QUEUED, Job.sent_to.is_not(None)),
)
# Retention's pass reads only the jobs whose files are still kept (svdfarm/retention.py).
Index(
    "ix_jobs_outputs_kept",
    Job.finished_at,
    Job.id,
    postgresql_where=Job.expired_at.is_(None),
    sqlite_where=Job.expired_at.is_(None),
)
Index(
    "ix_jobs_input_kept",
    Job.finished_at,
    Job.id,
    postgresql_where=Job.input_expired_at.is_(None),
    sqlite_where=Job.input_expired_at.is_(None),
)


class Batch(Base):
    """Jobs submitted together: one per image and seed, sharing their settings."""

    __tablename__ = "batches"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    client: Mapped[str | None] = mapped_column(String(64))

    jobs: Mapped[list[Job]] = relationship(order_by="Job.batch_index")


class User(Base):
    """Someone who submits jobs: their limits and share of the farm (svdfarm.users)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    #: A werkzeug password hash, for the web form's login; None: API keys only.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Limits; None: the farm's defaults (no per-owner limit).
    max_queued: Mapped[int | None] = mapped_column(Integer)
    max_running: Mapped[int | None] = mapped_column(Integer)
    #: The highest priority their jobs may ask for.
    max_priority: Mapped[int] = mapped_column(Integer, default=0)
    #: Their weight in fair share (2.0 gets twice the GPU time of 1.0 under contention).
    share: Mapped[float] = mapped_column(Float, default=1.0)

    keys: Mapped[list[ApiKey]] = relationship(back_populates="user", order_by="ApiKey.created_at")

    @property
    def owner(self) -> str:
        """The owner string of this user's jobs."""
        return f"user:{self.id}"


class ApiKey(Base):
    """An API key: shown once when made, kept as a SHA-256 of its secret part."""

    __tablename__ = "api_keys"

    #: The public part, in the key itself (``svdf_<id>_<secret>``) and in listings.
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(back_populates="keys")


class Attempt(Base):
    """One try at rendering a job: the plan it used and how it ended."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(255))
    plan_name: Mapped[str] = mapped_column(String(200))
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[AttemptOutcome] = mapped_column(
        _enum(AttemptOutcome), default=AttemptOutcome.RUNNING
    )
    error_class: Mapped[ErrorClass | None] = mapped_column(_enum(ErrorClass), index=True)
    error_type: Mapped[str | None] = mapped_column(String(200))
    message: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    duration_s: Mapped[float | None] = mapped_column(Float)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)

    job: Mapped[Job] = relationship(back_populates="attempts")


# The admin's worker filter lists the names once each, a probe per name (web/admin.py).
Index("ix_attempts_worker", Attempt.worker)
# The workers page counts the failures of the last day by class (web/admin.py).
Index(
    "ix_attempts_outcome_ended",
    Attempt.outcome,
    func.coalesce(Attempt.finished_at, Attempt.started_at),
)


class Worker(Base):
    """A worker process as it advertised itself, with its last heartbeat."""

    __tablename__ = "workers"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    state: Mapped[WorkerState] = mapped_column(_enum(WorkerState), default=WorkerState.IDLE)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    current_job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL")
    )
    #: Set when the worker failed several jobs in a row with the same error that is not a
    #: precision error (a broken card, a full disk): it takes no job until an operator clears
    #: it (svdfarm.worker_health). The reason names the error and the jobs.
    flagged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    flagged_reason: Mapped[str | None] = mapped_column(Text)
    #: The catalog key (svdfarm.catalog.queue_key) of the model the worker's render process
    #: holds loaded, as of its last job; the dispatcher sends that model's jobs to it first.
    loaded_model: Mapped[str | None] = mapped_column(String(100))


class MetricCount(Base):
    """A count kept by the database's triggers as jobs and attempts change (the migration
    ``metric_counts`` has them): ``/metrics`` reads these rows, never every job."""

    __tablename__ = "metric_counts"

    #: ``jobs`` (labels: a finished state), ``duration_count`` (labels: a bucket's upper
    #: bound or ``+Inf``, not cumulative), ``duration_sum`` (no labels), ``attempts``
    #: (labels: error class, plan and outcome joined by :data:`METRIC_LABEL_SEP`).
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    labels: Mapped[str] = mapped_column(String(500), primary_key=True)
    value: Mapped[float] = mapped_column(Float)


METRIC_LABEL_SEP = "\x1f"


class JobEvent(Base):
    """One thing that happened to a job: a move of its state or a change of its phase.

    Append-only, written by :mod:`svdfarm.lifecycle` in the transaction that made the change;
    ids increase with every event, so a job's events read in id order are its story.
    """

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    # BIGINT on PostgreSQL; SQLite numbers rows only through an INTEGER primary key.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[EventType] = mapped_column(_enum(EventType))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor_kind: Mapped[Actor] = mapped_column(_enum(Actor))
    actor: Mapped[str] = mapped_column(String(255), default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    def as_dict(self) -> dict[str, Any]:
        """The event as the API shows it."""
        who = self.actor_kind.value + (f":{self.actor}" if self.actor else "")
        return {
            "id": self.id,
            "type": self.type.value,
            "at": self.at.isoformat(),
            "actor": who,
            "details": self.details or {},
        }


def storage_failure_event() -> ColumnElement[bool]:
    """Events of a job failing because its video could not be stored (svdfarm/space.py
    retries those jobs); ``ix_job_events_storage_failed`` holds only these."""
    return and_(
        JobEvent.type == EventType.FAILED,
        JobEvent.details["error_class"].as_string() == ErrorClass.STORAGE.value,
    )


Index(
    "ix_job_events_storage_failed",
    JobEvent.job_id,
    postgresql_where=storage_failure_event(),
    sqlite_where=storage_failure_event(),
)


class WebhookSecret(Base):
    """An owner's webhook signing secret (``whsec_...``), made on first use (svdfarm.webhooks)."""

    __tablename__ = "webhook_secrets"

    owner: Mapped[str] = mapped_column(String(80), primary_key=True)
    key: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookEndpoint(Base):
    """A URL an owner registered for the webhook events of all their jobs."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(80), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    #: The event types it gets (:class:`svdfarm.webhook_states.WebhookEvent` values).
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Set when the receiver answered 410 Gone: no delivery is made to it any more.
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_reason: Mapped[str | None] = mapped_column(Text)


class WebhookDelivery(Base):
    """One webhook event for one URL: written with the job event it tells of, sent (and
    retried) by the workers' sender loop (svdfarm.webhook_sender)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    #: The ``webhook-id`` header, the same on every try.
    msg_id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    #: The registered endpoint it goes to; None: the job's own ``webhook_url``.
    endpoint_id: Mapped[int | None] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="SET NULL")
    )
    #: Whose secret signs it (the job's owner).
    owner: Mapped[str] = mapped_column(String(80))
    url: Mapped[str] = mapped_column(String(2000))
    event_type: Mapped[WebhookEvent] = mapped_column(_enum(WebhookEvent))
    #: The request body, exactly as signed and sent.
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: When it is due (while pending); while a sender holds it, when that sender's lease ends.
    next_try_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: How many times an admin asked for it again (svdfarm.webhooks.redeliver), and when last;
    #: a redelivery's three days of retries count from then.
    redeliveries: Mapped[int] = mapped_column(Integer, default=0)
    redelivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# The sender reads the pending deliveries that are due, and a job's earlier ones per URL.
Index(
    "ix_webhook_deliveries_due",
    WebhookDelivery.next_try_at,
    postgresql_where=WebhookDelivery.state == DeliveryState.PENDING,
    sqlite_where=WebhookDelivery.state == DeliveryState.PENDING,
)
Index("ix_webhook_deliveries_job_id_id", WebhookDelivery.job_id, WebhookDelivery.id)
# The admin's delivery log, newest first from a page's edge, by state or by endpoint.
Index("ix_webhook_deliveries_state_id", WebhookDelivery.state, WebhookDelivery.id)
Index("ix_webhook_deliveries_endpoint_id_id", WebhookDelivery.endpoint_id, WebhookDelivery.id)
