"""Webhooks for real: jobs submitted to ``svdfarm web`` over HTTP with a ``webhook_url``, run
by a real ``svdfarm worker`` (the tiny model) whose sender loop POSTs the events to receivers
in this process, on PostgreSQL and Redis.

The in-process tests (tests/svdfarm/test_webhooks.py) drive the sender pass by pass with the
clock moved by hand; here nothing is driven: the worker's own loop sends, retries on its own
schedule (``SVDFARM_WEBHOOK_RETRY_SCALE``: 5 s, 5 min... become 0.05 s, 3 s...) and honours
``Retry-After``. Every request is verified with the ``standardwebhooks`` library against the
secret the API gives (``GET /api/v1/webhooks/secret``), and the README's ten-line receiver
is run as written, against the same deliveries.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook
from werkzeug.serving import make_server

from svdfarm.models import Job, WebhookDelivery
from svdfarm.states import JobState
from svdfarm.webhook_states import DeliveryState
from svdfarm.webhooks import add_endpoint, remove_endpoint
from tests.conftest import needs_postgres, needs_redis
from tests.factories import png_bytes
from tests.http import free_port, multipart
from tests.load import request
from tests.processes import WebAndWorker, web_and_worker
from tests.rows import LOCAL_OWNER, wait_until
from tests.webhook_receiver import Received, Receiver

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.redis,
    needs_postgres,
    needs_redis,
]

#: The farm's processes' settings: internal receivers allowed, retries a hundred times sooner.
FARM_ENV = {
    "SVDFARM_SECRET_KEY": "test-secret",
    "SVDFARM_WEBHOOK_ALLOW_PRIVATE": "1",
    "SVDFARM_WEBHOOK_RETRY_SCALE": "0.01",
    "SVDFARM_PROGRESS_INTERVAL": "0.2",
    "SVDFARM_HEARTBEAT_INTERVAL": "1",
    # Every tier on this machine's CPU worker, whatever memory it has.
    "SVDFARM_CAPABILITIES": '{"total_memory_bytes": 17000000000}',
}
#: Two tiny frames of 64 x 64, one step: a fraction of a second on a CPU.
FIELDS = {"num_frames": "2", "num_inference_steps": "1", "width": "64", "height": "64"}
EVENTS = ["job.queued", "job.started", "job.succeeded"]
README = Path(__file__).resolve().parents[1] / "README.md"


class Farm(WebAndWorker):
    """The web server and one worker on a fresh schema and a Redis database of their own,
    with this module's ways to use them."""

    def secret(self) -> str:
        """The signing secret of this client's owner, as the API gives it."""
        answer = request(self.port, "GET", "/api/v1/webhooks/secret")
        assert answer.status == 200, answer.body
        key = answer.json()["key"]
        assert isinstance(key, str) and key.startswith("whsec_")
        return key

    def submit(self, webhook_url: str) -> uuid.UUID:
        """Submit a tiny job through the API with its own ``webhook_url``; its id."""
        body, content_type = multipart({**FIELDS, "webhook_url": webhook_url}, png_bytes(64, 64))
        answer = request(self.port, "POST", "/api/v1/jobs", body, {"Content-Type": content_type})
        assert answer.status == 201, answer.body
        return uuid.UUID(answer.json()["id"])

    def deliveries(self, job_id: uuid.UUID) -> list[WebhookDelivery]:
        """The job's deliveries, oldest first."""
        with self.db.session() as session:
            stmt = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
            return list(session.scalars(stmt.order_by(WebhookDelivery.id)))

    def job_state(self, job_id: uuid.UUID) -> JobState | None:
        """The job's state now."""
        with self.db.session() as session:
            return session.scalar(select(Job.state).where(Job.id == job_id))

    def wait(self, predicate: Callable[[], object], what: str, timeout_s: float = 120) -> None:
        """Poll ``predicate`` until it holds, failing with the logs."""
        wait_until(predicate, what, timeout_s, self.logs)


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Farm]:
    """``svdfarm web`` and ``svdfarm worker`` with :data:`FARM_ENV`, shared by the module's
    tests (each job has receivers of its own)."""
    folder = tmp_path_factory.mktemp("webhooks-live")
    with web_and_worker(folder, tiny_model_dir, name="hooks", env=FARM_ENV) as found:
        yield Farm(found.settings, found.db, found.port, found.web, found.worker)


def verified(key: str, got: list[Received]) -> list[dict[str, Any]]:
    """Every request's payload, each signature verified (raises on the first that fails)."""
    return [Webhook(key).verify(r.body, r.headers) for r in got]


# ---- the README's receiver, run as written ---------------------------------------------------


def readme_receiver(key: str) -> tuple[Flask, list[str]]:
    """The README's receiver (its Webhooks section's Python block) with ``key`` for its
    placeholder secret; the app and the lines it prints."""
    text = README.read_text()
    section = text[text.index("## Webhooks") :]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "the README's Webhooks section has no Python block"
    code = found[1]
    assert code.count('"whsec_..."') == 1
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 10, f"the README's receiver is {len(lines)} lines, not ten"
    printed: list[str] = []

    def capture(*args: object) -> None:
        printed.append(" ".join(str(a) for a in args))

    names: dict[str, Any] = {"__name__": "readme_receiver", "print": capture}
    exec(compile(code.replace('"whsec_..."', repr(key)), str(README), "exec"), names)
    app = names["app"]
    assert isinstance(app, Flask)
    return app, printed


