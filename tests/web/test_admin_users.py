"""The admin's users page (web/admin_users.py) and the job page's priority form (web/admin.py)
through the Flask client on real databases: login, CSRF, adding users, bad input, API keys
shown once and revoked, disabling, limits, and a queued job's priority.

Each form's effect is read back from the database: the users and keys rows, what
:func:`svdfarm.users.authenticate_key` accepts, a job's priority and its events.
"""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from werkzeug.test import TestResponse

from svdfarm.db import Database
from svdfarm.lifecycle import events_of
from svdfarm.models import ApiKey, Job, User, utcnow
from svdfarm.settings import Settings
from svdfarm.states import Actor, EventType, JobState
from svdfarm.users import ADMIN_USER, Limits, add_user, authenticate_key, create_key, find_user
from tests.conftest import DATABASES
from tests.rows import add_job, read_job
from tests.web.admin_login import admin_app, log_in, token

USERS = "/admin/users/"


@pytest.fixture
def app(settings: Settings, password_hash: str) -> Iterator[Flask]:
    """The web app with the admin on (``SVDFARM_ADMIN_PASSWORD``: a hash)."""
    flask_app = admin_app(settings, password_hash)
    yield flask_app
    flask_app.extensions["svdfarm.db"].dispose()


@pytest.fixture
def admin(client: FlaskClient) -> FlaskClient:
    """A client logged in to the admin."""
    assert log_in(client).status_code == 303
    return client


def post(client: FlaskClient, path: str, **fields: str) -> TestResponse:
    """POST a form of the users page with its CSRF token."""
    return client.post(path, data={"csrf_token": token(client, USERS), **fields})


def user(db: Database, name: str) -> User | None:
    """The user row named ``name``, read in a fresh session."""
    with db.session() as session:
        return find_user(session, name)


def key_count(db: Database) -> int:
    """How many API keys the database holds."""
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(ApiKey)) or 0


def user_names(db: Database) -> set[str]:
    """The names of the users, but the one the admin's login acts as (made on first use)."""
    with db.session() as session:
        return set(session.scalars(select(User.name))) - {ADMIN_USER}


def seed_user(db: Database, name: str, **limits: int) -> tuple[int, str]:
    """A user made directly, with one key: (their id, the key)."""
    with db.begin() as session:
        row = add_user(session, name, limits=Limits(**limits))
        _, key = create_key(session, row, label="seeded")
        return row.id, key


def authenticate(db: Database, key: str) -> str | None:
    """The name of the user ``key`` authenticates, or None; committed."""
    with db.begin() as session:
        found = authenticate_key(session, key)
        return found.name if found is not None else None


# ---- login and CSRF --------------------------------------------------------------------------


def test_admin_off_without_a_password(settings: Settings) -> None:
    """Without ``SVDFARM_ADMIN_PASSWORD`` the users page is a 503 like the other admin pages."""
    app = admin_app(settings, "")
    assert app.test_client().get(USERS).status_code == 503
    app.extensions["svdfarm.db"].dispose()


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_login_required(client: FlaskClient, db: Database) -> None:
    """Without a login every page and form sends to the login page, writing nothing."""
    user_id, key = seed_user(db, "ivan")
    key_id = key.split("_")[1]
    response = client.get(USERS)
    assert response.status_code == 302
    assert response.headers["Location"] == "/admin/login?next=/admin/users/"
    csrf = token(client)  # a real token of this session: only the login is missing
    for path, data in (
        (USERS, {"name": "mallory"}),
        (f"{USERS}{user_id}/disable", {}),
        (f"{USERS}{user_id}/limits", {"max_priority": "10"}),
        (f"{USERS}{user_id}/keys", {}),
        (f"{USERS}keys/{key_id}/revoke", {}),
    ):
        response = client.post(path, data={"csrf_token": csrf, **data})
        assert response.status_code == 302, path
        assert response.headers["Location"].startswith("/admin/login?next=")
    ivan = user(db, "ivan")
    assert ivan is not None and ivan.disabled_at is None and ivan.max_priority == 0
    assert user(db, "mallory") is None and key_count(db) == 1
    assert authenticate(db, key) == "ivan"


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_every_post_needs_the_csrf_token(admin: FlaskClient, db: Database) -> None:
    """A missing or wrong token is 400 on every form, and nothing changes."""
    user_id, key = seed_user(db, "judy")
    key_id = key.split("_")[1]
    routes = {
        USERS: {"name": "mallory"},
        f"{USERS}{user_id}/disable": {},
        f"{USERS}{user_id}/enable": {},
        f"{USERS}{user_id}/limits": {"max_priority": "10"},
        f"{USERS}{user_id}/keys": {"label": "x"},
        f"{USERS}keys/{key_id}/revoke": {},
    }
    for path, data in routes.items():
        for bad in ({}, {"csrf_token": "forged"}):
            response = admin.post(path, data={**data, **bad})
            assert response.status_code == 400, path
            assert "security token is" in response.get_data(True)
    judy = user(db, "judy")
    assert judy is not None and judy.disabled_at is None and judy.max_priority == 0
    assert user(db, "mallory") is None and key_count(db) == 1
    assert authenticate(db, key) == "judy"


