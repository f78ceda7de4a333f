"""Ownership everywhere (web.owners): who may see, cancel, download and list which job.

Keys mode: a permission matrix, every job route against every kind of caller, each cell
asserted. Open mode: browser sessions and API addresses see their own jobs only. The jobs list
API and "My jobs" walk pages with keyset cursors. Priorities above the owner's limit are
refused. A user's own login: CSRF, wrong passwords, a disabled user refused at once.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from svdfarm.db import Database, upgrade
from svdfarm.models import Batch, Job, utcnow
from svdfarm.settings import Settings
from svdfarm.states import JobState
from svdfarm.storage import Store, open_store
from svdfarm.users import Limits, add_user, create_key, disable_user, revoke_key
from tests.conftest import DATABASES, make_settings
from tests.factories import png_bytes
from tests.rows import QUEUE, job_row
from web import create_app
from web.owners import REALM, SESSION_ANON

ADMIN_PASSWORD = "admin-pass-for-tests"
USER_PASSWORD = "alice-password"

pytestmark = pytest.mark.parametrize("database_url", DATABASES, indirect=True)


# ---- the farm, its users and their jobs ------------------------------------------------------


def farm_app(tmp_path: Path, database_url: str, tiny_model_dir: Path, **env: str) -> Flask:
    """An app on its own settings (``env`` added), no per-client submit limit."""
    settings = make_settings(
        tmp_path / "var",
        database_url,
        tiny_model_dir,
        SVDFARM_SUBMIT_RATE="0",
        SVDFARM_ADMIN_PASSWORD=ADMIN_PASSWORD,
        **env,
    )
    upgrade(settings.database_url)
    return create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})


@pytest.fixture
def keys_app(tmp_path: Path, database_url: str, tiny_model_dir: Path) -> Iterator[Flask]:
    """The app with ``SVDFARM_AUTH=keys``."""
    app = farm_app(tmp_path, database_url, tiny_model_dir, SVDFARM_AUTH="keys")
    yield app
    app.extensions["svdfarm.db"].dispose()


@pytest.fixture
def open_app(tmp_path: Path, database_url: str, tiny_model_dir: Path) -> Iterator[Flask]:
    """The app in open mode (the default)."""
    app = farm_app(tmp_path, database_url, tiny_model_dir)
    yield app
    app.extensions["svdfarm.db"].dispose()


def db_of(app: Flask) -> Database:
    """The app's database."""
    found: Database = app.extensions["svdfarm.db"]
    return found


def settings_of(app: Flask) -> Settings:
    """The app's settings."""
    found: Settings = app.config["SVDFARM_SETTINGS"]
    return found


@dataclass
class People:
    """The users of a matrix: their owners and keys."""

    alice: str
    alice_key: str
    bob_key: str
    revoked_key: str
    disabled_key: str
    alice_id: int


def add_people(app: Flask) -> People:
    """alice (password, priority limit 2) and bob with keys; a revoked key of alice's; carol's
    key, carol then disabled."""
    with db_of(app).session() as session:
        alice = add_user(session, "alice", password=USER_PASSWORD, limits=Limits(max_priority=2))
        bob = add_user(session, "bob", password="bob-password")
        carol = add_user(session, "carol")
        _, alice_key = create_key(session, alice, "laptop")
        _, bob_key = create_key(session, bob)
        revoked, revoked_key = create_key(session, alice, "old")
        _, carol_key = create_key(session, carol)
        revoke_key(session, revoked.id)
        disable_user(session, "carol")
        session.commit()
        return People(alice.owner, alice_key, bob_key, revoked_key, carol_key, alice.id)


