"""The online workers a web process keeps for the waiting reasons: read again once older
than their age limit, and still readable after the request that read them has ended."""

from __future__ import annotations

import time

from flask import Flask

from svdfarm.db import Database
from svdfarm.settings import Settings
from svdfarm.states import JobState
from tests.rows import add_job, add_worker, recorded_statements, set_owner
from web.recent_workers import RecentWorkers


def test_the_workers_are_read_again_once_too_old(db: Database, settings: Settings) -> None:
    """Within the age limit the same workers come back without a query; after it, a worker
    that came online since is there."""
    recent = RecentWorkers(max_age_s=0.2)
    add_worker(db, "a@host", heartbeat_age_s=1)
    with db.read_session() as session:
        first = recent.get(session, settings)
    add_worker(db, "b@host", heartbeat_age_s=1)
    with db.read_session() as session:
        assert recent.get(session, settings) is first  # not read again
    assert [w.hostname for w in first] == ["a@host"]  # readable, its session closed
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with db.read_session() as session:
            hostnames = [w.hostname for w in recent.get(session, settings)]
        if hostnames == ["a@host", "b@host"]:
            break
        time.sleep(0.05)
    assert hostnames == ["a@host", "b@host"]


def test_the_status_reads_the_workers_once_a_second(
    app: Flask, db: Database, settings: Settings
) -> None:
    """Status reads of a queued job in a row cost one read of the workers."""
    job_id = set_owner(db, add_job(db, settings, JobState.QUEUED, error_class=None, error=None))
    client = app.test_client()
    with recorded_statements(app.extensions["svdfarm.db"].engine) as seen:
        for _ in range(3):
            assert client.get(f"/api/v1/jobs/{job_id}").status_code == 200
    assert len([s for s in seen if "FROM workers" in s]) == 1, seen
