"""Server-sent events (web.streams): a job's events and progress live, resumed with
Last-Event-ID, the caller's jobs only; on SQLite (polled) and PostgreSQL (LISTEN/NOTIFY)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import update

from svdfarm import lifecycle
from svdfarm.db import Database
from svdfarm.feed import Feed
from svdfarm.lifecycle import By
from svdfarm.models import Job
from svdfarm.settings import Settings
from svdfarm.states import Actor, Phase
from tests.conftest import DATABASES
from tests.rows import submit_small_job
from tests.sse import Sse, SseReader

pytestmark = pytest.mark.parametrize("database_url", DATABASES, indirect=True)

STREAM = {"Accept": "text/event-stream"}
WORKER = By(Actor.WORKER, "gpu1@farm")


@pytest.fixture
def feed(app: Flask) -> Iterator[Feed]:
    """The app's live feed, stopped after the test."""
    found: Feed = app.extensions["svdfarm.feed"]
    yield found
    found.stop()


def open_stream(client: FlaskClient, path: str, **headers: str) -> SseReader:
    """Open ``path`` as an event stream; its events read in the background."""
    response = client.get(path, headers={**STREAM, **headers}, buffered=False)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    return SseReader(response.response)  # type: ignore[arg-type]


def claim(db: Database, settings: Settings, job_id: uuid.UUID) -> str:
    """Claim the job as a worker would; its claim token."""
    with db.begin() as session:
        found = lifecycle.claim(session, settings, job_id, by=WORKER)
    return found.token


def progress(db: Database, job_id: uuid.UUID, step: int) -> None:
    """Write a denoising step's progress as the worker does."""
    with db.begin() as session:
        lifecycle.progress(
            session, job_id, by=WORKER, phase=Phase.DENOISING, fraction=step / 4, step=step
        )


def succeed(db: Database, job_id: uuid.UUID, token: str) -> None:
    """Finish the job as the worker does."""
    with db.begin() as session:
        assert lifecycle.succeed(
            session, job_id, by=WORKER, token=token, values={"video_key": f"{job_id}/video.mp4"}
        )


def given_to_another_owner(db: Database, job_id: uuid.UUID) -> uuid.UUID:
    """Make the job someone else's (a user's, not the test client's)."""
    with db.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(owner="user:999"))
    return job_id


def types(events: list[Sse]) -> list[str]:
    """The lifecycle event types among ``events``."""
    return [e.data["type"] for e in events if e.event == "event"]


def test_a_job_stream_replays_then_follows_the_job_live_and_ends_with_it(
    client: FlaskClient, db: Database, settings: Settings, feed: Feed
) -> None:
    job_id = submit_small_job(db, settings)
    stream = open_stream(client, f"/api/v1/jobs/{job_id}/events")
    replayed = stream.until(lambda e: e.data.get("type") == "published")
    assert types(replayed) == ["submitted", "published"]
    assert all(e.id is not None and e.data["job"] == str(job_id) for e in replayed)
    assert stream.retry_ms == 3000
    assert feed.ready.wait(10)

    token = claim(db, settings, job_id)
    claimed = stream.until(lambda e: e.event == "event")
    assert claimed[-1].data["type"] == "claimed" and claimed[-1].data["state"] == "running"

    progress(db, job_id, 2)
    moved = stream.until(lambda e: e.event == "progress" and e.data["step"] == 2)
    assert moved[-1].data["phase"] == "denoising" and moved[-1].data["steps"] == 2
    assert moved[-1].data["phase_label"].startswith("Denoising")

    succeed(db, job_id, token)
    rest = stream.rest()
    assert types(rest)[-1] == "succeeded"  # the terminal event, then the end
    ids = [e.id for e in replayed + claimed + moved + rest if e.id is not None]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_last_event_id_resumes_without_losing_or_repeating_an_event(
    client: FlaskClient, db: Database, settings: Settings, feed: Feed
) -> None:
    job_id = submit_small_job(db, settings)
    first = open_stream(client, f"/api/v1/jobs/{job_id}/events")
    seen = first.until(lambda e: e.data.get("type") == "published")
    last = seen[-1].id
    assert last is not None
    # Disconnected: the job moves on meanwhile.
    token = claim(db, settings, job_id)
    progress(db, job_id, 1)
    again = open_stream(client, f"/api/v1/jobs/{job_id}/events", **{"Last-Event-ID": str(last)})
    resumed = again.until(lambda e: e.event == "progress")
    assert types(resumed) == ["claimed", "phase"]
    assert resumed[-1].data["step"] == 1
    succeed(db, job_id, token)
    assert types(again.rest()) == ["succeeded"]
    # ?after= does the same as the header.
    after = open_stream(client, f"/api/v1/jobs/{job_id}/events?after={last}")
    assert types(after.rest()) == ["claimed", "phase", "succeeded"]