def add_owned_job(
    app: Flask,
    owner: str,
    state: JobState = JobState.SUCCEEDED,
    *,
    batch: uuid.UUID | None = None,
    age_s: float = 60.0,
    created_at: Any = None,
) -> uuid.UUID:
    """A job of ``owner`` in ``state``, its input (and, succeeded, its video and poster)
    stored; in ``batch`` when given."""
    job_id = uuid.uuid4()
    storage = open_store(settings_of(app))
    input_key = Store.key(job_id, "input.png")
    storage.write_bytes(input_key, png_bytes())
    done = state is JobState.SUCCEEDED
    fields: dict[str, Any] = {}
    if done:
        fields["video_key"] = Store.key(job_id, "video.mp4")
        fields["poster_key"] = Store.key(job_id, "poster.png")
        storage.write_bytes(fields["video_key"], b"\x00\x00\x00\x18ftypmp42 not a real video")
        storage.write_bytes(fields["poster_key"], png_bytes(32, 32))
    if state is JobState.QUEUED:
        fields["published_at"] = None  # waiting in the database for the dispatcher
    now = utcnow()
    with db_of(app).begin() as session:
        if batch is not None and session.get(Batch, batch) is None:
            session.add(Batch(id=batch))
            session.flush()
        session.add(
            job_row(
                job_id,
                owner=owner,
                state=state,
                queue=QUEUE,
                input_key=input_key,
                input_filename="cat.png",
                phase="done" if state.terminal else "queued",
                created_at=created_at or now - timedelta(seconds=age_s),
                finished_at=now if state.terminal else None,
                batch_id=batch,
                batch_index=0 if batch is not None else None,
                **fields,
            )
        )
    return job_id


def csrf_of(client: FlaskClient) -> str:
    """The client's session CSRF token (made by loading the login page)."""
    client.get("/login")
    with client.session_transaction() as session:
        token: str = session["csrf"]
    return token


def admin_client(app: Flask) -> FlaskClient:
    """A client logged in with the admin password."""
    client = app.test_client()
    client.get("/admin/login")
    with client.session_transaction() as session:
        token = session.get("csrf") or "token"
        session["csrf"] = token
    response = client.post("/admin/login", data={"password": ADMIN_PASSWORD, "csrf_token": token})
    assert response.status_code == 303, response.get_data(as_text=True)[:300]
    return client


def user_login(client: FlaskClient, name: str, password: str, **extra: str) -> TestResponse:
    """POST the user login form with the session's CSRF token."""
    data = {"name": name, "password": password, "csrf_token": csrf_of(client), **extra}
    return client.post("/login", data=data)


# ---- the permission matrix (keys mode) -------------------------------------------------------

CALLERS = ("nobody", "owner", "other", "admin", "revoked", "disabled")


@dataclass
class World:
    """One keys-mode farm with alice's jobs and a client per caller."""

    app: Flask
    people: People
    done: uuid.UUID
    batch: uuid.UUID
    clients: dict[str, FlaskClient]
    headers: dict[str, dict[str, str]]


def make_world(app: Flask) -> World:
    """alice's succeeded job in a batch, and a client and headers for each caller."""
    people = add_people(app)
    batch = uuid.uuid4()
    done = add_owned_job(app, people.alice, batch=batch)
    keys = {
        "owner": people.alice_key,
        "other": people.bob_key,
        "revoked": people.revoked_key,
        "disabled": people.disabled_key,
    }
    clients = {caller: app.test_client() for caller in CALLERS}
    clients["admin"] = admin_client(app)
    headers = {c: ({"Authorization": f"Bearer {keys[c]}"} if c in keys else {}) for c in CALLERS}
    return World(app, people, done, batch, clients, headers)


def outcome(response: TestResponse) -> str:
    """A cell of the matrix: the status, ``login`` for a redirect to the login page, and for a
    401 whether it carried the Bearer challenge."""
    response.close()
    if response.status_code == 303 and "/login" in response.headers.get("Location", ""):
        return "login"
    if response.status_code == 401:
        assert response.headers.get("WWW-Authenticate") == REALM
        assert "error" in response.get_json()
    return str(response.status_code)


def _get(path: str) -> Callable[[World, str], TestResponse]:
    """A GET of ``path`` (``{job}``, ``{batch}`` filled in)."""

    def run(world: World, caller: str) -> TestResponse:
        url = path.format(job=world.done, batch=world.batch)
        return world.clients[caller].get(url, headers=world.headers[caller])

    return run


def _cancel_api(world: World, caller: str) -> TestResponse:
    """Cancel a fresh queued job of alice's through the API."""
    job = add_owned_job(world.app, world.people.alice, JobState.QUEUED)
    return world.clients[caller].post(f"/api/v1/jobs/{job}/cancel", headers=world.headers[caller])


def _cancel_page(world: World, caller: str) -> TestResponse:
    """Cancel a fresh queued job of alice's from its status page's form."""
    job = add_owned_job(world.app, world.people.alice, JobState.QUEUED)
    client = world.clients[caller]
    with client.session_transaction() as session:
        token = session.setdefault("csrf", "a-token")
    return client.post(
        f"/jobs/{job}/cancel", data={"csrf_token": token}, headers=world.headers[caller]
    )


