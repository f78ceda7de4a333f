"""Webhooks (svdfarm.webhooks, svdfarm.webhook_sender): deliveries written with the job's
events, sent by the sender to a real HTTP receiver that verifies every signature with
``standardwebhooks``, retried across a receiver that is down, kept in order, stopped by a 410,
refused for internal addresses, never sent twice by two senders, and the API's secret route.
"""

from __future__ import annotations

import io
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from standardwebhooks.webhooks import Webhook

from svdfarm import lifecycle
from svdfarm.db import Database, upgrade
from svdfarm.jobs import validate_submission
from svdfarm.lifecycle import By
from svdfarm.models import Job, WebhookDelivery, WebhookEndpoint, utcnow
from svdfarm.params import ParamError
from svdfarm.settings import Settings
from svdfarm.states import Actor, Phase
from svdfarm.users import add_user, create_key
from svdfarm.webhook_http import post, retry_after_seconds
from svdfarm.webhook_sender import GIVE_UP_AFTER_S, RETRY_DELAYS_S, retry_delay, send_due
from svdfarm.webhook_states import DeliveryState, WebhookEvent
from svdfarm.webhook_urls import RefusedAddress, WebhookUrlError, check_url, resolve
from svdfarm.webhooks import add_endpoint, redeliver, secret_for
from tests.conftest import DATABASES, make_settings, needs_postgres
from tests.factories import png_bytes
from tests.http import free_port
from tests.rows import job_row
from tests.webhook_receiver import Received, Receiver, listening

API = By(Actor.API)
WORKER = By(Actor.WORKER, "w1@test")
OWNER = "user:7"
QUEUE = "svd.cpu.fp32.8g"


# ---- a real receiver (tests.webhook_receiver) and settings that may reach it ---------------


@pytest.fixture
def hook_settings(tmp_path: Path, database_url: str, tiny_model_dir: Path) -> Settings:
    """Settings that allow private webhook addresses (the receiver is on 127.0.0.1)."""
    result = make_settings(
        tmp_path / "var", database_url, tiny_model_dir, SVDFARM_WEBHOOK_ALLOW_PRIVATE="1"
    )
    upgrade(result.database_url)
    return result


@pytest.fixture
def hook_db(hook_settings: Settings) -> Iterator[Database]:
    """The database of :func:`hook_settings`."""
    database = Database(hook_settings.database_url)
    yield database
    database.dispose()


# ---- helpers ---------------------------------------------------------------------------------


def verify_all(db: Database, got: list[Received], owner: str = OWNER) -> list[dict[str, Any]]:
    """Every request's payload, each verified with the owner's secret (raises otherwise)."""
    with db.begin() as session:
        key = secret_for(session, owner)
    return [Webhook(key).verify(r.body, r.headers) for r in got]


def submit(db: Database, *, url: str | None = None, owner: str = OWNER) -> uuid.UUID:
    """A new queued job of ``owner`` with its own ``webhook_url``."""
    job_id = uuid.uuid4()
    with db.begin() as session:
        row = job_row(job_id, queue=QUEUE, owner=owner, webhook_url=url)
        lifecycle.submit(session, row, by=API)
    return job_id


def run_job(db: Database, settings: Settings, job_id: uuid.UUID) -> None:
    """Claim the job, move it to denoising, and succeed it."""
    with db.begin() as session:
        token = lifecycle.claim(session, settings, job_id, by=WORKER).token
    with db.begin() as session:
        lifecycle.progress(session, job_id, by=WORKER, phase=Phase.DENOISING, fraction=0.5, step=1)
    with db.begin() as session:
        values = {"video_key": f"{job_id}/video.mp4", "step": 2}
        assert lifecycle.succeed(session, job_id, by=WORKER, token=token, values=values)


