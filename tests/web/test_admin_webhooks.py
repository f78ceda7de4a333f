"""The admin's webhooks page (web/admin_webhooks.py) through the Flask client on real
databases: endpoints with enable and disable, the delivery log with its filters and keyset
pages, "Redeliver" (a new try of the same message, sent by the sender to a real receiver),
the job page's deliveries, and the login and CSRF token every form needs.
"""

from __future__ import annotations

import html
import re
import uuid

import pytest
from flask.testing import FlaskClient
from sqlalchemy.dialects import postgresql
from standardwebhooks.webhooks import Webhook

from svdfarm.db import Database
from svdfarm.models import WebhookDelivery, WebhookEndpoint, utcnow
from svdfarm.settings import Settings
from svdfarm.states import JobState
from svdfarm.webhook_sender import send_due
from svdfarm.webhook_states import DeliveryState, WebhookEvent
from svdfarm.webhooks import add_endpoint, secret_for, signed_headers
from tests.conftest import DATABASES
from tests.rows import LOCAL_OWNER, add_delivery, add_job
from tests.web.admin_login import token
from tests.webhook_receiver import Receiver
from web.admin_webhooks import PAGE_SIZE, LogFilters, delivery_log

PAGE = "/admin/webhooks/"


def delivery(db: Database, delivery_id: int) -> WebhookDelivery:
    """The delivery row, read now."""
    with db.session() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        return row


def endpoint(db: Database, url: str) -> int:
    """A new endpoint of :data:`LOCAL_OWNER` for every event but progress; its id."""
    with db.begin() as session:
        return add_endpoint(session, owner=LOCAL_OWNER, url=url, allow_private=True).id


def post(client: FlaskClient, path: str, back: str = PAGE) -> str:
    """POST a form of the webhooks page with its CSRF token; the page it leads back to."""
    response = client.post(path, data={"csrf_token": token(client, back), "next": back})
    assert response.status_code == 303, response.get_data(True)
    assert response.headers["Location"] == back
    return html.unescape(client.get(back).get_data(True))