def _submit_api(world: World, caller: str) -> TestResponse:
    """Submit a job through the API."""
    data = {"image": (io.BytesIO(png_bytes()), "in.png"), "model": "tiny"}
    return world.clients[caller].post(
        "/api/v1/jobs", data=data, content_type="multipart/form-data", headers=world.headers[caller]
    )


def _listed(world: World, caller: str) -> TestResponse:
    """The jobs list API; ``listed`` when alice's job is in it."""
    response = world.clients[caller].get("/api/v1/jobs", headers=world.headers[caller])
    if response.status_code == 200:
        ids = [j["id"] for j in response.get_json()["jobs"]]
        response.status_code = 299 if str(world.done) in ids else 200  # 299: "listed"
    return response


def _again(world: World, caller: str) -> TestResponse:
    """The form with "render again" of alice's job: 299 when it offers the job's image."""
    client = world.clients[caller]
    response = client.get(f"/?again={world.done}", headers=world.headers[caller])
    if response.status_code == 200 and f'name="again" value="{world.done}"' in response.text:
        response.status_code = 299
    return response


ROUTES: dict[str, Callable[[World, str], TestResponse]] = {
    "status page": _get("/jobs/{job}"),
    "job API": _get("/api/v1/jobs/{job}"),
    "events API": _get("/api/v1/jobs/{job}/events"),
    "cancel API": _cancel_api,
    "cancel page": _cancel_page,
    "video.mp4": _get("/jobs/{job}/video.mp4"),
    "poster.png": _get("/jobs/{job}/poster.png"),
    "input": _get("/jobs/{job}/input"),
    "batch API": _get("/api/v1/batches/{batch}"),
    "batch page": _get("/batches/{batch}"),
    "jobs list API": _listed,
    "submit API": _submit_api,
    "again form": _again,
}