def deliveries(db: Database, job_id: uuid.UUID | None = None) -> list[WebhookDelivery]:
    """The deliveries (of one job), oldest first."""
    with db.session() as session:
        stmt = select(WebhookDelivery).order_by(WebhookDelivery.id)
        if job_id is not None:
            stmt = stmt.where(WebhookDelivery.job_id == job_id)
        return list(session.scalars(stmt))


def make_due(db: Database) -> None:
    """Drive the clock: every pending delivery's next try is now past."""
    with db.begin() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.state == DeliveryState.PENDING)
            .values(next_try_at=utcnow() - timedelta(seconds=1))
        )


def drain(db: Database, settings: Settings, passes: int = 10) -> None:
    """Sender passes until one sends nothing."""
    for _ in range(passes):
        if not send_due(db, settings):
            return


# ---- delivered, signed, in order -------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_jobs_events_reach_its_url_and_its_owners_endpoint_signed_and_in_order(
    hook_db: Database, hook_settings: Settings, receiver: Receiver
) -> None:
    """The job's own URL gets queued, started, succeeded; an endpoint that opted into
    job.progress gets the phase too. Every signature verifies; the data is the job's JSON."""
    other = Receiver(free_port())
    other.start()
    try:
        with hook_db.begin() as session:
            add_endpoint(
                session, owner=OWNER, url=other.url, events=list(WebhookEvent), allow_private=True
            )
        job_id = submit(hook_db, url=receiver.url)
        run_job(hook_db, hook_settings, job_id)
        assert len(deliveries(hook_db, job_id)) == 3 + 4  # nothing sent from the moves
        assert receiver.got == [] and other.got == []
        drain(hook_db, hook_settings)
    finally:
        other.stop()
    own = verify_all(hook_db, receiver.got)
    assert [p["type"] for p in own] == ["job.queued", "job.started", "job.succeeded"]
    assert [p["type"] for p in verify_all(hook_db, other.got)] == [
        "job.queued",
        "job.started",
        "job.progress",
        "job.succeeded",
    ]
    assert receiver.got[0].path == "/hook?x=1"
    done = own[-1]["data"]
    assert done["id"] == str(job_id) and done["state"] == "succeeded" and done["phase"] == "done"
    assert done["video_url"] == f"/jobs/{job_id}/video.mp4" and done["progress"] == 1.0
    assert "owner" not in done and done["finished_at"] and done["created_at"]
    assert own[1]["data"]["state"] == "running"
    assert receiver.got[0].headers["content-type"] == "application/json"
    assert all(d.state is DeliveryState.DELIVERED for d in deliveries(hook_db, job_id))
    # A wrong secret does not verify.
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "A" * 44).verify(receiver.got[0].body, receiver.got[0].headers)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_deliveries_are_written_in_the_transaction_of_the_event(hook_db: Database) -> None:
    """A move rolled back leaves no delivery; committed, one per event and URL."""
    job_id = uuid.uuid4()
    with pytest.raises(RuntimeError), hook_db.begin() as session:
        row = job_row(job_id, queue=QUEUE, owner=OWNER, webhook_url="http://127.0.0.1:9/")
        lifecycle.submit(session, row, by=API)
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
        raise RuntimeError("the caller's transaction fails")
    assert deliveries(hook_db) == []
    kept = submit(hook_db, url="http://127.0.0.1:9/")
    with hook_db.begin() as session:
        assert lifecycle.cancel(session, kept, by=API) is not None
    assert [d.event_type for d in deliveries(hook_db, kept)] == [
        WebhookEvent.QUEUED,
        WebhookEvent.CANCELED,
    ]
    # An event no webhook tells of (published) makes none.
    other = submit(hook_db, url="http://127.0.0.1:9/")
    with hook_db.begin() as session:
        lifecycle.record(session, other, lifecycle.EventType.PUBLISHED, API)
    assert len(deliveries(hook_db, other)) == 1