# ---- users -----------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_add_a_user_and_list_them(admin: FlaskClient, db: Database) -> None:
    """The form records the user with their limits and password; the list shows them; the
    admin's navigation links to the page."""
    assert 'href="/admin/users/"' in admin.get("/admin/").get_data(True)
    response = post(
        admin,
        USERS,
        name="kim",
        admin="1",
        password="pw kim",
        max_queued="4",
        max_running="",
        max_priority="-2",
        share="0.5",
    )
    assert response.status_code == 303 and response.headers["Location"] == USERS
    kim = user(db, "kim")
    assert kim is not None and kim.is_admin and kim.password_hash
    assert (kim.max_queued, kim.max_running, kim.max_priority, kim.share) == (4, None, -2, 0.5)
    page = admin.get(USERS).get_data(True)
    assert "User &#39;kim&#39; added." in page
    row = re.search(rf'<tr id="user-{kim.id}".*?</tr>', page, re.S)
    assert row is not None
    cells = [html.unescape(c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(0))]
    assert cells[:8] == ["<strong>kim</strong>", "yes", "enabled", "4", "-", "-2", "0.5", "0"]
    assert "pw kim" not in page


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "bad name"}, "User name &#39;bad name&#39; is not usable"),
        ({"name": ""}, "User name &#39;&#39; is not usable"),
        ({"name": "taken"}, "A user named &#39;taken&#39; already exists."),
        ({"name": "ok", "max_queued": "0"}, "The max queued limit must be at least 1"),
        ({"name": "ok", "max_running": "many"}, "The max running limit must be a whole number"),
        ({"name": "ok", "max_priority": "11"}, "The max priority must be -10 to 10."),
        ({"name": "ok", "share": "0"}, "The share must be between 0.01 and 1000."),
        ({"name": "ok", "share": "nan"}, "The share must be a number"),
        ({"name": "ok", "share": "lots"}, "The share must be a number, not &#39;lots&#39;."),
    ],
)
def test_bad_input_is_400_and_writes_nothing(
    admin: FlaskClient, db: Database, fields: dict[str, str], message: str
) -> None:
    """A bad name, a taken one or a limit that is not a number in range: the page again with
    the reason and the values given, status 400, no user written."""
    seed_user(db, "taken", max_priority=1)
    response = post(admin, USERS, admin="1", **fields)
    assert response.status_code == 400
    page = response.get_data(True)
    assert 'id="users-error"' in page and message in page
    assert f'value="{html.escape(fields["name"], quote=True)}"' in page
    assert user_names(db) == {"taken"}
    taken = user(db, "taken")
    assert taken is not None and not taken.is_admin and taken.max_priority == 1


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_edit_limits(admin: FlaskClient, db: Database) -> None:
    """The limits form replaces them (blank: no limit); an out-of-range one is a 400 that
    changes nothing."""
    user_id, _ = seed_user(db, "leo", max_queued=3, max_running=1)
    path = f"{USERS}{user_id}/limits"
    fields = {"max_queued": "", "max_running": "2", "max_priority": "5", "share": "4"}
    assert post(admin, path, **fields).status_code == 303
    leo = user(db, "leo")
    assert leo is not None
    assert (leo.max_queued, leo.max_running, leo.max_priority, leo.share) == (None, 2, 5, 4.0)
    response = post(admin, path, **{**fields, "max_priority": "20", "share": "1"})
    assert response.status_code == 400
    assert "Limits of &#39;leo&#39; not changed: The max priority" in response.get_data(True)
    leo = user(db, "leo")
    assert leo is not None and (leo.max_priority, leo.share) == (5, 4.0)
    assert post(admin, f"{USERS}9999/limits", **fields).status_code == 404


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_disable_and_enable(admin: FlaskClient, db: Database) -> None:
    """Disabling refuses the user's keys at once; enabling lets them in again."""
    user_id, key = seed_user(db, "mia")
    assert post(admin, f"{USERS}{user_id}/disable").status_code == 303
    mia = user(db, "mia")
    assert mia is not None and mia.disabled_at is not None
    assert authenticate(db, key) is None
    page = admin.get(USERS).get_data(True)
    assert f'action="/admin/users/{user_id}/enable"' in page
    assert f'action="/admin/users/{user_id}/keys"' not in page  # no key for a disabled user
    refused = post(admin, f"{USERS}{user_id}/keys")
    assert refused.status_code == 400 and "is disabled" in refused.get_data(True)
    assert key_count(db) == 1
    assert post(admin, f"{USERS}{user_id}/enable").status_code == 303
    mia = user(db, "mia")
    assert mia is not None and mia.disabled_at is None
    assert authenticate(db, key) == "mia"
    assert post(admin, f"{USERS}9999/disable").status_code == 404