#: Each route's answer per caller: nobody, owner, other, admin, revoked key, disabled user.
#: "299": the 200 shows alice's job (listed, or offered to render again); "login": 303 to /login.
EXPECTED = {
    "status page": ("login", "200", "404", "200", "401", "401"),
    "job API": ("401", "200", "404", "200", "401", "401"),
    "events API": ("401", "200", "404", "200", "401", "401"),
    "cancel API": ("401", "202", "404", "202", "401", "401"),
    "cancel page": ("login", "303", "404", "303", "401", "401"),
    "video.mp4": ("login", "200", "404", "200", "401", "401"),
    "poster.png": ("login", "200", "404", "200", "401", "401"),
    "input": ("login", "200", "404", "200", "401", "401"),
    "batch API": ("401", "200", "404", "200", "401", "401"),
    "batch page": ("login", "200", "404", "200", "401", "401"),
    # The admin lists its own jobs (none), not everyone's.
    "jobs list API": ("401", "299", "200", "200", "401", "401"),
    "submit API": ("401", "201", "201", "201", "401", "401"),
    "again form": ("login", "299", "200", "299", "401", "401"),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_the_permission_matrix_in_keys_mode(keys_app: Flask, route: str) -> None:
    """Each caller gets exactly its cell's answer on each job route: no credentials 401 (API)
    or the login page (pages); the owner and the admin the job; another user the 404 of an
    unknown id; a revoked key or a disabled user's key 401 with the Bearer challenge."""
    world = make_world(keys_app)
    got = {caller: outcome(ROUTES[route](world, caller)) for caller in CALLERS}
    assert got == dict(zip(CALLERS, EXPECTED[route], strict=True))


def test_another_users_job_is_the_404_of_an_unknown_id(keys_app: Flask) -> None:
    """bob reading alice's job gets the very answer of an id that names no job."""
    world = make_world(keys_app)
    bob = world.clients["other"]
    headers = world.headers["other"]
    for path in ("/api/v1/jobs/{}", "/api/v1/jobs/{}/events"):
        theirs = bob.get(path.format(world.done), headers=headers)
        unknown_id = uuid.uuid4()
        unknown = bob.get(path.format(unknown_id), headers=headers)
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.get_json()["error"].replace(str(world.done), "X") == unknown.get_json()[
            "error"
        ].replace(str(unknown_id), "X")


def test_keys_mode_leaves_the_public_routes_open(keys_app: Flask) -> None:
    """Without credentials: the models list, the OpenAPI document, /healthz and the static
    files answer; the login page too."""
    client = keys_app.test_client()
    for path in ("/api/v1/models", "/api/v1/openapi.json", "/healthz", "/static/style.css"):
        with client.get(path) as response:
            assert response.status_code == 200, path
    assert client.get("/login").status_code == 200
    refused = client.get("/api/v1/jobs")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == REALM


def test_a_bad_key_is_refused_in_open_mode_too(open_app: Flask) -> None:
    """A key that is sent must be good, whatever the mode; without one, open mode answers."""
    client = open_app.test_client()
    bad = client.get("/api/v1/jobs", headers={"Authorization": "Bearer svdf_nothere_x"})
    assert bad.status_code == 401
    assert bad.headers["WWW-Authenticate"] == REALM
    assert client.get("/api/v1/jobs").status_code == 200


def test_the_job_json_says_owner_priority_and_place(keys_app: Flask) -> None:
    """The owner's name (to its owner and the admin), the priority, a queued job's place."""
    world = make_world(keys_app)
    queued = add_owned_job(keys_app, world.people.alice, JobState.QUEUED)
    mine = world.clients["owner"].get(f"/api/v1/jobs/{queued}", headers=world.headers["owner"])
    body = mine.get_json()
    assert body["owner"] == "alice"
    assert body["priority"] == 0
    assert body["place"]["position"] >= 1
    assert set(body["place"]) == {"position", "eta_seconds", "held"}
    done = world.clients["owner"].get(f"/api/v1/jobs/{world.done}", headers=world.headers["owner"])
    assert done.get_json()["place"] is None
    assert world.clients["admin"].get(f"/api/v1/jobs/{queued}").get_json()["owner"] == "alice"
    page = world.clients["owner"].get(f"/jobs/{queued}", headers=world.headers["owner"]).text
    assert re.search(r'id="place">\d+(st|nd|rd|th) in line', page), page


def test_a_priority_above_the_owners_limit_is_403(keys_app: Flask) -> None:
    """alice may ask up to 2: 3 is refused with the reason and writes nothing; 2 is taken."""
    people = add_people(keys_app)
    client = keys_app.test_client()
    auth = {"Authorization": f"Bearer {people.alice_key}"}

    def submit(priority: str) -> TestResponse:
        data = {"image": (io.BytesIO(png_bytes()), "in.png"), "priority": priority}
        return client.post(
            "/api/v1/jobs", data=data, content_type="multipart/form-data", headers=auth
        )

    refused = submit("3")
    assert refused.status_code == 403
    assert "above your limit of 2" in refused.get_json()["fields"]["priority"]
    assert client.get("/api/v1/jobs", headers=auth).get_json()["jobs"] == []
    taken = submit("2")
    assert taken.status_code == 201
    job = client.get(taken.headers["Location"], headers=auth).get_json()
    assert job["priority"] == 2
    assert job["owner"] == "alice"


# ---- open mode -------------------------------------------------------------------------------


def form_submit(client: FlaskClient, **fields: str) -> TestResponse:
    """Submit the form with a PNG and the session's CSRF token."""
    client.get("/")
    with client.session_transaction() as session:
        token = session["csrf"]
    data = {"image": (io.BytesIO(png_bytes()), "in.png"), "csrf_token": token, **fields}
    return client.post("/", data=data, content_type="multipart/form-data")


def test_a_browser_session_sees_its_own_form_jobs_only(open_app: Flask) -> None:
    """Two browsers on one address: each sees the job its session submitted through the form,
    the other's is a 404 (page and API), and each's "My jobs" lists only its own."""
    first, second = open_app.test_client(), open_app.test_client()
    response = form_submit(first)
    assert response.status_code == 303
    job_id = response.headers["Location"].rsplit("/", 1)[-1]
    with first.session_transaction() as session:
        assert session[SESSION_ANON].startswith("anon:")
    assert first.get(f"/jobs/{job_id}").status_code == 200
    assert first.get(f"/api/v1/jobs/{job_id}").get_json()["owner"] == "anonymous"
    assert second.get(f"/jobs/{job_id}").status_code == 404
    assert second.get(f"/api/v1/jobs/{job_id}").status_code == 404
    assert second.get(f"/jobs/{job_id}/input").status_code == 404
    assert job_id in first.get("/jobs").text
    assert job_id not in second.get("/jobs").text
    # "Render again" of another session's job offers nothing of it.
    assert f'value="{job_id}"' not in second.get(f"/?again={job_id}").text


def test_an_api_client_sees_the_key_less_jobs_of_its_address_only(open_app: Flask) -> None:
    """A job submitted through the API without a key belongs to the address: another address
    gets 404; a browser of the same address lists it in "My jobs"."""
    client = open_app.test_client()
    data = {"image": (io.BytesIO(png_bytes()), "in.png")}
    created = client.post("/api/v1/jobs", data=data, content_type="multipart/form-data")
    assert created.status_code == 201
    job_id = created.get_json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 200
    elsewhere = {"REMOTE_ADDR": "10.0.0.2"}
    assert client.get(f"/api/v1/jobs/{job_id}", environ_base=elsewhere).status_code == 404
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", environ_base=elsewhere).status_code == 404
    listed = client.get("/api/v1/jobs", environ_base=elsewhere).get_json()
    assert listed == {"jobs": [], "next_cursor": None}
    browser = open_app.test_client()
    assert job_id in browser.get("/jobs").text


def test_an_anonymous_priority_above_0_is_refused_on_the_form(open_app: Flask) -> None:
    """An anonymous owner's limit is 0: the form answers 403 with the reason, the priority
    kept in the form, and the hint says the limit."""
    client = open_app.test_client()
    assert "your limit: 0" in client.get("/").text
    refused = form_submit(client, priority="1")
    assert refused.status_code == 403
    assert "above your limit of 0" in refused.text
    assert re.search(r'id="priority"[^>]*\n?[^>]*value="1"', refused.text), refused.text


# ---- the jobs list ---------------------------------------------------------------------------


def test_the_jobs_list_walks_every_job_once_newest_first(keys_app: Flask) -> None:
    """45 jobs of alice (some created at the same instant) in pages of 20: 20, 20, 5, no
    duplicate and no gap, newest first; bob's jobs never appear; state filters."""
    people = add_people(keys_app)
    start = utcnow() - timedelta(hours=1)
    states = [JobState.FAILED if i % 3 == 0 else JobState.SUCCEEDED for i in range(45)]
    made = [
        add_owned_job(
            keys_app, people.alice, state, created_at=start + timedelta(seconds=i // 2)
        )  # pairs share an instant: the id breaks the tie
        for i, state in enumerate(states)
    ]
    add_owned_job(keys_app, "user:999", JobState.FAILED)
    client = keys_app.test_client()
    auth = {"Authorization": f"Bearer {people.alice_key}"}
    seen: list[str] = []
    sizes = []
    cursor = None
    while True:
        query = {"limit": "20", **({"cursor": cursor} if cursor else {})}
        page = client.get("/api/v1/jobs", query_string=query, headers=auth)
        assert page.status_code == 200
        body = page.get_json()
        sizes.append(len(body["jobs"]))
        seen += [job["id"] for job in body["jobs"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sizes == [20, 20, 5]
    assert len(set(seen)) == 45
    assert set(seen) == {str(j) for j in made}
    with db_of(keys_app).session() as session:
        rows = {str(j.id): (j.created_at, j.id) for j in session.query(Job)}
    keys = [rows[i] for i in seen]
    assert keys == sorted(keys, reverse=True)

    failed = client.get("/api/v1/jobs", query_string={"state": "failed"}, headers=auth)
    ids = [j["id"] for j in failed.get_json()["jobs"]]
    assert {j["state"] for j in failed.get_json()["jobs"]} == {"failed"}
    assert len(ids) == 15
    assert (
        client.get("/api/v1/jobs", query_string={"state": "running"}, headers=auth).get_json()[
            "jobs"
        ]
        == []
    )


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"state": "done"}, "state"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "MjAyNi0wMS0wMXxub3BlCg"}, "cursor"),
        ({"page": "2"}, "page"),
    ],
)
def test_bad_list_parameters_are_400_naming_the_field(
    open_app: Flask, query: dict[str, str], field: str
) -> None:
    """A bad limit, state or cursor, or an unknown parameter: 400 that names it."""
    response = open_app.test_client().get("/api/v1/jobs", query_string=query)
    assert response.status_code == 400
    assert field in response.get_json()["fields"]