# ---- retries, Retry-After, ordering, 410 -----------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_receiver_down_then_up_gets_each_event_once_and_in_order(
    hook_db: Database, hook_settings: Settings
) -> None:
    """Connection refused, then 503 with Retry-After, then up: each event arrives exactly once,
    in order; while the first waits for its retry the later ones are not sent."""
    receiver = Receiver(free_port())  # not listening: connection refused
    job_id = submit(hook_db, url=receiver.url)
    run_job(hook_db, hook_settings, job_id)
    assert send_due(hook_db, hook_settings) == 1
    first, *later = deliveries(hook_db, job_id)
    assert first.state is DeliveryState.PENDING and first.attempts == 1
    assert first.last_status is None and "Connection" in (first.last_error or "")
    wait = (first.next_try_at - utcnow()).total_seconds()
    assert RETRY_DELAYS_S[0] * 0.8 < wait < RETRY_DELAYS_S[0] * 1.2
    assert all(d.attempts == 0 for d in later)
    assert send_due(hook_db, hook_settings) == 0  # the first is not due; the rest wait for it

    receiver.answers = [(503, {"Retry-After": "120"})]
    receiver.start()
    try:
        make_due(hook_db)
        assert send_due(hook_db, hook_settings) == 1
        first = deliveries(hook_db, job_id)[0]
        assert first.state is DeliveryState.PENDING and first.last_status == 503
        assert 115 < (first.next_try_at - utcnow()).total_seconds() <= 120
        assert len(receiver.got) == 1
        make_due(hook_db)
        drain(hook_db, hook_settings)
    finally:
        receiver.stop()
    assert [r.type for r in receiver.delivered()] == ["job.queued", "job.started", "job.succeeded"]
    ids = [r.msg_id for r in receiver.got]
    assert ids[0] == ids[1]  # the same webhook-id on the retry
    assert len(set(r.msg_id for r in receiver.delivered())) == 3
    verify_all(hook_db, receiver.got)
    assert [d.attempts for d in deliveries(hook_db, job_id)] == [3, 1, 1]


