"""The webhook sender: the workers' loop that POSTs due deliveries, retries and gives up.

A pass takes one due delivery at a time: pending, its next try passed, and no earlier
pending delivery of the same job to the same URL (so each job's events reach a URL in
order). Taking it is a short transaction: on PostgreSQL ``FOR UPDATE SKIP LOCKED`` (two
senders never wait on, nor both take, one row), everywhere a conditional update that counts
the attempt and leases the row for :data:`LEASE_S` (its next try moves past the send), so a
second sender skips it and a sender killed mid-send leaves it to be tried again when the
lease ends. The outcome is written only if the row is still the one this sender took.

Outcomes: 2xx delivered; 410 Gone failed, and the endpoint disabled (a job's own URL gets
nothing more for that job); anything else (no answer, a refused address, a 3xx, a 4xx or
5xx) tried again after :data:`RETRY_DELAYS_S` with jitter, or after the ``Retry-After`` of
a 429 or 503, until :data:`GIVE_UP_AFTER_S` after the delivery was made.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session, aliased

from svdfarm.db import Database
from svdfarm.models import Job, WebhookDelivery, utcnow
from svdfarm.settings import Settings
from svdfarm.webhook_http import Answer, post
from svdfarm.webhook_states import DeliveryState
from svdfarm.webhooks import cancel_pending, disable_endpoint, secret_for, signed_headers

log = logging.getLogger(__name__)

HOUR, DAY = 3600.0, 86400.0
#: The waits after the first, second... failed try; then a day each time.
RETRY_DELAYS_S = (5.0, 300.0, 1800.0, 2 * HOUR, 5 * HOUR, 10 * HOUR)
#: No try is made later than this after the delivery was made.
GIVE_UP_AFTER_S = 3 * DAY
#: Each wait is stretched or shrunk by up to this fraction, so retries do not come in waves.
JITTER = 0.1
#: How long a sender holds a delivery it took (longer than any send with its timeout).
LEASE_S = 60.0
#: How often each worker's sender loop runs a pass.
SEND_INTERVAL_S = 1.0
#: The most deliveries one pass sends (the loop comes back a second later).
PASS_LIMIT = 50
_D = WebhookDelivery


@dataclass(frozen=True)
class Taken:
    """A delivery a sender took: what it sends, and the attempt it counts as."""

    id: int
    msg_id: str
    job_id: uuid.UUID
    endpoint_id: int | None
    url: str
    payload: str
    key: str
    attempts: int
    #: When its retries started: it was made, or an admin last redelivered it.
    created_at: datetime


def retry_delay(attempts: int, *, scale: float = 1.0, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempts``-th failed try, with jitter; every wait times
    ``scale`` (``SVDFARM_WEBHOOK_RETRY_SCALE``: shorter in tests)."""
    base = RETRY_DELAYS_S[attempts - 1] if 0 < attempts <= len(RETRY_DELAYS_S) else DAY
    return scale * base * (1 + (rng or random).uniform(-JITTER, JITTER))


def send_due(database: Database, settings: Settings, *, limit: int = PASS_LIMIT) -> int:
    """One pass: send up to ``limit`` due deliveries, one after another; how many were
    tried. Errors of one delivery's database work propagate (the loop logs them)."""
    tried = 0
    while tried < limit:
        taken = take_one(database)
        if taken is None:
            break
        body = taken.payload.encode()
        answer = post(
            taken.url,
            body,
            signed_headers(taken.key, taken.msg_id, taken.payload),
            allow_private=settings.webhook_allow_private,
            timeout_s=settings.webhook_timeout_s,
        )
        settle(database, taken, answer, retry_scale=settings.webhook_retry_scale)
        tried += 1
    return tried