def test_my_jobs_pages_through_the_database(open_app: Flask) -> None:
    """ "My jobs" lists the jobs of the browser's address and session from the database, 20 a
    page, with a link to the older ones; a bad cursor is 400."""
    for _ in range(23):
        add_owned_job(open_app, "addr:127.0.0.1", JobState.FAILED)
    client = open_app.test_client()
    first = client.get("/jobs")
    assert first.text.count('class="recent-job') == 20
    older = re.search(r'href="(/jobs\?cursor=[^"]+)" id="older"', first.text)
    assert older is not None
    second = client.get(older.group(1).replace("&amp;", "&"))
    assert second.text.count('class="recent-job') == 3
    assert 'id="older"' not in second.text
    assert client.get("/jobs?cursor=bogus").status_code == 400


# ---- the user login --------------------------------------------------------------------------


def test_a_user_logs_in_and_out(keys_app: Flask) -> None:
    """The form needs a login; the right pair starts a fresh session, the header shows the
    name and a log-out button, the form submits as the user; log out needs the token."""
    add_people(keys_app)
    client = keys_app.test_client()
    with client.session_transaction() as session:
        session["planted"] = "fixation"
    to_login = client.get("/")
    assert to_login.status_code == 303
    assert "/login" in to_login.headers["Location"]
    logged = user_login(client, "alice", USER_PASSWORD, next="/jobs")
    assert logged.status_code == 303
    assert logged.headers["Location"].endswith("/jobs")
    with client.session_transaction() as session:
        assert "planted" not in session  # a fresh session
    page = client.get("/")
    assert page.status_code == 200
    assert 'id="user-name">alice<' in page.text
    assert 'id="logout"' in page.text
    assert "your limit: 2" in page.text
    submitted = form_submit(client)
    assert submitted.status_code == 303
    job_id = submitted.headers["Location"].rsplit("/", 1)[-1]
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["owner"] == "alice"
    assert client.post("/logout").status_code == 400  # no CSRF token
    with client.session_transaction() as session:
        token = session["csrf"]
    assert client.post("/logout", data={"csrf_token": token}).status_code == 303
    assert client.get("/").status_code == 303


