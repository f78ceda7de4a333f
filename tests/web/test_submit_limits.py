"""Submitting safely: Idempotency-Key retries, the per-client limit, the queue-full limit, and
a broker outage at submit time (the job is kept and published later). Real app, real rows."""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import update

from svdfarm.celery_app import create_celery
from svdfarm.db import Database
from svdfarm.models import Job, utcnow
from svdfarm.reaper import reap
from svdfarm.settings import Settings
from svdfarm.storage import FileStore
from tests.conftest import DATABASES
from tests.factories import png_bytes
from tests.rows import job_count
from web import create_app


def post(
    client: FlaskClient, key: str | None = None, seed: str | None = "1", addr: str = "127.0.0.1"
) -> Any:
    """POST a small job, with an Idempotency-Key when given (no seed field when None)."""
    headers = {"Idempotency-Key": key} if key is not None else {}
    fields = {"num_frames": "2", "num_inference_steps": "1"}
    if seed is not None:
        fields["seed"] = seed
    return client.post(
        "/api/v1/jobs",
        data={"image": (io.BytesIO(png_bytes()), "in.png"), **fields},
        headers=headers,
        content_type="multipart/form-data",
        environ_base={"REMOTE_ADDR": addr},
    )


@pytest.fixture
def app_with(settings: Settings) -> Iterator[Callable[..., Flask]]:
    """Make apps on the test's settings with some fields changed; closed at the end."""
    apps: list[Flask] = []

    def make(**changes: Any) -> Flask:
        app = create_app({"SVDFARM_SETTINGS": settings.with_overrides(**changes), "TESTING": True})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["svdfarm.db"].dispose()


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_retry_with_the_same_key_gets_the_same_job(app: Flask, client: FlaskClient) -> None:
    """Same key, same request: one job; the replay says so in a header."""
    key = str(uuid.uuid4())
    first = post(client, key)
    second = post(client, key)
    assert first.status_code == second.status_code == 201
    assert first.get_json()["id"] == second.get_json()["id"]
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Location"] == first.headers["Location"]
    assert job_count(app) == 1
    assert post(client, str(uuid.uuid4())).get_json()["id"] != first.get_json()["id"]
    assert job_count(app) == 2


def test_a_retry_without_a_seed_is_the_same_request(app: Flask, client: FlaskClient) -> None:
    """No seed sent: the job draws a random one, and a retry still matches (the fields as
    sent are compared, not the drawn seed)."""
    key = str(uuid.uuid4())
    first, second = post(client, key, seed=None), post(client, key, seed=None)
    assert (first.status_code, second.status_code) == (201, 201), second.get_json()
    assert first.get_json()["id"] == second.get_json()["id"]
    assert job_count(app) == 1


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_key_reused_for_another_request_is_refused(app: Flask, client: FlaskClient) -> None:
    """Same key, other settings: 422 with the reason, nothing new written."""
    key = "order-42"
    assert post(client, key, seed="1").status_code == 201
    response = post(client, key, seed="2")
    assert response.status_code == 422
    assert "already used for a different request" in response.get_json()["error"]
    assert job_count(app) == 1


@pytest.mark.parametrize("bad", ["", "x" * 256, "caf\u00e9", "a\tb"])
def test_a_malformed_key_is_refused(app: Flask, client: FlaskClient, bad: str) -> None:
    """Empty, too long, non-ASCII or control characters: 400 naming the header."""
    response = post(client, bad)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.get_json()["fields"]
    assert job_count(app) == 0


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_concurrent_retries_with_one_key_make_one_job(app: Flask) -> None:
    """Eight clients racing with the same key: all 201 with one id, one row."""
    key = str(uuid.uuid4())
    results: list[tuple[int, str]] = []
    barrier = threading.Barrier(8)

    def send() -> None:
        barrier.wait()
        response = post(app.test_client(), key)
        results.append((response.status_code, response.get_json().get("id", "")))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {status for status, _ in results} == {201}, results
    assert len({job_id for _, job_id in results}) == 1
    assert job_count(app) == 1


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_client_over_its_limit_gets_429_with_retry_after(
    app_with: Callable[..., Flask],
) -> None:
    """Three a minute: the fourth from the same address is refused, another address is not."""
    app = app_with(submit_rate_per_minute=3)
    client = app.test_client()
    assert [post(client, addr="10.0.0.1").status_code for _ in range(3)] == [201] * 3
    refused = post(client, addr="10.0.0.1")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "at most 3 per minute" in refused.get_json()["error"]
    assert post(client, addr="10.0.0.2").status_code == 201
    assert job_count(app) == 4
    # An idempotent retry of an accepted job is not a new submission: not limited.
    key = str(uuid.uuid4())
    assert post(client, key, addr="10.0.0.3").status_code == 201
    assert post(client, addr="10.0.0.3").status_code == 201
    assert post(client, addr="10.0.0.3").status_code == 201
    assert post(client, key, addr="10.0.0.3").status_code == 201
    assert post(client, addr="10.0.0.3").status_code == 429


def test_a_full_farm_answers_503_with_retry_after(app_with: Callable[..., Flask]) -> None:
    """Two jobs may wait: the third submission is refused until one leaves the queue."""
    app = app_with(max_queued_jobs=2, submit_rate_per_minute=0)
    client = app.test_client()
    assert [post(client).status_code for _ in range(2)] == [201, 201]
    refused = post(client)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "10"
    assert "farm is full" in refused.get_json()["error"]
    assert job_count(app) == 2


def test_a_nearly_full_store_answers_503_with_the_reason(
    app_with: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Less free space than SVDFARM_MIN_FREE_BYTES: 503, Retry-After and the figures, and
    nothing written; 0 turns the check off."""
    monkeypatch.setattr(FileStore, "free_bytes", lambda self: 5 * 2**20)
    app = app_with(min_free_bytes=2**30)
    client = app.test_client()
    refused = post(client)
    assert (refused.status_code, refused.headers["Retry-After"]) == (503, "60")
    error = refused.get_json()["error"]
    assert "5 MiB free" in error and "SVDFARM_MIN_FREE_BYTES" in error
    assert job_count(app) == 0
    assert post(app_with(min_free_bytes=0).test_client()).status_code == 201


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_broker_outage_at_submit_keeps_the_job_and_the_reaper_publishes_it(
    settings: Settings, db: Database, app_with: Callable[..., Flask]
) -> None:
    """Redis unreachable while submitting: 201, the job stays queued in the database; once
    the broker is back, the next dispatch pass (here the reaper's) puts it on the queue."""
    app = app_with(broker_url="redis://127.0.0.1:1/0")
    app.extensions["celery"].conf.broker_connection_timeout = 1
    app.extensions["celery"].conf.task_publish_retry_policy = {"max_retries": 0}
    response = post(app.test_client())
    assert response.status_code == 201, response.get_json()
    job_id = response.get_json()["id"]
    assert response.get_json()["state"] == "queued"
    # The broker "comes back": here, the embedded one the settings name.
    up = settings.with_overrides(reap_interval_s=1.0, heartbeat_interval_s=0.1)
    with db.begin() as session:  # older than the reaper's grace period
        session.execute(update(Job).values(updated_at=utcnow() - timedelta(minutes=1)))
    reaped = reap(db, up, create_celery(up))
    assert reaped.dispatched == [job_id] and reaped.republished == []
    names = [p.name for p in (up.broker_dir / "queue").glob("*.msg")]
    assert len(names) == 1