def shown_ids(page: str) -> list[int]:
    """The deliveries a page lists, in its order."""
    return [int(i) for i in re.findall(r'<tr id="delivery-(\d+)"', page)]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_page_lists_endpoints_and_deliveries(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """Each endpoint with owner, URL, events and state; each delivery with its job, event,
    webhook-id, attempts, last code, state, next try and last error; linked from the nav."""
    hook = endpoint(db, "https://hooks.example.com/svd")
    job_id = add_job(db, settings, JobState.SUCCEEDED)
    failing = add_delivery(
        db,
        job_id,
        "https://hooks.example.com/svd",
        endpoint_id=hook,
        attempts=3,
        last_status=503,
        last_error="the receiver answered 503",
    )
    done = add_delivery(
        db,
        job_id,
        "https://own.example.net/cb",
        event_type=WebhookEvent.QUEUED,
        state=DeliveryState.DELIVERED,
        attempts=1,
        last_status=204,
    )
    assert 'href="/admin/webhooks/"' in admin.get("/admin/").get_data(True)
    page = html.unescape(admin.get(PAGE).get_data(True))
    assert f'id="endpoint-{hook}" class="endpoint-enabled"' in page
    assert LOCAL_OWNER in page and "https://hooks.example.com/svd" in page
    assert "job.queued, job.started, job.succeeded, job.failed, job.canceled" in page
    assert shown_ids(page) == [done, failing]  # newest first
    row = page[page.index(f'id="delivery-{failing}"') :].split("</tr>")[0]
    for text in (str(job_id)[:8], "job.succeeded", delivery(db, failing).msg_id, "pending"):
        assert text in row
    assert '<td class="num">3</td>' in row and '<td class="num">503</td>' in row
    assert "the receiver answered 503" in row and f"endpoint {hook}" in row and ">now<" in row
    own = page[page.index(f'id="delivery-{done}"') :].split("</tr>")[0]
    assert "job's own URL" in own and "delivered" in own and '<td class="num">204</td>' in own


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_log_filters_by_state_and_endpoint_and_pages_from_its_edge(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """Filters by state and by endpoint; pages of :data:`PAGE_SIZE`, older and newer from the
    page's edge (an id), never an OFFSET; an unknown filter value is named and ignored."""
    hook = endpoint(db, "https://hooks.example.com/a")
    job_id = add_job(db, settings, JobState.SUCCEEDED)
    ids = [
        add_delivery(
            db,
            job_id,
            "https://hooks.example.com/a",
            endpoint_id=hook if n % 2 else None,
            state=DeliveryState.FAILED if n % 3 == 0 else DeliveryState.DELIVERED,
        )
        for n in range(PAGE_SIZE + 10)
    ]
    first = html.unescape(admin.get(PAGE).get_data(True))
    assert shown_ids(first) == ids[::-1][:PAGE_SIZE]
    older = re.search(r'href="([^"]+)" rel="next"', first)
    assert older and f"before={ids[10]}" in older[1]
    second = html.unescape(admin.get(older[1]).get_data(True))
    assert shown_ids(second) == ids[9::-1]
    assert 'rel="next"' not in second  # the oldest page
    newer = re.search(r'href="([^"]+)" rel="prev"', second)
    assert newer and f"after={ids[9]}" in newer[1]
    assert shown_ids(html.unescape(admin.get(newer[1]).get_data(True))) == shown_ids(first)

    failed = html.unescape(admin.get(PAGE + "?state=failed").get_data(True))
    assert shown_ids(failed) == [i for n, i in enumerate(ids) if n % 3 == 0][::-1]
    mine = html.unescape(admin.get(f"{PAGE}?endpoint_id={hook}&state=delivered").get_data(True))
    wanted = [i for n, i in enumerate(ids) if n % 2 and n % 3][::-1]
    assert shown_ids(mine) == wanted
    bad = html.unescape(admin.get(PAGE + "?state=lost&endpoint_id=x").get_data(True))
    assert "Unknown state 'lost'" in bad and "endpoint_id 'x' is not a number" in bad
    assert shown_ids(bad) == shown_ids(first)
    sql = str(
        delivery_log(LogFilters(state=DeliveryState.FAILED, before=ids[-1]))
        .limit(PAGE_SIZE + 1)
        .compile(dialect=postgresql.dialect())  # type: ignore[no-untyped-call]
    )
    assert "OFFSET" not in sql and "ORDER BY webhook_deliveries.id DESC" in sql


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_redeliver_sends_the_same_message_again(
    admin: FlaskClient, db: Database, settings: Settings, receiver: Receiver
) -> None:
    """A delivered delivery, redelivered: pending and due now, recorded in the row; the
    sender's next pass POSTs it again with the same webhook-id and body, signed afresh."""
    job_id = add_job(db, settings, JobState.SUCCEEDED)
    sender = settings.with_overrides(webhook_allow_private=True)
    sent = add_delivery(db, job_id, receiver.url)
    assert send_due(db, sender) == 1
    assert delivery(db, sent).state is DeliveryState.DELIVERED
    before = utcnow()

    page = post(admin, f"{PAGE}deliveries/{sent}/redeliver")
    row = delivery(db, sent)
    assert f"Delivery {row.msg_id} (job.succeeded) is due again" in page
    assert row.state is DeliveryState.PENDING and row.next_try_at <= utcnow()
    assert row.redeliveries == 1 and row.redelivered_at and row.redelivered_at >= before
    assert "redelivered 1×" in page
    assert send_due(db, sender) == 1

    first, again = receiver.received()
    assert again.msg_id == first.msg_id and again.body == first.body
    with db.begin() as session:
        key = secret_for(session, LOCAL_OWNER)
    for got in (first, again):
        Webhook(key).verify(got.body, got.headers)
    row = delivery(db, sent)
    assert row.state is DeliveryState.DELIVERED and row.attempts == 2 and row.last_status == 204
    assert signed_headers(key, row.msg_id, row.payload)["webhook-id"] == first.msg_id


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_disable_and_enable_an_endpoint(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """Disable: its pending deliveries are canceled and a redelivery to it is refused with
    the reason; enabled again, a redelivery goes."""
    hook = endpoint(db, "https://hooks.example.com/b")
    job_id = add_job(db, settings, JobState.SUCCEEDED)
    waiting = add_delivery(db, job_id, "https://hooks.example.com/b", endpoint_id=hook)

    page = post(admin, f"{PAGE}endpoints/{hook}/disable")
    assert f'id="endpoint-{hook}" class="endpoint-disabled"' in page
    assert "disabled by an admin" in page
    assert delivery(db, waiting).state is DeliveryState.CANCELED
    page = post(admin, f"{PAGE}deliveries/{waiting}/redeliver")
    assert f"Not redelivered: Delivery {delivery(db, waiting).msg_id} goes to endpoint" in page
    assert "enable it first" in page
    assert delivery(db, waiting).state is DeliveryState.CANCELED

    page = post(admin, f"{PAGE}endpoints/{hook}/enable")
    with db.session() as session:
        row = session.get(WebhookEndpoint, hook)
        assert row is not None and row.disabled_at is None and row.disabled_reason is None
    assert f'id="endpoint-{hook}" class="endpoint-enabled"' in page
    post(admin, f"{PAGE}deliveries/{waiting}/redeliver")
    assert delivery(db, waiting).state is DeliveryState.PENDING


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_jobs_page_shows_its_deliveries_and_redelivers_back_to_it(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """The job's admin page lists its deliveries (only its own), each with Redeliver, which
    comes back to the job's page."""
    job_id = add_job(db, settings, JobState.FAILED)
    other = add_job(db, settings, JobState.FAILED)
    mine = add_delivery(
        db, job_id, "https://own.example.net/cb", state=DeliveryState.FAILED, attempts=9
    )
    theirs = add_delivery(db, other, "https://own.example.net/cb")
    job_page = f"/admin/jobs/{job_id}"
    page = html.unescape(admin.get(job_page).get_data(True))
    assert "Webhook deliveries (1)" in page and shown_ids(page) == [mine]
    assert delivery(db, mine).msg_id in page and delivery(db, theirs).msg_id not in page
    page = post(admin, f"{PAGE}deliveries/{mine}/redeliver", back=job_page)
    assert "is due again" in page and delivery(db, mine).state is DeliveryState.PENDING
    bare = html.unescape(admin.get(f"/admin/jobs/{add_job(db, settings)}").get_data(True))
    assert "Webhook deliveries (0)" in bare


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_forms_need_the_login_and_the_csrf_token(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """Without the token every POST is a 400 and changes nothing; logged out, the page and
    the forms lead to the login; an unknown delivery or endpoint is a 404."""
    hook = endpoint(db, "https://hooks.example.com/c")
    sent = add_delivery(
        db, add_job(db, settings), "https://own.example.net/cb", state=DeliveryState.FAILED
    )
    paths = [
        f"{PAGE}deliveries/{sent}/redeliver",
        f"{PAGE}endpoints/{hook}/disable",
        f"{PAGE}endpoints/{hook}/enable",
    ]
    for path in paths:
        for bad in ({}, {"csrf_token": "forged"}):
            assert admin.post(path, data=bad).status_code == 400
    assert delivery(db, sent).state is DeliveryState.FAILED
    for path in (f"{PAGE}deliveries/{sent + 99}/redeliver", f"{PAGE}endpoints/{hook + 9}/enable"):
        assert admin.post(path, data={"csrf_token": token(admin, PAGE)}).status_code == 404
    admin.post("/admin/logout", data={"csrf_token": token(admin, PAGE)})
    response = admin.get(PAGE)
    assert response.status_code == 302 and "/admin/login" in response.headers["Location"]
    csrf = token(admin)  # the login form's: a valid token, but no login
    assert admin.post(paths[0], data={"csrf_token": csrf}).status_code == 302
    assert delivery(db, sent).state is DeliveryState.FAILED
    assert uuid.UUID(str(delivery(db, sent).job_id))