def test_the_retry_schedule_backs_off_with_jitter_and_gives_up_after_three_days() -> None:
    """5 s, 5 min, 30 min, 2 h, 5 h, 10 h, then daily, each within 10 %; Retry-After read as
    seconds or a date."""
    for attempt, base in enumerate([*RETRY_DELAYS_S, 86400.0, 86400.0], start=1):
        waits = {retry_delay(attempt) for _ in range(20)}
        assert all(base * 0.9 <= w <= base * 1.1 for w in waits) and len(waits) > 1
    total = sum(RETRY_DELAYS_S) + 2 * 86400
    assert total < GIVE_UP_AFTER_S < total + 86400
    assert retry_after_seconds("30") == 30.0
    assert retry_after_seconds("nonsense") is None
    assert 0 <= (retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") or 0) == 0


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_an_old_delivery_that_fails_again_is_given_up(
    hook_db: Database, hook_settings: Settings
) -> None:
    """A failed try whose next one would come more than three days after the delivery was
    made is the last: the delivery fails."""
    job_id = submit(hook_db, url=Receiver(free_port()).url)
    with hook_db.begin() as session:
        session.execute(
            update(WebhookDelivery).values(created_at=utcnow() - timedelta(days=3, seconds=-2))
        )
    send_due(hook_db, hook_settings)
    (only,) = deliveries(hook_db, job_id)
    assert only.state is DeliveryState.FAILED and only.attempts == 1

    # Redelivered by an admin: its retries get three days from then.
    with hook_db.begin() as session:
        redeliver(session, only.id)
    send_due(hook_db, hook_settings)
    (only,) = deliveries(hook_db, job_id)
    assert only.state is DeliveryState.PENDING and only.attempts == 2
    assert only.redeliveries == 1 and only.msg_id == deliveries(hook_db, job_id)[0].msg_id


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_retry_scale_shortens_every_wait_but_not_retry_after(
    hook_db: Database, tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    """``SVDFARM_WEBHOOK_RETRY_SCALE=0.01``: the first wait is 0.05 s, not 5 s; a 503's
    Retry-After is still honoured as the receiver asked."""
    scaled = make_settings(
        tmp_path / "scaled",
        database_url,
        tiny_model_dir,
        SVDFARM_WEBHOOK_ALLOW_PRIVATE="1",
        SVDFARM_WEBHOOK_RETRY_SCALE="0.01",
    )
    assert scaled.webhook_retry_scale == 0.01
    assert 0.045 <= retry_delay(1, scale=0.01) <= 0.055
    refused = submit(hook_db, url=Receiver(free_port()).url)
    assert send_due(hook_db, scaled) == 1
    wait = (deliveries(hook_db, refused)[0].next_try_at - utcnow()).total_seconds()
    assert wait < 0.06
    with listening() as busy:
        busy.answers = [(503, {"Retry-After": "120"})]
        asked = submit(hook_db, url=busy.url)
        assert send_due(hook_db, scaled, limit=2) >= 1
    wait = (deliveries(hook_db, asked)[0].next_try_at - utcnow()).total_seconds()
    assert 115 < wait <= 120


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_410_disables_the_endpoint_and_stops_a_jobs_own_url(
    hook_db: Database, hook_settings: Settings, receiver: Receiver
) -> None:
    """An endpoint that answers 410 is disabled: its pending deliveries are canceled and new
    events make none; a job's own URL that answers 410 gets nothing more for that job."""
    with hook_db.begin() as session:
        endpoint = add_endpoint(session, owner=OWNER, url=receiver.url, allow_private=True).id
    gone_own = Receiver(free_port())
    gone_own.answers = [(410, {})]
    gone_own.start()
    receiver.answers = [(410, {})]
    try:
        job_id = submit(hook_db, url=gone_own.url)
        run_job(hook_db, hook_settings, job_id)
        drain(hook_db, hook_settings)
        assert len(receiver.got) == 1 and len(gone_own.got) == 1
        with hook_db.session() as session:
            row = session.get(WebhookEndpoint, endpoint)
            assert row is not None and row.disabled_at is not None
            assert "410" in (row.disabled_reason or "")
            job = session.get(Job, job_id)
            assert job is not None and job.webhook_url is None
        states = [(d.endpoint_id, d.state) for d in deliveries(hook_db, job_id)]
        assert states.count((endpoint, DeliveryState.FAILED)) == 1
        assert states.count((None, DeliveryState.FAILED)) == 1
        assert {s for _, s in states} == {DeliveryState.FAILED, DeliveryState.CANCELED}
        later = submit(hook_db)
        assert deliveries(hook_db, later) == []  # the endpoint is disabled
    finally:
        gone_own.stop()


# ---- server-side request forgery -------------------------------------------------------------


INTERNAL = ["127.0.0.1", "10.0.0.1", "169.254.169.254", "::1", "::ffff:10.0.0.1", "100.64.0.1"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/x",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8000/",
        "https://localhost/hook",
        "http://[::ffff:192.168.1.1]/",
    ],
)
def test_internal_addresses_are_refused_at_submit_unless_allowed(url: str) -> None:
    """A literal internal address (or localhost) is refused without DNS; allowed with
    SVDFARM_WEBHOOK_ALLOW_PRIVATE."""
    with pytest.raises(RefusedAddress, match="public addresses only"):
        check_url(url, allow_private=False)
    assert check_url(url, allow_private=True) == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://example.com/x", "http:// or https://"),
        ("http://user:pw@example.com/", "credentials"),
        ("https://example.com/" + "a" * 2000, "at most 2000"),
        ("http:///nohost", "http:// or https://"),
        ("http://example.com:99999/", "not a URL"),
    ],
)
def test_unusable_urls_are_refused_naming_the_problem(url: str, problem: str) -> None:
    """Scheme, credentials, length, host and port are checked at submit, allowed or not."""
    for allowed in (False, True):
        with pytest.raises(WebhookUrlError, match=problem):
            check_url(url, allow_private=allowed)
    assert check_url(" https://example.com/h?a=1 ", allow_private=False) == (
        "https://example.com/h?a=1"
    )