def take_one(database: Database) -> Taken | None:
    """Take the first due delivery (see the module's docstring), or None when none is due."""
    now = utcnow()
    earlier = aliased(WebhookDelivery)
    blocked = exists().where(
        earlier.job_id == _D.job_id,
        earlier.url == _D.url,
        earlier.id < _D.id,
        earlier.state == DeliveryState.PENDING,
    )
    with database.begin() as session:
        stmt = (
            select(_D)
            .where(_D.state == DeliveryState.PENDING, _D.next_try_at <= now, ~blocked)
            .order_by(_D.next_try_at, _D.id)
            .limit(1)
        )
        if session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True, of=_D)
        row = session.scalars(stmt).first()
        if row is None:
            return None
        attempts = row.attempts + 1
        took = session.execute(
            update(_D)
            .where(_D.id == row.id, _D.state == DeliveryState.PENDING, _D.attempts == row.attempts)
            .values(attempts=attempts, next_try_at=now + timedelta(seconds=LEASE_S))
            .execution_options(synchronize_session=False)
        )
        if not took.rowcount:  # type: ignore[attr-defined]
            return None  # another sender took it; the next pass looks again
        return Taken(
            id=row.id,
            msg_id=row.msg_id,
            job_id=row.job_id,
            endpoint_id=row.endpoint_id,
            url=row.url,
            payload=row.payload,
            key=secret_for(session, row.owner),
            attempts=attempts,
            # An admin's redelivery gets its own three days of retries.
            created_at=row.redelivered_at or row.created_at,
        )


def settle(
    database: Database, taken: Taken, answer: Answer, *, retry_scale: float = 1.0
) -> DeliveryState:
    """Write how the try of ``taken`` went; its state now (pending: another try is due after
    :func:`retry_delay` times ``retry_scale``).

    Written only if the row is still pending at this attempt (else a sender took it again
    after this one's lease ended, and that one writes).
    """
    now = utcnow()
    values: dict[str, object] = {"last_status": answer.status, "last_error": answer.error or None}
    state = DeliveryState.PENDING
    if answer.ok:
        state = DeliveryState.DELIVERED
        values.update(state=state, delivered_at=now, last_error=None)
    elif answer.status == 410:
        state = DeliveryState.FAILED
        values.update(state=state)
    else:
        delay = retry_delay(taken.attempts, scale=retry_scale)
        if answer.status in (429, 503) and answer.retry_after_s is not None:
            delay = min(max(answer.retry_after_s, 1.0), DAY)
        if (now - taken.created_at).total_seconds() + delay > GIVE_UP_AFTER_S:
            state = DeliveryState.FAILED
            values.update(state=state)
        else:
            values.update(next_try_at=now + timedelta(seconds=delay))
    with database.begin() as session:
        done = session.execute(
            update(_D)
            .where(
                _D.id == taken.id,
                _D.state == DeliveryState.PENDING,
                _D.attempts == taken.attempts,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if not done.rowcount:  # type: ignore[attr-defined]
            return state
        if answer.status == 410:
            _gone(session, taken)
    if state is not DeliveryState.DELIVERED:
        log.warning(
            "webhook %s to %s: %s (attempt %d, now %s)",
            taken.msg_id,
            taken.url,
            answer.error or answer.status,
            taken.attempts,
            state.value,
        )
    return state


def _gone(session: Session, taken: Taken) -> None:
    """The receiver answered 410: stop sending there (the endpoint, or the job's own URL)."""
    why = f"{taken.url[:200]} answered 410 Gone"
    if taken.endpoint_id is not None:
        disable_endpoint(session, taken.endpoint_id, reason=why)
        return
    cancel_pending(session, job_id=taken.job_id, url=taken.url, why=why)
    session.execute(
        update(Job)
        .where(Job.id == taken.job_id, Job.webhook_url == taken.url)
        .values(webhook_url=None, updated_at=Job.updated_at)  # not a change of the job's life
        .execution_options(synchronize_session=False)
    )


def pending_count(session: Session) -> int:
    """How many deliveries are pending (for tests and the CLI)."""
    from sqlalchemy import func

    return int(session.scalar(select(func.count()).where(_D.state == DeliveryState.PENDING)) or 0)
