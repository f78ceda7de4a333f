"""The admin pages through the Flask client on real databases: login, rate limit, CSRF, the
failed-jobs list and its filters, a job's attempts, requeue / cancel / delete, the workers page.
"""

from __future__ import annotations

import html
import logging
import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from svdfarm.actions import FP32_DTYPES
from svdfarm.db import Database
from svdfarm.models import Attempt, utcnow
from svdfarm.settings import Settings, is_password_hash
from svdfarm.states import AttemptOutcome, ErrorClass, JobState, WorkerState
from tests.conftest import DATABASES
from tests.rows import (
    QUEUE,
    add_job,
    add_worker,
    broker_messages,
    read_job,
    recorded_statements,
    send_two_cancel_one,
)
from tests.web.admin_login import PASSWORD, admin_app, log_in, token
from web.auth import LoginLimiter, check_password, hash_password


@pytest.fixture
def app(settings: Settings, password_hash: str) -> Iterator[Flask]:
    """The web app with ``SVDFARM_ADMIN_PASSWORD`` set to a hash of :data:`PASSWORD`."""
    flask_app = admin_app(settings, password_hash)
    yield flask_app
    flask_app.extensions["svdfarm.db"].dispose()


@pytest.fixture
def admin(client: FlaskClient) -> FlaskClient:
    """A client logged in to the admin."""
    assert log_in(client).status_code == 303
    return client


def act(client: FlaskClient, action: str, ids: list[uuid.UUID], **fields: str) -> str:
    """POST a bulk action from the jobs list; returns the page it leads back to."""
    data: dict[str, object] = {
        "action": action,
        "job": [str(i) for i in ids],
        "csrf_token": token(client, "/admin/?state="),
        "next": "/admin/?state=",
        **fields,
    }
    response = client.post("/admin/jobs/actions", data=data)
    assert response.status_code == 303, response.get_data(True)
    assert response.headers["Location"] == "/admin/?state="
    return client.get(response.headers["Location"]).get_data(True)


def test_admin_is_disabled_without_a_password(settings: Settings) -> None:
    """Unset ``SVDFARM_ADMIN_PASSWORD``: every admin page is a 503 saying how to set it."""
    app = admin_app(settings, "")
    client = app.test_client()
    for path in ("/admin/", "/admin/login", "/admin/workers"):
        response = client.get(path)
        assert response.status_code == 503
        page = response.get_data(True)
        assert "SVDFARM_ADMIN_PASSWORD" in page and "svdfarm admin hash-password" in page
    assert client.post("/admin/login", data={"password": ""}).status_code == 503
    app.extensions["svdfarm.db"].dispose()


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_login_success_failure_and_logout(client: FlaskClient) -> None:
    """Pages redirect to the login; a wrong password is 401; the right one opens the admin."""
    response = client.get("/admin/workers")
    assert response.status_code == 302
    assert response.headers["Location"] == "/admin/login?next=/admin/workers"
    wrong = log_in(client, "guess")
    assert wrong.status_code == 401 and "Wrong password." in wrong.get_data(True)
    assert client.get("/admin/").status_code == 302
    right = log_in(client)
    assert right.status_code == 303 and right.headers["Location"] == "/admin/"
    cookie = right.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Expires=" in cookie
    assert client.get("/admin/").status_code == 200
    response = client.post("/admin/logout", data={"csrf_token": token(client, "/admin/")})
    assert response.status_code == 303
    assert client.get("/admin/").status_code == 302


def test_login_does_not_redirect_outside_the_admin(client: FlaskClient) -> None:
    """``next`` pointing elsewhere is replaced by the jobs list."""
    csrf = token(client)
    data = {"password": PASSWORD, "csrf_token": csrf, "next": "https://evil.example/"}
    response = client.post("/admin/login", data=data)
    assert response.headers["Location"] == "/admin/"