@pytest.mark.parametrize("address", INTERNAL)
def test_a_name_that_resolves_to_an_internal_address_is_refused_at_send_time(
    address: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolved at send time: any internal address refuses the name (nothing is sent); with
    allow_private the request goes to the address checked, with the name as its Host."""
    calls: list[str] = []

    def fake_getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        calls.append(host)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    url = f"http://hooks.example.com:{receiver.port}/in"
    answer = post(url, b"{}", {}, allow_private=False, timeout_s=2)
    assert answer.status is None and answer.error.startswith("refused")
    assert calls == ["hooks.example.com"] and receiver.got == []
    with pytest.raises(RefusedAddress):
        resolve("hooks.example.com", 80, allow_private=False)
    if address == "127.0.0.1":  # the receiver listens there
        answer = post(url, b"{}", {}, allow_private=True, timeout_s=2)
        assert answer.ok and answer.status == 204
        assert receiver.got[0].headers["host"] == f"hooks.example.com:{receiver.port}"


def test_one_internal_address_among_public_ones_refuses_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every address a name resolves to is checked, not only the first."""
    answers = [("93.184.216.34", 80), ("10.1.2.3", 80)]
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", x) for x in answers],
    )
    with pytest.raises(RefusedAddress, match="10.1.2.3"):
        resolve("mixed.example.com", 80, allow_private=False)


def test_localhost_is_refused_at_send_time_and_redirects_are_not_followed(
    receiver: Receiver,
) -> None:
    """The real resolver's ``localhost`` is refused without allow_private; a 3xx is a failed
    try, never followed."""
    url = f"http://localhost:{receiver.port}/"
    assert post(url, b"{}", {}, allow_private=False, timeout_s=2).error.startswith("refused")
    assert receiver.got == []
    receiver.answers = [(302, {"Location": "http://169.254.169.254/"})]
    answer = post(url, b"{}", {}, allow_private=True, timeout_s=2)
    assert answer.status == 302 and not answer.ok and len(receiver.got) == 1


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_sender_refuses_an_internal_url_unless_allowed(
    settings: Settings, db: Database, receiver: Receiver
) -> None:
    """A delivery to 127.0.0.1 (written past the submit check) is refused by the sender when
    private addresses are not allowed: a failed try, nothing sent."""
    assert not settings.webhook_allow_private
    job_id = submit(db, url=receiver.url)
    send_due(db, settings)
    (only,) = deliveries(db, job_id)
    assert only.state is DeliveryState.PENDING and "refused" in (only.last_error or "")
    assert receiver.got == []
    make_due(db)
    send_due(db, settings.with_overrides(webhook_allow_private=True))
    assert [r.type for r in receiver.delivered()] == ["job.queued"]


# ---- the submit field ------------------------------------------------------------------------


def test_webhook_url_is_validated_at_submit(settings: Settings, client: FlaskClient) -> None:
    """validate_submission names the field; the API answers 400 with fields.webhook_url, and
    keeps a good URL on the job."""
    with pytest.raises(ParamError) as refused:
        validate_submission(settings, {"webhook_url": "http://10.0.0.1/"}, png_bytes(), "a.png")
    assert set(refused.value.errors) == {"webhook_url"}
    allowed = settings.with_overrides(webhook_allow_private=True)
    made = validate_submission(allowed, {"webhook_url": "http://10.0.0.1/"}, png_bytes(), "a.png")
    assert made.webhook_url == "http://10.0.0.1/"

    def submit_api(url: str) -> Any:
        form = {"image": (io.BytesIO(png_bytes()), "in.png"), "webhook_url": url}
        return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")

    answer = submit_api("http://169.254.169.254/")
    assert answer.status_code == 400
    assert "webhook_url" in answer.get_json()["fields"]
    answer = submit_api("https://hooks.example.com/in")
    assert answer.status_code == 201
    with Database(settings.database_url).session() as session:
        job = session.get(Job, uuid.UUID(answer.get_json()["id"]))
        assert job is not None and job.webhook_url == "https://hooks.example.com/in"


