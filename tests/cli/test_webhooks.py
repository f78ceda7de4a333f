"""``svdfarm webhooks`` (:mod:`cli.webhooks`) through ``cli.main``: endpoints added, listed and
removed on real rows, bad input refused with status 2, and a removed endpoint's pending
deliveries canceled."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from svdfarm import lifecycle
from svdfarm.db import Database
from svdfarm.lifecycle import By
from svdfarm.models import WebhookDelivery, WebhookEndpoint
from svdfarm.settings import Settings
from svdfarm.states import Actor
from svdfarm.users import add_user
from svdfarm.webhook_states import DeliveryState
from svdfarm.webhooks import secret_for
from tests.cli.conftest import svdfarm
from tests.conftest import DATABASES
from tests.rows import job_row


def endpoints(db: Database) -> list[WebhookEndpoint]:
    """Every endpoint row, oldest first."""
    with db.session() as session:
        return list(session.scalars(select(WebhookEndpoint).order_by(WebhookEndpoint.id)))


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_add_list_remove(
    db: Database, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's name or an owner string; the events chosen (default: all but progress); the
    owner's secret printed; list by owner; remove cancels the endpoint's pending deliveries."""
    with db.begin() as session:
        owner = add_user(session, "alice").owner
    status, out, err = svdfarm(capsys, "webhooks", "add", "alice", "https://hooks.example.com/a")
    assert status == 0, err
    with db.begin() as session:
        assert f"signing secret of {owner}: {secret_for(session, owner)}" in out
    status, out, err = svdfarm(
        capsys,
        "webhooks",
        "add",
        "addr:203.0.113.9",
        "https://hooks.example.com/b",
        "--events",
        "succeeded,job.failed",
        "progress",
    )
    assert status == 0, err
    first, second = endpoints(db)
    assert (first.owner, first.url) == (owner, "https://hooks.example.com/a")
    assert "job.progress" not in first.events and len(first.events) == 5
    assert second.events == ["job.progress", "job.succeeded", "job.failed"]

    status, out, _ = svdfarm(capsys, "webhooks", "list", "alice")
    assert status == 0 and "hooks.example.com/a" in out and "hooks.example.com/b" not in out
    status, out, _ = svdfarm(capsys, "webhooks", "list")
    assert "hooks.example.com/a" in out and "hooks.example.com/b" in out

    job_id = uuid.uuid4()
    with db.begin() as session:
        lifecycle.submit(session, job_row(job_id, owner=owner), by=By(Actor.API))
    status, out, err = svdfarm(capsys, "webhooks", "remove", str(first.id))
    assert status == 0, err
    assert [e.id for e in endpoints(db)] == [second.id]
    with db.session() as session:
        (made,) = session.scalars(select(WebhookDelivery))
        assert made.state is DeliveryState.CANCELED and "removed" in (made.last_error or "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("add", "nobody", "https://x.example.com/"), "No user named 'nobody'"),
        (("add", "addr:1.2.3.4", "ftp://x.example.com/"), "http:// or https://"),
        (("add", "addr:1.2.3.4", "http://10.0.0.1/"), "public addresses only"),
        (("add", "addr:1.2.3.4", "https://x.example.com/", "--events", "job.done"), "job.done"),
        (("remove", "999"), "No webhook endpoint 999"),
        (("list", "user:x"), "user:<id> takes a number"),
    ],
)
def test_bad_input_is_refused_with_status_2(
    db: Database,
    farm_env: Settings,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    """Unknown users and endpoints, unusable URLs and events: status 2, one line, no row."""
    status, _, err = svdfarm(capsys, "webhooks", *args)
    assert status == 2 and message in err and err.startswith("error: ")
    assert endpoints(db) == []