def test_plain_password_works_and_warns(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A value that is not a hash is a plain password, with a warning logged at setup."""
    with caplog.at_level(logging.WARNING, logger="web.auth"):
        app = admin_app(settings, "hunter2")
    assert "plain password, not a hash" in caplog.text
    client = app.test_client()
    assert log_in(client, "hunter").status_code == 401
    assert log_in(client, "hunter2").status_code == 303
    app.extensions["svdfarm.db"].dispose()


def test_login_rate_limit(client: FlaskClient) -> None:
    """Five failures from one address, then 429 with Retry-After even for the right password."""
    for _ in range(5):
        assert log_in(client, "guess").status_code == 401
    limited = log_in(client)
    assert limited.status_code == 429
    assert 0 < int(limited.headers["Retry-After"]) <= 15 * 60
    assert "Too many failed logins" in limited.get_data(True)
    other = client.application.test_client()
    assert log_in(other, REMOTE_ADDR="10.0.0.9").status_code == 303


def test_limiter_window_slides() -> None:
    """Failures older than the window stop counting; a success resets the client."""
    limiter = LoginLimiter(max_failures=2, window_s=60)
    limiter.failed("a", now=0)
    limiter.failed("a", now=10)
    assert limiter.retry_after("a", now=20) == 40
    assert limiter.retry_after("b", now=20) == 0
    assert limiter.retry_after("a", now=61) == 0
    limiter.failed("a", now=62)
    limiter.reset("a")
    assert limiter.retry_after("a", now=63) == 0


def test_password_hashes() -> None:
    """hash_password makes a werkzeug hash that check_password accepts; damage is refused."""
    hashed = hash_password("s3cret")
    assert hashed.startswith("scrypt:") and is_password_hash(hashed)
    assert check_password(hashed, "s3cret") and not check_password(hashed, "s3cre")
    assert not check_password("scrypt:broken$x$y", "s3cret")
    assert not check_password("", "") and not check_password("plain", "")
    with pytest.raises(ValueError, match="must not be empty"):
        hash_password("")


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_every_post_needs_the_csrf_token(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """Missing or wrong tokens are 400 on every POST route, and nothing changes."""
    job_id = add_job(db, settings)
    routes = {
        "/admin/login": {"password": PASSWORD},
        "/admin/logout": {},
        "/admin/jobs/actions": {"action": "delete", "job": str(job_id)},
    }
    for path, data in routes.items():
        for bad in ({}, {"csrf_token": "forged"}):
            response = admin.post(path, data={**data, **bad})
            assert response.status_code == 400, path
            assert "security token is" in response.get_data(True)
    assert read_job(db, job_id) is not None
    assert admin.get("/admin/").status_code == 200  # still logged in


#: The search's three ways to a page (web/admin.py ``index``), as (FOUND_CAP, SEARCH_WINDOW):
#: the few jobs found in the text indexes; a common text in the list's next jobs, read in
#: order; and, when those do not fill the page, every match.
SEARCH_WAYS = {"found": (1000, 2000), "in-order": (0, 1000), "every-match": (0, 1)}


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
@pytest.mark.parametrize("way", SEARCH_WAYS)
def test_filters_and_search(
    admin: FlaskClient, db: Database, settings: Settings, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed by default; state, error class, worker, model, dates and search narrow it, the
    search the same whichever way it reads."""
    cap, window = SEARCH_WAYS[way]
    monkeypatch.setattr("web.admin.FOUND_CAP", cap)
    monkeypatch.setattr("web.admin.SEARCH_WINDOW", window)
    now = utcnow()
    oom = add_job(db, settings, filename="beach.png")
    nan = add_job(
        db,
        settings,
        error_class=ErrorClass.NON_FINITE,
        worker="gpu2@farm",
        error="NaN in the VAE output",
        finished_at=now - timedelta(days=3),
    )
    other_model = add_job(db, settings, model="svd-custom", error="weird")
    canceled = add_job(db, settings, JobState.CANCELED, error=None)

    def shown(**args: str) -> set[uuid.UUID]:
        page = admin.get("/admin/", query_string=args).get_data(True)
        ids = {oom, nan, other_model, canceled}
        return {i for i in ids if f'name="job" value="{i}"' in page}

    assert shown() == {oom, nan, other_model}
    assert shown(state="") == {oom, nan, other_model, canceled}
    assert shown(state="canceled") == {canceled}
    assert shown(error_class="non_finite") == {nan}
    assert shown(worker="gpu2@farm") == {nan}
    assert shown(model="svd-custom") == {other_model}
    assert shown(since=(now - timedelta(days=1)).date().isoformat()) == {oom, other_model}
    assert shown(until=(now - timedelta(days=2)).date().isoformat()) == {nan}
    assert shown(q="nan in the vae") == {nan}
    assert shown(q="beach") == {oom}
    assert shown(q=str(other_model)) == {other_model}
    assert shown(q=str(nan)[:8]) == {nan}
    assert shown(q="100%_") == set()
    bad = admin.get("/admin/", query_string={"since": "yesterday", "state": "lost"})
    assert bad.status_code == 200 and "is not a date" in bad.get_data(True)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_row_shows_the_last_attempt_of_its_job(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """A job that failed twice: its row names the second attempt's worker, plan and error
    class, not the first attempt's."""
    job_id = add_job(db, settings, worker="first@farm")
    with db.begin() as session:
        session.add(
            Attempt(
                job_id=job_id,
                number=2,
                worker="second@farm",
                plan_name="fp32 everywhere on cuda",
                plan={"name": "fp32"},
                outcome=AttemptOutcome.FAILED,
                error_class=ErrorClass.NON_FINITE,
                message="NaN in the VAE output",
            )
        )
    lone = add_job(db, settings, JobState.CANCELED, error=None)
    page = admin.get("/admin/", query_string={"state": ""}).get_data(True)
    row = page[page.index(f'value="{job_id}"') :]
    row = row[: row.index("</tr>")]
    assert "second@farm" in row and "fp32 everywhere on cuda" in row, row
    assert "tag-non_finite" in row and "first@farm" not in row
    assert f'value="{lone}"' in page


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_detail_shows_every_attempt_with_traceback(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """Plan and reason, error class and type, message, traceback, worker, duration, memory."""
    job_id = add_job(db, settings, traceback="Traceback (most recent call last):\n<boom & bust>")
    page = admin.get(f"/admin/jobs/{job_id}").get_data(True)
    for text in (
        "fp16 unet+enc, fp32 vae, chunk 8 on cuda",
        "the card has no bf16",
        "out of memory",
        "torch.OutOfMemoryError",
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "gpu1@farm",
        "42.0 s",
        "14.25 GiB",
        '<pre class="traceback">Traceback (most recent call last):\n&lt;boom &amp; bust&gt;</pre>',
    ):
        assert text in page
    assert admin.get(f"/admin/jobs/{uuid.uuid4()}").status_code == 404


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_requeue_one_with_fp32_and_bulk_with_casts_off_and_a_queue(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """One click from the detail page, then several at once; each lands on its queue."""
    single = add_job(db, settings)
    csrf = token(admin, f"/admin/jobs/{single}")
    response = admin.post(
        "/admin/jobs/actions",
        data={
            "action": "requeue",
            "job": str(single),
            "force_fp32": "1",
            "csrf_token": csrf,
            "next": f"/admin/jobs/{single}",
        },
    )
    assert response.headers["Location"] == f"/admin/jobs/{single}"
    assert "requeued on svd." in admin.get(response.headers["Location"]).get_data(True)
    job = read_job(db, single)
    assert job is not None and job.state is JobState.QUEUED and job.dtypes == FP32_DTYPES
    assert broker_messages(settings) == [(job.queue, str(single))]

    bulk = [add_job(db, settings), add_job(db, settings, JobState.CANCELED)]
    running = add_job(db, settings, JobState.RUNNING)
    page = act(admin, "requeue", [*bulk, running], casts_off="1", queue="svd.cuda.bf16.40g")
    assert "2 of 3 jobs requeued." in page
    assert "is running: only failed or canceled jobs can be requeued" in page
    for job_id in bulk:
        job = read_job(db, job_id)
        assert job is not None
        # The class's bare name means its queue of the job's model.
        assert (job.state, job.casts, job.queue) == (
            JobState.QUEUED,
            False,
            "svd.cuda.bf16.40g.tiny",
        )
    assert broker_messages(settings)[1:] == [("svd.cuda.bf16.40g.tiny", str(i)) for i in bulk]


def test_requeue_with_a_bad_queue_changes_nothing(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """An invalid queue is refused with the scheme in the message."""
    job_id = add_job(db, settings)
    page = act(admin, "requeue", [job_id], queue="gpu-please")
    assert "Nothing was requeued:" in page and "is not an svdfarm queue" in page
    job = read_job(db, job_id)
    assert job is not None and job.state is JobState.FAILED
    assert broker_messages(settings) == []


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_cancel_and_delete(admin: FlaskClient, db: Database, settings: Settings) -> None:
    """Cancel a queued job; delete removes rows and files, refusing a running job."""
    queued = add_job(db, settings, JobState.QUEUED)
    assert "is canceled" in act(admin, "cancel", [queued])
    job = read_job(db, queued)
    assert job is not None and job.state is JobState.CANCELED
    assert "nothing to cancel" in act(admin, "cancel", [add_job(db, settings)])

    failed, running = add_job(db, settings), add_job(db, settings, JobState.RUNNING)
    page = act(admin, "delete", [failed, queued, running])
    assert "2 of 3 jobs deleted." in page and "cancel it and delete it" in page
    assert read_job(db, failed) is None and read_job(db, queued) is None
    assert not (settings.storage_dir / str(failed)).exists()
    assert (settings.storage_dir / str(running)).is_dir()
    assert "Select at least one job." in act(admin, "delete", [])


def test_delete_from_the_detail_page_goes_back_to_the_list(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """The deleted job's page is gone, so the action leads to the list."""
    job_id = add_job(db, settings)
    data = {
        "action": "delete",
        "job": str(job_id),
        "csrf_token": token(admin, f"/admin/jobs/{job_id}"),
        "next": f"/admin/jobs/{job_id}",
    }
    response = admin.post("/admin/jobs/actions", data=data)
    assert response.headers["Location"] == "/admin/"


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_workers_page(admin: FlaskClient, db: Database, settings: Settings) -> None:
    """A worker row with its state, heartbeat, job and the model it holds loaded; queue
    depths; failures by class."""
    job_id = add_job(db, settings, JobState.RUNNING)
    add_worker(
        db,
        "gpu1@farm",
        [QUEUE, "svd.cuda.fp32.16g"],
        heartbeat_age_s=4,
        state=WorkerState.BUSY,
        current_job_id=job_id,
        capabilities={
            "device": "cuda",
            "name": "Tesla T4",
            "count": 1,
            "fp16": True,
            "total_memory_bytes": 15_835_660_288,
            "models": ["tiny", "svd-xt"],
        },
        loaded_model="tiny",
    )
    add_worker(db, "old@farm", [QUEUE], heartbeat_age_s=3600, capabilities={"device": "cpu"})
    add_job(db, settings)
    add_job(db, settings, error_class=ErrorClass.NON_FINITE)
    add_job(db, settings, finished_at=utcnow() - timedelta(days=2))
    act(admin, "requeue", [add_job(db, settings)])
    page = admin.get("/admin/workers").get_data(True)
    assert '<tr class="worker-busy">' in page and "<code>gpu1@farm</code>" in page
    assert "Tesla T4" in page and "14.75 GiB" in page
    # 4 s old when written; the setup between may take seconds on a loaded machine.
    assert re.search(r"<td>([4-9]|1\d)\.\d s ago</td>", page), page.split('id="workers"')[1][:1500]
    assert f'href="/admin/jobs/{job_id}"' in page
    # The model its render process holds (the dispatcher sends that model's jobs there).
    assert (
        '<td class="loaded-model"><code>tiny</code><br>' in page and "serves tiny, svd-xt" in page
    )
    assert '<td class="loaded-model"><span class="muted">none</span></td>' in page
    assert '<tr class="worker-offline">' in page and "<code>old@farm</code>" in page
    queues = page.split('id="queues"')[1].split("</table>")[0]
    assert f'<code>{QUEUE}</code></td><td class="num">1</td><td class="num">1</td>' in queues
    failures = page.split('id="failures"')[1].split("</table>")[0]
    assert failures.index("out of memory") < failures.index("non finite")
    assert '<td class="num">2</td>' in failures and '<td class="num">1</td>' in failures


def test_a_canceled_jobs_message_is_not_waiting_on_the_workers_page(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """Two jobs sent to a queue, one canceled while queued: its message stays in the broker
    until a worker drops it, but the page counts one message waiting and one queued job."""

    kept, canceled = send_two_cancel_one(db, settings)
    assert len(broker_messages(settings)) == 2
    page = admin.get("/admin/workers").get_data(True)
    queues = page.split('id="queues"')[1].split("</table>")[0]
    assert f'<code>{QUEUE}</code></td><td class="num">1</td><td class="num">1</td>' in queues


def test_pages_of_fifty(admin: FlaskClient, db: Database, settings: Settings) -> None:
    """More than a page of failed jobs: the newest 50 first, the rest through "older", and
    back through "newer"; each page read from its edge (no OFFSET, no count)."""
    for _ in range(51):
        add_job(db, settings)
    first = admin.get("/admin/").get_data(True)
    assert first.count('name="job" value=') == 50
    assert "&larr; newer" not in first
    older = re.search(r'href="([^"]+)" rel="next"', first)
    assert older, first
    second = admin.get(html.unescape(older[1])).get_data(True)
    assert second.count('name="job" value=') == 1 and 'rel="next"' not in second
    newer = re.search(r'href="([^"]+)" rel="prev"', second)
    assert newer, second
    back = admin.get(html.unescape(newer[1])).get_data(True)
    ids = re.findall(r'name="job" value="([^"]+)"', back)
    assert ids == re.findall(r'name="job" value="([^"]+)"', first)
    assert 'rel="prev"' not in back
    mangled = admin.get("/admin/?before=yesterday").get_data(True)
    assert "is not a page mark" in mangled and mangled.count('name="job" value=') == 50


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_list_reads_the_same_statements_for_any_number_of_rows(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """A page of the list is a fixed set of statements whatever its rows (no lazy load per
    row), and none reads the jobs' parameters or the attempts' plans and tracebacks: a row
    shows none of them."""
    engine = admin.application.extensions["svdfarm.db"].engine

    def statements() -> list[str]:
        with recorded_statements(engine) as seen:
            assert admin.get("/admin/").status_code == 200
        return seen

    add_job(db, settings)
    statements()  # the first visit also records the admin's user row
    one = statements()
    for _ in range(4):
        add_job(db, settings)
    five = statements()
    assert one and len(five) == len(one), five
    listed = " ".join(five)
    assert "attempts.traceback" not in listed and "attempts.plan," not in listed, listed
    assert "jobs.num_frames" not in listed, listed


def test_workers_page_with_no_worker_and_no_broker(
    admin: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty farm says how to start a worker; a dead broker is named, not a 500."""
    from svdfarm.depths import BrokerUnavailable

    def down(*_: object, **__: object) -> dict[str, int]:
        raise BrokerUnavailable("The broker at redis://nowhere could not be reached")

    monkeypatch.setattr("web.admin.queue_depths", down)
    response = admin.get("/admin/workers")
    page = response.get_data(True)
    assert response.status_code == 200
    assert "No worker has registered yet" in page and "redis://nowhere" in page
    assert "No failed attempt in the last 24 hours." in page


def test_the_state_filters_any_is_every_state(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """``?state=any``, the value of the dropdown's "any", lists every state without calling it
    unknown; the dropdown sends it and keeps it selected."""
    failed, canceled = add_job(db, settings), add_job(db, settings, JobState.CANCELED, error=None)
    page = admin.get("/admin/?state=any").get_data(True)
    assert "Unknown state" not in page
    assert f'value="{failed}"' in page and f'value="{canceled}"' in page
    assert '<option value="any" selected>any</option>' in page
    assert "All jobs" in page


def flashes(page: str) -> list[str]:
    """The flash messages of an admin page, as HTML."""
    return re.findall(r'<p class="flash flash-\w+">(.*?)</p>', page, re.DOTALL)


def test_a_requeue_flash_links_to_the_job(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """After a requeue the message links the job's admin page and its status page, to follow
    it; a bulk requeue links each requeued job."""
    single = add_job(db, settings)
    [message] = flashes(act(admin, "requeue", [single]))
    assert f"Job {single} requeued on" in message
    assert f'<a href="/admin/jobs/{single}">{str(single)[:8]}</a>' in message
    assert f'<a href="/jobs/{single}">status page</a>' in message

    bulk = [add_job(db, settings), add_job(db, settings)]
    running = add_job(db, settings, JobState.RUNNING)
    shown = flashes(act(admin, "requeue", [*bulk, running]))
    assert shown[0].startswith("2 of 3 jobs requeued. Open: ")
    for job_id in bulk:
        assert f'<a href="/jobs/{job_id}">status page</a>' in shown[0]
    assert f'href="/jobs/{running}"' not in shown[0]  # not requeued: not linked


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_force_fp32_keeps_the_asked_precision_and_shows_the_override(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """ "force fp32" sets every component's dtype and an fp32 queue, but the precision the user
    asked for stays; the status page shows the override as one, and so does its timeline."""
    job_id = add_job(db, settings)
    before = read_job(db, job_id)
    assert before is not None and before.precision == "auto"
    act(admin, "requeue", [job_id], force_fp32="1")
    job = read_job(db, job_id)
    assert job is not None and job.state is JobState.QUEUED
    assert (job.precision, job.dtypes) == ("auto", FP32_DTYPES)
    assert job.queue.split(".")[2] == "fp32"  # routed as fp32 all the same

    page = admin.get(f"/jobs/{job_id}").get_data(True)
    assert '<dt title="precision">Precision</dt><dd>auto</dd>' in page
    assert '<dd id="overrides">fp32 for every component' in page
    assert f"Queued again (fp32 for every component, on {job.queue})" in page
    assert admin.get(f"/api/v1/jobs/{job_id}").get_json()["params"]["precision"] == "auto"


def test_the_admin_page_keeps_the_whole_error(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """The public pages hide server paths in an error; the admin job page shows all of it."""
    error = "Could not load model 'x' (hf download x, cache /root/.cache/huggingface/hub)."
    job_id = add_job(db, settings, error_class=ErrorClass.MODEL_UNAVAILABLE, error=error)
    page = admin.get(f"/admin/jobs/{job_id}").get_data(True)
    assert "cache /root/.cache/huggingface/hub)" in page
    assert "/root/.cache" not in admin.get(f"/jobs/{job_id}").get_data(True)


@pytest.mark.parametrize("database_url", DATABASES[1:], indirect=True)
def test_the_list_reads_indexes_not_every_row(db: Database) -> None:
    """On PostgreSQL with a history of 30,000 jobs (bench.history's fixture), every filter
    of the admin's list, its search and its lists of workers and models read through
    indexes: no plan scans all of ``jobs`` or ``attempts``, and no list is sorted."""
    from sqlalchemy import text
    from sqlalchemy.dialects import postgresql
    from werkzeug.datastructures import MultiDict

    from bench.history import fill
    from svdfarm.models import Attempt, Job
    from web.admin import (
        FOUND_CAP,
        PAGE_SIZE,
        Filters,
        _text_queries,
        distinct_query,
        filtered_jobs,
    )

    fill(db.engine, 30_000)

    def plan(stmt: Any) -> str:
        sql = stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
        with db.engine.connect() as conn:
            return "\n".join(conn.execute(text(f"EXPLAIN {sql}")).scalars())

    week_ago = (utcnow() - timedelta(days=7)).date().isoformat()
    for query in (
        "",
        "state=any",
        "error_class=out_of_memory",
        "state=any&error_class=out_of_memory",
        "model=tiny",
        f"since={week_ago}",
        "state=any&before=1764300000000000_ffffffffffffffffffffffffffffffff",
        "state=any&q=2f3a",
    ):
        filters, problems = Filters.from_args(
            MultiDict(p.split("=", 1) for p in query.split("&") if p)
        )
        assert not problems
        shown = plan(filtered_jobs(filters).limit(PAGE_SIZE + 1))
        assert "Seq Scan" not in shown, (query, shown)
        # Read in the list's order from an index: nothing to sort (a filter the planner
        # thinks rare, error class or search, may be read first and its few rows sorted).
        if not (filters.q or filters.error_class):
            assert "Sort" not in shown, (query, shown)
    for found in _text_queries("picture-4242"):
        shown = plan(found.limit(FOUND_CAP + 1))
        assert "Seq Scan" not in shown and "_trgm" in shown, shown
    for column in (Attempt.worker, Job.model):
        shown = plan(distinct_query(column))
        assert "Seq Scan on jobs" not in shown and "Seq Scan on attempts" not in shown, shown


#: The tables that grow with the history: no query may read all of one.
GROWING = ("jobs", "attempts", "job_events")


@pytest.mark.parametrize("database_url", DATABASES[1:], indirect=True)
def test_every_query_of_the_pages_and_passes_reads_an_index(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """With 30,000 jobs of history on PostgreSQL, every SELECT that the pages (status, form,
    My jobs, the admin's list, job and workers, /metrics) and the background passes (the
    reaper's, with retention's sweep) send is planned without a sequential scan of a table
    that grows with the history."""
    from sqlalchemy import event, text
    from sqlalchemy.engine import Engine

    from bench.history import fill
    from svdfarm.reaper import reap

    fill(db.engine, 30_000)
    with db.session() as session:
        job_id = session.scalar(text("SELECT id FROM jobs WHERE state = 'failed' LIMIT 1"))
    sent: list[tuple[str, Any]] = []

    def keep(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            sent.append((statement, params))

    event.listen(Engine, "before_cursor_execute", keep)
    try:
        for path in (
            f"/api/v1/jobs/{job_id}",
            f"/jobs/{job_id}",
            f"/api/v1/jobs/{job_id}/events",
            "/",
            "/jobs",
            "/admin/",
            "/admin/?state=any&worker=worker3%40bench",
            "/admin/?state=any&model=tiny",
            "/admin/?q=picture-4242",
            f"/admin/jobs/{job_id}",
            "/admin/workers",
            "/metrics",
        ):
            assert admin.get(path).status_code == 200, path
        reap(db, settings.with_overrides(retention_s=3650 * 86400.0))
    finally:
        event.remove(Engine, "before_cursor_execute", keep)
    assert len(sent) > 20
    with db.engine.connect() as conn:
        for statement, params in sent:
            plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {statement}", params).scalars())
            for table in GROWING:
                assert f"Seq Scan on {table}" not in plan, f"{statement}\n{params}\n{plan}"


def _flag(db: Database, settings: Settings, hostname: str) -> list[uuid.UUID]:
    """Three jobs failed in a row on ``hostname`` with a full disk, and the worker flagged
    for them (svdfarm.worker_health); their ids."""
    from svdfarm.worker_health import check_worker

    add_worker(db, hostname, [QUEUE])
    jobs = [
        add_job(
            db,
            settings,
            error_class=ErrorClass.STORAGE,
            worker=hostname,
            error="No space left on device <scratch>",
            finished_at=utcnow() - timedelta(minutes=m),
        )
        for m in (30, 20, 10)
    ]
    with db.begin() as session:
        assert check_worker(session, hostname) is not None
    return jobs


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_flagged_worker_is_shown_and_its_flag_cleared(
    admin: FlaskClient, db: Database, settings: Settings
) -> None:
    """The workers page shows the flag, its reason (the errors, escaped; the jobs linked) and
    a Clear flag button; the POST needs the CSRF token, then clears it and says so."""
    from svdfarm.models import Worker

    jobs = _flag(db, settings, "gpu1@farm")
    add_worker(db, "gpu2@farm", [QUEUE])
    page = admin.get("/admin/workers").get_data(True)
    flag = page.split('id="flag-gpu1@farm"')[1].split("</tr>")[0]
    assert page.count("worker-flagged") == 1 and ">Flagged</span>" in page
    assert "3 jobs in a row failed here with storage errors" in flag
    assert "No space left on device &lt;scratch&gt;" in flag
    for job_id in jobs:
        assert f'href="/admin/jobs/{job_id}"' in flag
    assert 'action="/admin/workers/gpu1@farm/clear-flag"' in flag and "Clear flag" in flag
    for bad in ({}, {"csrf_token": "forged"}):
        assert admin.post("/admin/workers/gpu1@farm/clear-flag", data=bad).status_code == 400
    with db.session() as session:
        row = session.get(Worker, "gpu1@farm")
        assert row is not None and row.flagged_at is not None
    response = admin.post(
        "/admin/workers/gpu1@farm/clear-flag",
        data={"csrf_token": token(admin, "/admin/workers")},
    )
    assert response.status_code == 303 and response.headers["Location"] == "/admin/workers"
    page = admin.get("/admin/workers").get_data(True)
    assert "The flag of gpu1@farm is cleared" in page
    assert "worker-flagged" not in page and 'id="flag-gpu1@farm"' not in page
    with db.session() as session:
        row = session.get(Worker, "gpu1@farm")
        assert row is not None and row.flagged_at is None
    again = admin.post(
        "/admin/workers/gpu1@farm/clear-flag",
        data={"csrf_token": token(admin, "/admin/workers")},
    )
    assert again.status_code == 303
    assert "gpu1@farm was not flagged." in admin.get("/admin/workers").get_data(True)