# ---- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_create_a_key_shown_once_then_revoke_it(admin: FlaskClient, db: Database) -> None:
    """A new key is on the page its form answers (never cached) and works; the next visit
    shows its id, never the key or its hash; revoking it makes it fail at once."""
    user_id, _ = seed_user(db, "noah")
    response = post(admin, f"{USERS}{user_id}/keys", label="laptop")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    found = re.search(r'<code id="new-key-value">([^<]+)</code>', response.get_data(True))
    assert found is not None
    key = html.unescape(found.group(1))
    assert authenticate(db, key) == "noah"
    key_id = key.split("_")[1]
    with db.session() as session:
        row = session.get(ApiKey, key_id)
        assert row is not None and row.label == "laptop"
        secret_hash = row.secret_hash

    later = admin.get(USERS).get_data(True)
    assert f'id="key-{key_id}"' in later and "laptop" in later
    assert key not in later and key.split("_", 2)[2] not in later and secret_hash not in later
    assert 'id="new-key"' not in later

    response = post(admin, f"{USERS}keys/{key_id}/revoke")
    assert response.status_code == 303
    assert authenticate(db, key) is None
    with db.session() as session:
        row = session.get(ApiKey, key_id)
        assert row is not None and row.revoked_at is not None
    page = admin.get(USERS).get_data(True)
    assert f"API key {key_id} of &#39;noah&#39; is revoked." in page
    assert f'action="/admin/users/keys/{key_id}/revoke"' not in page
    assert post(admin, f"{USERS}keys/nokey123/revoke").status_code == 404


# ---- a job's priority ------------------------------------------------------------------------


def priority_events(db: Database, job_id: uuid.UUID) -> list[tuple[Actor, str, dict[str, object]]]:
    """The job's priority changes: who made them and their details."""
    with db.session() as session:
        return [
            (e.actor_kind, e.actor, e.details)
            for e in events_of(session, job_id)
            if e.type is EventType.PRIORITY_CHANGED
        ]


def set_priority(client: FlaskClient, job_id: uuid.UUID, **fields: str) -> TestResponse:
    """POST the job page's priority form with its CSRF token."""
    data = {"csrf_token": token(client, USERS), **fields}
    return client.post(f"/admin/jobs/{job_id}/priority", data=data)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_job_priority_form(admin: FlaskClient, db: Database, settings: Settings) -> None:
    """A queued job's page has the form; a number sets the priority, "Move to front" the
    highest, each with an event by the admin; bad numbers and jobs no longer waiting are a
    400 with the reason, changing nothing; an ended job's page has no form."""
    job_id = add_job(db, settings, JobState.QUEUED, sent=False)
    assert 'id="job-priority"' in admin.get(f"/admin/jobs/{job_id}").get_data(True)
    response = set_priority(admin, job_id, priority="4")
    assert response.status_code == 303 and response.headers["Location"] == f"/admin/jobs/{job_id}"
    job = read_job(db, job_id)
    assert job is not None and job.priority == 4
    page = admin.get(f"/admin/jobs/{job_id}").get_data(True)
    assert "Priority is now 4." in page and '<dd id="priority">4</dd>' in page

    assert set_priority(admin, job_id, priority="-1", front="1").status_code == 303
    job = read_job(db, job_id)
    assert job is not None and job.priority == 10 and job.state is JobState.QUEUED
    assert priority_events(db, job_id) == [
        (Actor.ADMIN, "admin", {"from": 0, "to": 4, "front": False}),
        (Actor.ADMIN, "admin", {"from": 4, "to": 10, "front": True}),
    ]

    for value, message in (("11", "from -10 to 10"), ("high", "whole number"), ("", "whole")):
        response = set_priority(admin, job_id, priority=value)
        assert response.status_code == 400, value
        page = response.get_data(True)
        assert 'id="priority-error"' in page and message in page
    assert admin.post(f"/admin/jobs/{job_id}/priority", data={"priority": "1"}).status_code == 400

    sent = add_job(db, settings, JobState.QUEUED, sent=False)
    with db.begin() as session:
        session.execute(update(Job).where(Job.id == sent).values(published_at=utcnow()))
    response = set_priority(admin, sent, priority="2")
    assert response.status_code == 400
    assert "already sent to a worker" in response.get_data(True)

    failed = add_job(db, settings, JobState.FAILED)
    assert 'id="job-priority"' not in admin.get(f"/admin/jobs/{failed}").get_data(True)
    response = set_priority(admin, failed, priority="2")
    assert response.status_code == 400 and "reprioritize is allowed only from" in html.unescape(
        response.get_data(True)
    )
    assert set_priority(admin, uuid.uuid4(), priority="2").status_code == 404

    for other, expected in ((job_id, 10), (sent, 0), (failed, 0)):
        row = read_job(db, other)
        assert row is not None and row.priority == expected
    assert len(priority_events(db, job_id)) == 2
    assert priority_events(db, sent) == priority_events(db, failed) == []
