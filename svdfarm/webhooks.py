"""Webhooks: a job's events POSTed, signed, to its own ``webhook_url`` and to the endpoints
its owner registered.

Each delivery is a row (:class:`svdfarm.models.WebhookDelivery`) written by :func:`on_event`
in the transaction of the job event it tells of, so a move that rolls back leaves none and a
committed one always has its deliveries. The workers' sender loop
(:mod:`svdfarm.webhook_sender`) sends them, retries them and keeps each job's deliveries to
one URL in order; nothing is sent from a web request. Every delivery is signed with its
owner's ``whsec_`` secret (made on first use, kept in the database) as Standard Webhooks
specifies: headers ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``.
docs/WEBHOOKS.md has the whole contract.
"""

from __future__ import annotations

import base64
import functools
import secrets
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, Uuid, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from svdfarm.models import Job, JobEvent, WebhookDelivery, WebhookEndpoint, WebhookSecret, utcnow
from svdfarm.users import find_user, user_id_of
from svdfarm.webhook_payload import job_columns, payload
from svdfarm.webhook_states import DEFAULT_EVENTS, FROM_JOB_EVENT, DeliveryState, WebhookEvent
from svdfarm.webhook_urls import check_url

if TYPE_CHECKING:
    from typing_extensions import Unpack

SECRET_PREFIX = "whsec_"
#: The prefixes of owner strings (svdfarm.users).
OWNER_PREFIXES = ("user:", "anon:", "addr:")


class WebhookError(ValueError):
    """An endpoint, owner or event list the farm cannot take, with a message for the user."""


# -- Secrets ---------------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_for(session: Session, owner: str) -> str:
    """The owner's signing secret, made (in the caller's transaction) on first use."""
    found = session.get(WebhookSecret, owner)
    if found is not None:
        return found.key
    try:
        with session.begin_nested():
            row = WebhookSecret(owner=owner, key=new_secret(), created_at=utcnow())
            session.add(row)
        return row.key
    except IntegrityError:  # another transaction made it first
        made = session.scalars(select(WebhookSecret).where(WebhookSecret.owner == owner)).one()
        return made.key


def signed_headers(key: str, msg_id: str, body: str, at: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of ``body`` sent now (or ``at``) as ``msg_id``."""
    when = at or utcnow()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(key).sign(msg_id, when, body),
    }


# -- Endpoints -------------------------------------------------------------------------------


def resolve_owner(session: Session, text: str) -> str:
    """An owner string from ``text``: ``user:<id>``, ``anon:<hex>``, ``addr:<address>`` as
    they are, or a user's name; :class:`WebhookError` for an unknown user."""
    text = text.strip()
    if text.startswith(OWNER_PREFIXES):
        if text.startswith("user:") and user_id_of(text) is None:
            raise WebhookError(f"{text[:80]!r} is not an owner: user:<id> takes a number.")
        return text[:80]
    user = find_user(session, text)
    if user is None:
        raise WebhookError(
            f"No user named {text[:64]!r}; an owner is a user's name, or user:<id>, "
            "anon:<hex> or addr:<address>."
        )
    return user.owner


def parse_events(names: Iterable[str]) -> list[WebhookEvent]:
    """The events named (``job.succeeded``, ``succeeded``; commas allowed), in their order
    of :class:`WebhookEvent`; none named: :data:`DEFAULT_EVENTS`."""
    asked: set[WebhookEvent] = set()
    for name in names:
        for part in name.split(","):
            if part.strip():
                try:
                    asked.add(WebhookEvent.parse(part))
                except ValueError as exc:
                    raise WebhookError(str(exc)) from None
    return [e for e in WebhookEvent if e in asked] if asked else list(DEFAULT_EVENTS)


def add_endpoint(
    session: Session,
    *,
    owner: str,
    url: str,
    events: Iterable[WebhookEvent] = DEFAULT_EVENTS,
    allow_private: bool = False,
) -> WebhookEndpoint:
    """Register ``url`` for ``events`` of every job of ``owner`` (flushed, not committed)."""
    try:
        checked = check_url(url, allow_private=allow_private, field="url")
    except ValueError as exc:
        raise WebhookError(str(exc)) from None
    chosen = [e.value for e in WebhookEvent if e in set(events)]
    if not chosen:
        raise WebhookError("An endpoint needs at least one event.")
    row = WebhookEndpoint(owner=owner, url=checked, events=chosen, created_at=utcnow())
    session.add(row)
    session.flush()
    return row


def list_endpoints(session: Session, owner: str | None = None) -> list[WebhookEndpoint]:
    """The registered endpoints (of ``owner``), oldest first."""
    stmt = select(WebhookEndpoint).order_by(WebhookEndpoint.id)
    if owner is not None:
        stmt = stmt.where(WebhookEndpoint.owner == owner)
    return list(session.scalars(stmt))


def remove_endpoint(session: Session, endpoint_id: int) -> WebhookEndpoint:
    """Delete an endpoint; its pending deliveries are canceled. :class:`WebhookError` when
    there is no such endpoint."""
    row = session.get(WebhookEndpoint, endpoint_id)
    if row is None:
        raise WebhookError(f"No webhook endpoint {endpoint_id}.")
    cancel_pending(session, endpoint_id=endpoint_id, why="its endpoint was removed")
    session.delete(row)
    session.flush()
    return row


def disable_endpoint(session: Session, endpoint_id: int, *, reason: str) -> None:
    """Stop sending to an endpoint (a 410 Gone): disabled, its pending deliveries canceled."""
    session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.disabled_at.is_(None))
        .values(disabled_at=utcnow(), disabled_reason=reason[:500])
    )
    cancel_pending(session, endpoint_id=endpoint_id, why=reason)


