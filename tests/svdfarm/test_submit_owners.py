"""What an owner may submit: their priority cap, their waiting-jobs limit, and the per-address
rate that only anonymous owners meet."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from svdfarm.celery_app import create_celery
from svdfarm.db import Database
from svdfarm.jobs import SubmitRefused, submit_job, validate_submission
from svdfarm.lifecycle import By
from svdfarm.models import Job
from svdfarm.params import ParamError
from svdfarm.settings import Settings
from svdfarm.states import Actor
from svdfarm.users import Limits, add_user
from tests.conftest import DATABASES
from tests.factories import png_bytes

API = By(Actor.API)
SMALL = {"num_frames": "2", "num_inference_steps": "1", "width": "64", "height": "64"}


def submit(db: Database, settings: Settings, owner: str, **fields: str) -> Job:
    """Submit a small job of ``owner`` from the address 10.0.0.7."""
    submission = validate_submission(settings, {**SMALL, **fields}, png_bytes(), "in.png")
    with db.session() as session:
        job = submit_job(
            session, create_celery(settings), settings, submission, by=API, owner=owner,
            client="10.0.0.7",
        )  # fmt: skip
        session.expunge(job)
        return job


def count(db: Database) -> int:
    """Jobs recorded."""
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def make_user(db: Database, name: str, limits: Limits) -> str:
    """A user with ``limits``; their owner string."""
    with db.begin() as session:
        return add_user(session, name, limits=limits).owner


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_a_priority_above_the_owners_cap_is_refused_with_nothing_written(
    db: Database, settings: Settings
) -> None:
    """An anonymous owner may lower their priority, not raise it; a user up to their cap."""
    settings.ensure_dirs()
    assert submit(db, settings, "addr:10.0.0.7", priority="-3").priority == -3
    with pytest.raises(ParamError) as refused:
        submit(db, settings, "addr:10.0.0.7", priority="1")
    assert refused.value.status == 403
    assert "Priority 1 is above your limit of 0" in refused.value.errors["priority"]
    alice = make_user(db, "alice", Limits(max_priority=5))
    assert submit(db, settings, alice, priority="5").priority == 5
    with pytest.raises(ParamError):
        submit(db, settings, alice, priority="6")
    assert count(db) == 2


def test_a_priority_out_of_range_or_not_a_number_is_a_field_error(settings: Settings) -> None:
    """-10..10 whole numbers only, named in the error."""
    for bad in ("11", "-11", "1.5", "high"):
        with pytest.raises(ParamError) as refused:
            validate_submission(settings, {**SMALL, "priority": bad}, png_bytes(), "in.png")
        assert "Priority must be a whole number from -10 to 10" in refused.value.errors["priority"]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_max_queued_refuses_the_next_job_with_429(db: Database, settings: Settings) -> None:
    """A user with --max-queued 2 gets the third refused (429, the reason, Retry-After)."""
    settings.ensure_dirs()
    bob = make_user(db, "bob", Limits(max_queued=2))
    submit(db, settings, bob)
    submit(db, settings, bob)
    with pytest.raises(SubmitRefused) as refused:
        submit(db, settings, bob)
    assert refused.value.status == 429 and refused.value.retry_after >= 1
    assert "You have 2 job(s) waiting, and your limit is 2" in str(refused.value)
    assert count(db) == 2


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_per_address_rate_counts_anonymous_owners_only(
    db: Database, settings: Settings
) -> None:
    """SVDFARM_SUBMIT_RATE=1: a second key-less job from one address is refused; a user's
    jobs from the same address are not (their own limits hold)."""
    settings = settings.with_overrides(submit_rate_per_minute=1)
    settings.ensure_dirs()
    submit(db, settings, "addr:10.0.0.7")
    with pytest.raises(SubmitRefused) as refused:
        submit(db, settings, "addr:10.0.0.7")
    assert refused.value.status == 429
    carol = make_user(db, "carol", Limits())
    submit(db, settings, carol)
    submit(db, settings, carol)
    assert count(db) == 3