def test_an_ended_job_with_nothing_new_answers_204_so_eventsource_stops(
    client: FlaskClient, db: Database, settings: Settings
) -> None:
    job_id = submit_small_job(db, settings)
    token = claim(db, settings, job_id)
    succeed(db, job_id, token)
    everything = open_stream(client, f"/api/v1/jobs/{job_id}/events").rest()
    assert types(everything)[-1] == "succeeded"
    last = everything[-1].id
    response = client.get(
        f"/api/v1/jobs/{job_id}/events", headers={**STREAM, "Last-Event-ID": str(last)}
    )
    assert response.status_code == 204


def test_an_ended_jobs_stream_ends_even_when_an_event_followed_its_end(
    client: FlaskClient, db: Database, settings: Settings
) -> None:
    """Retention's ``expired`` comes after the job's end: a new stream replays it and ends."""
    job_id = submit_small_job(db, settings)
    succeed(db, job_id, claim(db, settings, job_id))
    with db.begin() as session:
        finished = session.get(Job, job_id)
        assert finished is not None and finished.finished_at is not None
        assert lifecycle.expire(
            session,
            job_id,
            by=By(Actor.REAPER),
            outputs=True,
            inputs=False,
            files=[],
            seen_finished_at=finished.finished_at,
        )
    replayed = open_stream(client, f"/api/v1/jobs/{job_id}/events").rest(timeout_s=5)
    assert types(replayed)[-2:] == ["succeeded", "expired"]


def test_bad_last_event_id_is_refused_and_json_is_still_the_default(
    client: FlaskClient, db: Database, settings: Settings
) -> None:
    job_id = submit_small_job(db, settings)
    bad = client.get(f"/api/v1/jobs/{job_id}/events", headers={**STREAM, "Last-Event-ID": "x"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.get_json()["error"]
    plain = client.get(f"/api/v1/jobs/{job_id}/events")
    assert plain.mimetype == "application/json"
    assert [e["type"] for e in plain.get_json()["events"]] == ["submitted", "published"]


def test_the_caller_stream_carries_its_own_jobs_only(
    client: FlaskClient, db: Database, settings: Settings, feed: Feed
) -> None:
    theirs = given_to_another_owner(db, submit_small_job(db, settings))
    stream = open_stream(client, "/api/v1/events")
    assert feed.ready.wait(10)
    mine = submit_small_job(db, settings)
    token = claim(db, settings, theirs)
    succeed(db, theirs, token)
    token = claim(db, settings, mine)
    got = stream.until(lambda e: e.data.get("type") == "claimed")
    assert {e.data["job"] for e in got} == {str(mine)}
    assert types(got) == ["submitted", "published", "claimed"]


def test_the_caller_events_as_json_page_by_id_and_refuse_unknown_parameters(
    client: FlaskClient, db: Database, settings: Settings
) -> None:
    job_id = submit_small_job(db, settings)
    page = client.get("/api/v1/events?limit=1").get_json()
    assert [e["type"] for e in page["events"]] == ["submitted"]
    assert page["events"][0]["job"] == str(job_id)
    rest = client.get(f"/api/v1/events?after={page['last_id']}").get_json()
    assert [e["type"] for e in rest["events"]] == ["published"]
    refused = client.get("/api/v1/events?since=1")
    assert refused.status_code == 400 and "since" in refused.get_json()["fields"]
    assert client.get("/api/v1/events?limit=0").status_code == 400


def test_another_owners_job_stream_is_404(
    client: FlaskClient, db: Database, settings: Settings
) -> None:
    job_id = given_to_another_owner(db, submit_small_job(db, settings))
    response = client.get(f"/api/v1/jobs/{job_id}/events", headers=STREAM)
    assert response.status_code == 404