def enable_endpoint(session: Session, endpoint_id: int) -> WebhookEndpoint:
    """Send to a disabled endpoint again, from its owner's next event on (the deliveries
    canceled when it was disabled stay canceled: :func:`redeliver` sends one again).
    :class:`WebhookError` when there is no such endpoint."""
    row = session.get(WebhookEndpoint, endpoint_id)
    if row is None:
        raise WebhookError(f"No webhook endpoint {endpoint_id}.")
    row.disabled_at = None
    row.disabled_reason = None
    session.flush()
    return row


def cancel_pending(
    session: Session,
    *,
    why: str,
    endpoint_id: int | None = None,
    job_id: uuid.UUID | None = None,
    url: str | None = None,
) -> int:
    """Cancel the pending deliveries of an endpoint, or of a job's own URL (``job_id`` and
    ``url``, no endpoint); how many."""
    stmt = update(WebhookDelivery).where(WebhookDelivery.state == DeliveryState.PENDING)
    if endpoint_id is not None:
        stmt = stmt.where(WebhookDelivery.endpoint_id == endpoint_id)
    else:
        stmt = stmt.where(
            WebhookDelivery.job_id == job_id,
            WebhookDelivery.url == url,
            WebhookDelivery.endpoint_id.is_(None),
        )
    done = session.execute(
        stmt.values(state=DeliveryState.CANCELED, last_error=why[:500]).execution_options(
            synchronize_session=False
        )
    )
    return int(done.rowcount)  # type: ignore[attr-defined]


# -- The hook: deliveries made with the job event --------------------------------------------


@functools.cache
def _job_and_endpoints() -> Select[Unpack[tuple[Any, ...]]]:
    """A job's payload columns (parameter ``job_id``) with whether its owner has an enabled
    endpoint; built once (every event a webhook tells of reads it)."""
    has_endpoints = (
        select(WebhookEndpoint.id)
        .where(WebhookEndpoint.owner == Job.owner, WebhookEndpoint.disabled_at.is_(None))
        .exists()
    )
    return job_columns(bindparam("job_id", type_=Uuid)).add_columns(has_endpoints)


def on_event(session: Session, event: JobEvent) -> list[WebhookDelivery]:
    """Write the deliveries of one job event, in the caller's transaction: one for the job's
    own ``webhook_url`` and one per enabled endpoint of its owner that takes the event.

    Called by :func:`svdfarm.lifecycle.record` for every event; events no webhook tells of
    (published, declined...) cost nothing, the others a read of the job and its owner's
    endpoints. The payload is the job as it is now, in this transaction.
    """
    kind = FROM_JOB_EVENT.get(event.type)
    if kind is None:
        return []
    # One read in the usual case (no URL on the job, no endpoint of its owner): the job's
    # columns with whether its owner has an endpoint at all.
    job = session.execute(_job_and_endpoints(), {"job_id": event.job_id}).first()
    if job is None:
        return []
    targets: list[tuple[int | None, str]] = []
    if job.webhook_url and kind in DEFAULT_EVENTS:
        targets.append((None, job.webhook_url))
    if job.owner and job[-1]:
        endpoints = session.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.url, WebhookEndpoint.events).where(
                WebhookEndpoint.owner == job.owner, WebhookEndpoint.disabled_at.is_(None)
            )
        )
        targets += [(e.id, e.url) for e in endpoints if kind.value in (e.events or [])]
    if not targets:
        return []
    body = payload(kind, event.at, job)
    now = utcnow()
    rows = [
        WebhookDelivery(
            msg_id=f"msg_{uuid.uuid4().hex}",
            job_id=event.job_id,
            endpoint_id=endpoint_id,
            owner=job.owner,
            url=url,
            event_type=kind,
            payload=body,
            created_at=now,
            state=DeliveryState.PENDING,
            attempts=0,
            next_try_at=now,
        )
        for endpoint_id, url in targets
    ]
    session.add_all(rows)
    session.flush()
    return rows


def deliveries_of(session: Session, job_id: uuid.UUID) -> list[WebhookDelivery]:
    """A job's deliveries, in the order they were made."""
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.id)
        )
    )


def redeliver(session: Session, delivery_id: int) -> WebhookDelivery:
    """Send a delivery again, now: pending, due at once, with the same ``webhook-id`` and
    body (a new attempt of the same message, as Standard Webhooks asks, so a receiver that
    got it before can tell), in the caller's transaction (flushed, not committed).

    Any state may be sent again: a delivered one (the receiver lost it), a failed one (the
    receiver is fixed) or a pending one waiting for a late retry. The row records it
    (``redeliveries``, ``redelivered_at``), its attempts go on counting, and if the new try
    fails, its retries follow the usual schedule for three days from now. It is still sent
    in order: a later pending delivery of the same job to the same URL waits for it. A try
    in flight at this moment may overlap the new one; the receiver tells them apart by their
    ``webhook-id``. :class:`WebhookError` when there is no such delivery or its endpoint is
    disabled (enable it first).
    """
    row = session.get(WebhookDelivery, delivery_id)
    if row is None:
        raise WebhookError(f"No webhook delivery {delivery_id}.")
    if row.endpoint_id is not None:
        endpoint = session.get(WebhookEndpoint, row.endpoint_id)
        if endpoint is not None and endpoint.disabled_at is not None:
            raise WebhookError(
                f"Delivery {row.msg_id} goes to endpoint {endpoint.id}, which is disabled "
                f"({endpoint.disabled_reason or 'no reason given'}): enable it first."
            )
    now = utcnow()
    row.state = DeliveryState.PENDING
    row.next_try_at = now
    row.redeliveries += 1
    row.redelivered_at = now
    session.flush()
    return row