def test_a_wrong_password_or_missing_token_is_refused(keys_app: Flask) -> None:
    """A wrong password: 401 and still no login; no CSRF token: 400; a disabled user's right
    password: 401; five failures: 429 with Retry-After."""
    add_people(keys_app)
    client = keys_app.test_client()
    wrong = user_login(client, "alice", "nope")
    assert wrong.status_code == 401
    assert "Wrong name or password" in wrong.text
    assert client.get("/").status_code == 303
    no_token = client.post("/login", data={"name": "alice", "password": USER_PASSWORD})
    assert no_token.status_code == 400
    assert client.get("/").status_code == 303
    with db_of(keys_app).session() as session:
        disable_user(session, "bob")
        session.commit()
    assert user_login(client, "bob", "bob-password").status_code == 401
    for _ in range(3):
        user_login(client, "alice", "nope")
    limited = user_login(client, "alice", USER_PASSWORD)
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) > 0


def test_a_disabled_user_is_refused_at_the_next_request(keys_app: Flask) -> None:
    """A user disabled while logged in is out at once: the form sends to the login page and
    the API answers 401."""
    add_people(keys_app)
    client = keys_app.test_client()
    assert user_login(client, "alice", USER_PASSWORD).status_code == 303
    assert client.get("/").status_code == 200
    assert client.get("/api/v1/jobs").status_code == 200
    with db_of(keys_app).session() as session:
        disable_user(session, "alice")
        session.commit()
    assert client.get("/").status_code == 303
    assert client.get("/api/v1/jobs").status_code == 401


def test_login_next_stays_on_this_site(keys_app: Flask) -> None:
    """``next`` may not send the browser elsewhere (no open redirect)."""
    add_people(keys_app)
    client = keys_app.test_client()
    for target in ("https://evil.example/", "//evil.example/", "/api/v1/jobs"):
        response = user_login(client, "alice", USER_PASSWORD, next=target)
        assert response.headers["Location"].endswith("/"), target
        assert "evil" not in response.headers["Location"]