# ---- two senders -----------------------------------------------------------------------------


@needs_postgres
@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_senders_on_postgresql_never_send_one_delivery_twice(
    hook_db: Database, hook_settings: Settings, receiver: Receiver
) -> None:
    """Two senders, each with its own connections, drain 8 jobs' deliveries at once: every
    webhook-id arrives exactly once, and each job's events in order."""
    receiver.delay_s = 0.02
    jobs = [submit(hook_db, url=receiver.url) for _ in range(8)]
    for job_id in jobs:
        run_job(hook_db, hook_settings, job_id)
    errors: list[BaseException] = []

    def sender() -> None:
        database = Database(hook_settings.database_url)
        try:
            for _ in range(200):
                if not send_due(database, hook_settings, limit=5):
                    with database.session() as session:
                        left = session.scalar(
                            select(func.count()).where(
                                WebhookDelivery.state == DeliveryState.PENDING
                            )
                        )
                    if not left:
                        return
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            database.dispose()

    threads = [threading.Thread(target=sender) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    ids = [r.msg_id for r in receiver.got]
    assert len(ids) == len(set(ids)) == 24
    by_job: dict[str, list[str]] = {}
    for payload in verify_all(hook_db, receiver.got):
        by_job.setdefault(payload["data"]["id"], []).append(payload["type"])
    assert all(t == ["job.queued", "job.started", "job.succeeded"] for t in by_job.values())


# ---- the secret route ------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_secret_route_gives_each_caller_its_own_owners_secret(
    tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    """Keys mode: 401 without a key; each user's key gets that user's secret, the same every
    time. Open mode: an anonymous API caller gets its address's owner's own secret."""
    from web import create_app

    keys = make_settings(tmp_path / "keys", database_url, tiny_model_dir, SVDFARM_AUTH="keys")
    upgrade(keys.database_url)
    app = create_app({"SVDFARM_SETTINGS": keys, "TESTING": True})
    db = Database(keys.database_url)
    try:
        with db.begin() as session:
            alice, bob = add_user(session, "alice"), add_user(session, "bob")
            alice_key = create_key(session, alice)[1]
            bob_key = create_key(session, bob)[1]
            owners = alice.owner, bob.owner
        client = app.test_client()
        refused = client.get("/api/v1/webhooks/secret")
        assert refused.status_code == 401 and "Bearer" in refused.headers["WWW-Authenticate"]

        def secret(key: str) -> str:
            answer = client.get(
                "/api/v1/webhooks/secret", headers={"Authorization": f"Bearer {key}"}
            )
            assert answer.status_code == 200, answer.get_data(as_text=True)
            return str(answer.get_json()["key"])

        first = secret(alice_key)
        assert first.startswith("whsec_") and secret(alice_key) == first
        assert secret(bob_key) != first
        with db.begin() as session:
            assert [secret_for(session, o) for o in owners] == [first, secret(bob_key)]

        opened = app.config["SVDFARM_SETTINGS"].with_overrides(auth=type(keys.auth)("open"))
        app.config["SVDFARM_SETTINGS"] = opened
        anonymous = app.test_client().get("/api/v1/webhooks/secret")
        assert anonymous.status_code == 200
        with db.begin() as session:
            assert anonymous.get_json()["key"] == secret_for(session, "addr:127.0.0.1")
    finally:
        app.extensions["svdfarm.db"].dispose()
        db.dispose()
