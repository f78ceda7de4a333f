"""Retention on a fast clock: ended jobs' outputs and inputs deleted past their time (the job's
``finished_at`` set in the past, never a sleep), marked expired with an event, once; the API
and the status page say so; one sweeper at a time on PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import text

from svdfarm import lifecycle
from svdfarm.db import Database
from svdfarm.lifecycle import By
from svdfarm.models import utcnow
from svdfarm.reaper import reap
from svdfarm.retention import SWEEP_LOCK, sweep
from svdfarm.settings import Settings
from svdfarm.states import Actor, EventType, JobState
from tests.conftest import DATABASES
from tests.rows import ended_job, read_job, stored_names
from web import create_app

REAPER = By(Actor.REAPER, "w1@test")
HOUR = timedelta(hours=1)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_outputs_past_retention_go_and_the_job_says_so(db: Database, settings: Settings) -> None:
    """With SVDFARM_RETENTION=1h a job that ended 2 h ago loses its video and poster (its
    input stays), keeps its state and gets one ``expired`` event naming the files; a job that
    ended 10 min ago keeps everything; a second pass does nothing."""
    settings = settings.with_overrides(retention_s=3600.0)
    old, recent = ended_job(db, settings, 2 * HOUR), ended_job(db, settings, timedelta(minutes=10))
    swept = sweep(db, settings, by=REAPER)
    assert swept.expired == [str(old)] and swept.inputs == []
    assert sorted(swept.files) == [f"{old}/poster.png", f"{old}/video.mp4"]
    assert stored_names(settings, old) == ["input.png"]
    assert stored_names(settings, recent) == ["input.png", "poster.png", "video.mp4"]
    job = read_job(db, old)
    assert job is not None and job.state is JobState.SUCCEEDED and job.expired_at is not None
    with db.session() as session:
        events = lifecycle.events_of(session, old)
    assert [e.type for e in events] == [EventType.EXPIRED]
    assert sorted(events[0].details["files"]) == sorted(swept.files)
    assert events[0].actor_kind is Actor.REAPER
    assert not sweep(db, settings, by=REAPER)


def test_inputs_have_their_own_retention(db: Database, settings: Settings) -> None:
    """SVDFARM_INPUT_RETENTION alone deletes the input and keeps the outputs; once both are
    gone the job's folder goes too."""
    settings = settings.with_overrides(input_retention_s=3600.0)
    job_id = ended_job(db, settings, 2 * HOUR)
    swept = sweep(db, settings, by=REAPER)
    assert (swept.expired, swept.inputs) == ([], [str(job_id)])
    assert stored_names(settings, job_id) == ["poster.png", "video.mp4"]
    job = read_job(db, job_id)
    assert job is not None and job.input_expired_at is not None and job.expired_at is None
    both = settings.with_overrides(retention_s=3600.0)
    assert sweep(db, both, by=REAPER).expired == [str(job_id)]
    assert not (both.storage_dir / str(job_id)).exists()


def test_a_dry_run_deletes_nothing(db: Database, settings: Settings) -> None:
    """``dry_run`` lists what would go and changes no file and no row."""
    settings = settings.with_overrides(retention_s=60.0)
    job_id = ended_job(db, settings, HOUR)
    swept = sweep(db, settings, by=REAPER, dry_run=True)
    assert swept.expired == [str(job_id)] and swept.dry_run
    assert stored_names(settings, job_id) == ["input.png", "poster.png", "video.mp4"]
    job = read_job(db, job_id)
    assert job is not None and job.expired_at is None


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "sweep"])
def test_a_pass_reads_the_due_jobs_a_batch_at_a_time(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch, dry_run: bool
) -> None:
    """More jobs due than a batch: the pass goes on from where each batch ended, takes every
    one once, oldest first, and leaves the job not yet due."""
    monkeypatch.setattr("svdfarm.retention.SWEEP_BATCH", 2)
    settings = settings.with_overrides(retention_s=3600.0)
    due = [ended_job(db, settings, (10 - n) * HOUR) for n in range(5)]
    kept = ended_job(db, settings, timedelta(minutes=5))
    swept = sweep(db, settings, by=REAPER, dry_run=dry_run)
    assert swept.expired == [str(job_id) for job_id in due]
    assert str(kept) not in swept.expired


def test_retention_off_keeps_everything(db: Database, settings: Settings) -> None:
    """The default (0) keeps files forever, and the pass says why it did nothing."""
    job_id = ended_job(db, settings, 1000 * HOUR)
    swept = sweep(db, settings, by=REAPER)
    assert not swept and "retention is off" in swept.skipped
    assert stored_names(settings, job_id) == ["input.png", "poster.png", "video.mp4"]


@pytest.mark.parametrize("database_url", DATABASES[1:], indirect=True)
def test_one_sweeper_at_a_time_on_postgresql(db: Database, settings: Settings) -> None:
    """While another session holds the sweep's advisory lock, a pass skips; then it runs."""
    settings = settings.with_overrides(retention_s=60.0)
    job_id = ended_job(db, settings, HOUR)
    with db.engine.connect() as other:
        other.execute(text("SELECT pg_advisory_lock(hashtext(:k))"), {"k": SWEEP_LOCK})
        busy = sweep(db, settings, by=REAPER)
        other.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": SWEEP_LOCK})
        other.commit()
    assert not busy and busy.skipped == "another sweeper is at work"
    assert sweep(db, settings, by=REAPER).expired == [str(job_id)]


def test_the_reaper_runs_the_sweep(db: Database, settings: Settings) -> None:
    """A reaper pass (every worker runs one) expires what is due."""
    settings = settings.with_overrides(retention_s=60.0)
    job_id = ended_job(db, settings, HOUR)
    assert reap(db, settings).expired == [str(job_id)]


def test_the_api_says_when_outputs_go_and_that_they_went(db: Database, settings: Settings) -> None:
    """``expires_at`` is the job's end plus SVDFARM_RETENTION; once expired, ``expired`` is
    true, no video or poster URL is given, and the status page offers to render again."""
    settings = settings.with_overrides(retention_s=3 * 3600.0)
    job_id = ended_job(db, settings, 2 * HOUR)
    app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
    try:
        client = app.test_client()
        body = client.get(f"/api/v1/jobs/{job_id}").get_json()
        job = read_job(db, job_id)
        assert job is not None and job.finished_at is not None
        expected = (job.finished_at + 3 * HOUR).isoformat()
        assert (body["expired"], body["expires_at"][:19]) == (False, expected[:19])
        assert body["video_url"]
        assert sweep(db, settings, by=REAPER, now=utcnow() + 2 * HOUR).expired == [str(job_id)]
        body = client.get(f"/api/v1/jobs/{job_id}").get_json()
        assert body["expired"] is True and body["expired_at"]
        assert (body["video_url"], body["poster_url"], body["expires_at"]) == (None, None, None)
        page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
        assert 'id="expired"' in page and "Render it again" in page
        assert client.get(f"/jobs/{job_id}/video.mp4").status_code == 404
    finally:
        app.extensions["svdfarm.db"].dispose()