@pytest.fixture
def readme_served(farm: Farm) -> Iterator[tuple[str, list[str], Flask]]:
    """The README's receiver served on a free port (``/hook``) with this client's secret:
    its URL, the lines it printed and its app."""
    app, printed = readme_receiver(farm.secret())
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/hook", printed, app
    finally:
        server.shutdown()
        thread.join(10)


# ---- the tests -------------------------------------------------------------------------------


def test_a_jobs_events_arrive_signed_and_in_order_at_its_url_and_the_readme_receiver(
    farm: Farm, receiver: Receiver, readme_served: tuple[str, list[str], Flask]
) -> None:
    """job.queued, job.started, job.succeeded reach the job's own URL once each, in order,
    every signature good; the README's receiver (an endpoint of the same owner) prints them
    and refuses a forged one."""
    readme_url, printed, readme_app = readme_served
    with farm.db.begin() as session:
        hook = add_endpoint(session, owner=LOCAL_OWNER, url=readme_url, allow_private=True).id
    try:
        job_id = farm.submit(receiver.url)
        farm.wait(lambda: len(receiver.delivered()) >= 3, "three deliveries to the job's URL")
        farm.wait(lambda: len(printed) >= 3, "three deliveries to the README's receiver")
        farm.wait(
            lambda: all(d.state is DeliveryState.DELIVERED for d in farm.deliveries(job_id)),
            "every delivery of the job to be marked delivered",
        )
    finally:
        with farm.db.begin() as session:
            remove_endpoint(session, hook)
    got = receiver.received()
    payloads = verified(farm.secret(), got)
    assert [p["type"] for p in payloads] == EVENTS
    assert [p["data"]["state"] for p in payloads] == ["queued", "running", "succeeded"]
    assert all(p["data"]["id"] == str(job_id) for p in payloads)
    assert payloads[-1]["data"]["video_url"] == f"/jobs/{job_id}/video.mp4"
    assert len({r.msg_id for r in got}) == 3  # one webhook-id per event
    states = ("queued", "running", "succeeded")
    assert printed == [f"{t} {job_id} {s}" for t, s in zip(EVENTS, states, strict=True)]
    rows = farm.deliveries(job_id)
    assert len(rows) == 6 and all(d.attempts == 1 for d in rows)
    forged = json.dumps({"type": "job.succeeded", "data": {}})
    headers = {"webhook-id": "msg_x", "webhook-timestamp": got[0].headers["webhook-timestamp"]}
    headers["webhook-signature"] = "v1,AAAA"
    assert readme_app.test_client().post("/hook", data=forged, headers=headers).status_code == 400


def test_a_receiver_down_then_up_gets_each_event_once_in_order(farm: Farm) -> None:
    """The receiver refuses connections (two tries), then answers 503 with Retry-After: 1
    until the job has ended, then 204: each event arrives exactly once, in order; the later
    events wait for the first; every retry carries the first try's webhook-id."""
    receiver = Receiver(free_port())  # not listening yet: connection refused
    job_id = farm.submit(receiver.url)

    def queued_tries() -> int:
        """How many tries the job's first delivery has had."""
        found = farm.deliveries(job_id)
        return found[0].attempts if found else 0

    farm.wait(lambda: queued_tries() >= 2, "two refused tries of job.queued", 60)
    first = farm.deliveries(job_id)[0]
    assert first.state is DeliveryState.PENDING and first.last_status is None
    assert first.last_error

    receiver.answers = [(503, {"Retry-After": "1"})] * 1000
    receiver.start()
    try:
        farm.wait(lambda: farm.job_state(job_id) is JobState.SUCCEEDED, "the job to succeed")
        farm.wait(lambda: len(receiver.received()) >= 2, "two 503s")
        with receiver.lock:
            receiver.answers.clear()  # up: 204 from now on
        farm.wait(lambda: len(receiver.delivered()) >= 3, "the three events")
        farm.wait(
            lambda: all(d.state is DeliveryState.DELIVERED for d in farm.deliveries(job_id)),
            "every delivery to be marked delivered",
        )
    finally:
        receiver.stop()
    got = receiver.received()
    payloads = verified(farm.secret(), got)  # the refused tries aside, every request
    delivered = receiver.delivered()
    assert [r.type for r in delivered] == EVENTS
    assert len({r.msg_id for r in delivered}) == 3
    refused = [r for r in got if r.status == 503]
    assert len(refused) >= 2
    # Only the first event was tried while the receiver was down; the others waited for it.
    assert {r.msg_id for r in refused} == {first.msg_id} == {delivered[0].msg_id}
    assert [p["type"] for p in payloads] == ["job.queued"] * (len(refused) + 1) + EVENTS[1:]
    rows = farm.deliveries(job_id)
    assert [d.event_type.value for d in rows] == EVENTS
    assert rows[0].attempts == 2 + len(refused) + 1 and rows[0].last_status == 204
    assert [d.attempts for d in rows[1:]] == [1, 1]
