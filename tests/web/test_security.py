"""The security promises (docs/SECURITY.md), each against the real app: headers, CSRF on the
pages' forms, the admin behind its login, files only by job id under generated names, JSON-only
Celery, production mode's refusals, proxies, and the configurable limits.
"""

from __future__ import annotations

import io
import pickle
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from kombu import Connection, Consumer, Queue
from kombu.exceptions import ContentDisallowed

from svdfarm.celery_app import create_celery
from svdfarm.db import upgrade
from svdfarm.settings import KNOWN_DEFAULT_SECRETS, MIN_SECRET_LENGTH, Settings, SettingsError
from svdfarm.states import JobState
from tests.conftest import DATABASES, make_settings
from tests.factories import noisy_png_bytes, png_bytes
from tests.http import form_token, job_id_from
from tests.rows import UNKNOWN_JOB_ID, job_count, load_job
from web import create_app
from web.auth import hash_password
from web.security import CONTENT_SECURITY_POLICY

ROOT = Path(__file__).resolve().parents[2]
GOOD_SECRET = "k" * MIN_SECRET_LENGTH
UNKNOWN = UNKNOWN_JOB_ID


def csp_directives(value: str) -> dict[str, list[str]]:
    """A Content-Security-Policy header as directive -> sources."""
    directives: dict[str, list[str]] = {}
    for part in value.split(";"):
        words = part.split()
        if words:
            directives[words[0]] = words[1:]
    return directives


def assert_security_headers(response: Any) -> None:
    """The headers every response carries, with their values."""
    csp = csp_directives(response.headers["Content-Security-Policy"])
    assert csp["default-src"] == ["'self'"]
    assert csp["script-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["object-src"] == ["'none'"]
    assert csp["base-uri"] == ["'self'"]
    assert csp["form-action"] == ["'self'"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "same-origin"


def make_app(settings: Settings) -> Flask:
    """A fresh app on ``settings``."""
    return create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})


@pytest.fixture
def settings_with(tmp_path: Path, database_url: str, tiny_model_dir: Path) -> Iterator[Any]:
    """Build migrated settings with extra ``SVDFARM_*`` variables; apps made are disposed."""
    apps: list[Flask] = []

    def build(**env: str) -> tuple[Settings, Flask]:
        """Settings with ``env`` and an app on them."""
        result = make_settings(tmp_path / f"var{len(apps)}", database_url, tiny_model_dir, **env)
        upgrade(result.database_url)
        app = make_app(result)
        apps.append(app)
        return result, app

    yield build
    for app in apps:
        app.extensions["svdfarm.db"].dispose()


def stored_files(settings: Settings) -> list[str]:
    """Every file under the data folder's jobs/ tree, relative to it."""
    return sorted(str(p.relative_to(settings.storage_dir)) for p in settings.storage_dir.rglob("*"))


def queued_messages(settings: Settings) -> int:
    """How many messages the embedded broker holds."""
    return len(list((settings.broker_dir / "queue").iterdir()))


# ---- headers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("get", "/", 200),
        ("get", "/jobs", 200),
        ("get", "/healthz", 200),
        ("get", "/metrics", 200),
        ("get", "/api/v1/openapi.json", 200),
        ("get", f"/api/v1/jobs/{UNKNOWN}", 404),
        ("post", "/api/v1/jobs", 400),
        ("get", "/static/style.css", 200),
        ("get", "/static/job.js", 200),
        ("get", "/no/such/page", 404),
        ("get", f"/jobs/{UNKNOWN}", 404),
        ("delete", "/", 405),
        ("get", "/admin/", 503),
    ],
    ids=lambda v: str(v),
)
def test_every_response_carries_the_security_headers(
    client: FlaskClient, method: str, path: str, status: int
) -> None:
    """Pages, the API, static files and error answers all carry the same headers."""
    with getattr(client, method)(path) as response:
        assert response.status_code == status
        assert_security_headers(response)
        assert "Strict-Transport-Security" not in response.headers  # plain HTTP


def test_the_csp_allows_nothing_inline_nor_foreign() -> None:
    """No 'unsafe-inline' or 'unsafe-eval' anywhere, no wildcard, no data: scripts. The one
    other source is blob: images, which only the page's own script can make (the form's
    previews of the images chosen)."""
    for directive, sources in csp_directives(CONTENT_SECURITY_POLICY).items():
        for source in sources:
            allowed = ("'self'", "'none'", *(("blob:",) if directive == "img-src" else ()))
            assert source in allowed, (directive, source)


def test_hsts_only_over_https(client: FlaskClient) -> None:
    """Strict-Transport-Security is sent on HTTPS requests only."""
    secure = client.get("/", base_url="https://localhost")
    assert secure.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert_security_headers(secure)
    assert "Strict-Transport-Security" not in client.get("/").headers


#: Inline script or style in a template: blocked by the CSP, so never allowed.
INLINE = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>|\son[a-z]+\s*=|\sstyle\s*=|<style", re.I)
TEMPLATES = sorted((ROOT / "web" / "templates").rglob("*.html"))


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(
            path,
            id=str(path.relative_to(ROOT / "web" / "templates")),
        )
        for path in TEMPLATES
    ],
)
def test_no_template_has_inline_script_or_style(template: Path) -> None:
    """Every template keeps its scripts and styles in web/static, which the CSP allows."""
    found = INLINE.findall(template.read_text())
    assert not found, found


def test_the_status_page_loads_its_script_and_styles_from_static(client: FlaskClient) -> None:
    """The pages name only same-origin files for scripts and styles (what the CSP allows)."""
    response = submit_form(client)
    html = client.get(response.headers["Location"]).get_data(as_text=True)
    assert re.findall(r'<script src="([^"]+)"', html) == ["/static/job.js"]
    assert re.findall(r'<link rel="stylesheet" href="([^"]+)"', html) == ["/static/style.css"]
    assert not INLINE.search(html)


# ---- CSRF on the pages' forms --------------------------------------------------------------


def submit_form(client: FlaskClient, token: str | None = "page", **fields: Any) -> Any:
    """POST the submit form with a real PNG; ``token`` "page" reads it from the form."""
    data: dict[str, Any] = {"image": (io.BytesIO(png_bytes()), "in.png"), **fields}
    if token == "page":
        token = form_token(client)
    if token is not None:
        data["csrf_token"] = token
    return client.post("/", data=data)


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, "security token is missing"),
        ("", "security token is missing"),
        ("forged-token", "security token is wrong or out of date"),
    ],
    ids=["absent", "blank", "forged"],
)
def test_the_submit_form_needs_its_csrf_token(
    app: Flask, client: FlaskClient, settings: Settings, token: str | None, message: str
) -> None:
    """Without this session's token the form is refused 400 with the reason; nothing is
    written, and the form comes back (with a fresh token) to try again."""
    client.get("/")  # the session exists and has a token: only the form's copy is wrong
    response = submit_form(client, token, num_frames="6")
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert message in html
    assert re.search(r'<input id="num_frames" name="num_frames"[^>]*value="6"', html, re.DOTALL)
    assert job_count(app) == 0
    assert stored_files(settings) == []
    assert queued_messages(settings) == 0
    assert submit_form(client).status_code == 303  # with the page's token it goes through


def test_a_token_from_another_session_is_refused(app: Flask) -> None:
    """A token is bound to its session: another browser's token does not work here."""
    mine, theirs = app.test_client(), app.test_client()
    mine.get("/")  # this session has a token of its own
    response = submit_form(mine, form_token(theirs))
    assert response.status_code == 400
    assert "wrong or out of date" in response.get_data(as_text=True)
    assert job_count(app) == 0


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_cancel_from_the_page_needs_the_csrf_token(app: Flask, client: FlaskClient) -> None:
    """The status page's cancel without the token: 400 with the reason, the job untouched."""
    job_id = job_id_from(submit_form(client))
    for data in ({}, {"csrf_token": "forged"}):
        response = client.post(f"/jobs/{job_id}/cancel", data=data)
        assert response.status_code == 400
        assert "security token" in response.get_data(as_text=True)
        assert load_job(app, job_id).state is JobState.QUEUED
    token = form_token(client, f"/jobs/{job_id}")
    assert client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token}).status_code == 303
    assert load_job(app, job_id).state is JobState.CANCELED


def test_the_api_needs_no_token_and_sets_no_cookie(client: FlaskClient) -> None:
    """The JSON API is token-free, and uses no cookie a browser could replay."""
    form = {"image": (io.BytesIO(png_bytes()), "in.png")}
    created = client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")
    assert created.status_code == 201
    job_id = created.get_json()["id"]
    for response in (
        created,
        client.get(f"/api/v1/jobs/{job_id}"),
        client.post(f"/api/v1/jobs/{job_id}/cancel"),
    ):
        assert response.status_code in (200, 201, 202)
        assert "Set-Cookie" not in response.headers


# ---- the admin behind its login ------------------------------------------------------------


@pytest.fixture
def admin_app(settings_with: Any) -> Flask:
    """An app with the admin on (a hashed password)."""
    _, app = settings_with(SVDFARM_ADMIN_PASSWORD=hash_password("correct horse"))
    return app


def admin_rules(app: Flask) -> list[Any]:
    """Every route of the admin blueprint but its login page."""
    rules = [
        r
        for r in app.url_map.iter_rules()
        if r.endpoint.startswith("admin.") and r.endpoint != "admin.login"
    ]
    assert len(rules) >= 5, [r.rule for r in rules]
    return rules


def test_every_admin_route_needs_the_login(admin_app: Flask) -> None:
    """Each admin route (all of app.url_map's, not a list kept by hand) sends a visitor without
    a login to the login page: GETs directly, POSTs even with a valid CSRF token."""
    client = admin_app.test_client()
    for rule in admin_rules(admin_app):
        url = re.sub(r"<[^>]+>", UNKNOWN, rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            # A fresh token each time: logging out clears the session, and its token with it.
            token = form_token(client, "/admin/login")
            data = {"csrf_token": token, "action": "delete", "job": UNKNOWN}
            response = client.open(url, method=method, data=data if method == "POST" else None)
            if rule.endpoint == "admin.logout":
                # Logging out needs no login; it only ends a session.
                assert response.status_code in (302, 303), (method, url)
                continue
            assert response.status_code == 302, (method, url, response.status_code)
            assert response.headers["Location"].startswith("/admin/login"), (method, url)


def test_admin_posts_need_the_csrf_token(admin_app: Flask) -> None:
    """Every admin POST without the session's token is refused 400 before anything else."""
    client = admin_app.test_client()
    for rule in admin_rules(admin_app):
        if "POST" in (rule.methods or set()):
            url = re.sub(r"<[^>]+>", UNKNOWN, rule.rule)
            response = client.post(url, data={"action": "delete", "job": UNKNOWN})
            assert response.status_code == 400, url
            assert "security token" in response.get_data(as_text=True)


# ---- files only by job id, stored under generated names -----------------------------------


def test_only_static_files_are_served_by_path(app: Flask) -> None:
    """No route but /static takes a path; a job's files are reached by its id only."""
    by_path = [
        r.rule
        for r in app.url_map.iter_rules()
        if any(type(c).__name__ == "PathConverter" for c in r._converters.values())
    ]
    assert by_path == ["/static/<path:filename>"]
    for endpoint in ("pages.video", "pages.poster", "pages.input_image"):
        (rule,) = [r for r in app.url_map.iter_rules() if r.endpoint == endpoint]
        assert rule.arguments == {"job_id"}


@pytest.mark.parametrize(
    "path",
    [
        "/jobs/{queued}/video.mp4",
        "/jobs/{queued}/poster.png",
        "/jobs/..%2F..%2Fsecret_key/input",
        "/jobs/../secret_key",
        "/static/../secret_key",
        "/static/..%2F..%2Fsecret_key",
        "/static/%2e%2e/%2e%2e/svdfarm.db",
    ],
)
def test_no_file_without_a_finished_job_or_outside_static(
    client: FlaskClient, settings: Settings, path: str
) -> None:
    """A queued job has no video or poster (404); traversal never reaches the data folder."""
    secret = secrets.token_bytes(16).hex().encode()
    (settings.data_dir / "secret_key").write_bytes(secret)  # what an attacker would want
    queued = job_id_from(submit_form(client))
    with client.get(path.format(queued=queued)) as response:
        assert response.status_code == 404
        assert secret not in response.get_data()


def test_uploads_are_stored_under_generated_names(app: Flask, settings: Settings) -> None:
    """Whatever the client calls its file, it is stored as ``<job id>/input.<type>``; the name
    is kept as text for display only."""
    client = app.test_client()
    name = "../../../etc/cron.d/evil.png"
    form = {"image": (io.BytesIO(png_bytes()), name)}
    created = client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")
    job_id = created.get_json()["id"]
    assert stored_files(settings) == [job_id, f"{job_id}/input.png"]
    job = load_job(app, job_id)
    assert job.input_key == f"{job_id}/input.png"
    assert job.input_filename == name


def test_job_ids_are_random_uuids(client: FlaskClient) -> None:
    """Job ids are version-4 UUIDs (122 random bits): not guessable, not sequential."""
    ids = []
    for _ in range(3):
        form = {"image": (io.BytesIO(png_bytes()), "in.png")}
        ids.append(
            client.post("/api/v1/jobs", data=form, content_type="multipart/form-data").get_json()[
                "id"
            ]
        )
    assert len(set(ids)) == 3
    assert all(uuid.UUID(i).version == 4 for i in ids)


# ---- Celery accepts JSON only --------------------------------------------------------------


def test_celery_accepts_json_only(app: Flask, settings: Settings) -> None:
    """The web's and the worker's Celery app accept JSON only; a pickled message put on a
    queue is refused by a consumer with that setting, a JSON one is read."""
    for celery in (app.extensions["celery"], create_celery(settings)):
        assert list(celery.conf.accept_content) == ["json"]
        assert celery.conf.task_serializer == "json"
    celery = app.extensions["celery"]
    queue = Queue("svd.security-test", routing_key="svd.security-test")
    settings.ensure_dirs()
    with Connection(
        settings.broker_url, transport_options=celery.conf.broker_transport_options
    ) as conn:
        producer = conn.Producer()
        producer.publish(
            pickle.dumps({"evil": True}),
            routing_key=queue.routing_key,
            declare=[queue],
            content_type="application/x-python-serialize",
            content_encoding="binary",
        )
        producer.publish({"job": "ok"}, routing_key=queue.routing_key, serializer="json")
        received: list[Any] = []
        with Consumer(
            conn,
            [queue],
            accept=celery.conf.accept_content,
            on_message=received.append,
        ):
            for _ in range(2):
                conn.drain_events(timeout=5)
        # The embedded broker does not promise the order of two messages sent in the same ms.
        by_type = {message.content_type: message for message in received}
        pickled, plain = by_type["application/x-python-serialize"], by_type["application/json"]
        with pytest.raises(ContentDisallowed):
            pickled.decode()
        assert plain.decode() == {"job": "ok"}
        for message in received:
            message.ack()


# ---- production mode -----------------------------------------------------------------------


def _deploy_placeholders() -> set[str]:
    """The SVDFARM_SECRET_KEY placeholders the deploy examples ship."""
    found = set()
    for document in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "config.yaml").read_text()):
        value = (document or {}).get("stringData", {}).get("SVDFARM_SECRET_KEY")
        if value:
            found.add(value)
    readme = (ROOT / "deploy" / "README.md").read_text()
    found.update(re.findall(r"^SVDFARM_SECRET_KEY=(\S+)$", readme, re.MULTILINE))
    assert found, "no placeholder found in deploy/"
    return found


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SVDFARM_SECRET_KEY": ""}, "SVDFARM_SECRET_KEY is not set"),
        ({"SVDFARM_SECRET_KEY": "x" * (MIN_SECRET_LENGTH - 1)}, "has 31 characters"),
        ({"SVDFARM_SECRET_KEY": "change-me"}, "placeholder"),
        ({"SVDFARM_SECRET_KEY": "CHANGE-ME-TO-A-LONG-RANDOM-STRING"}, "placeholder"),
        ({"SVDFARM_ADMIN_PASSWORD": "hunter2"}, "SVDFARM_ADMIN_PASSWORD is a plain password"),
    ],
    ids=["unset", "short", "change-me", "deploy-placeholder", "plain-admin-password"],
)
def test_production_refuses_unsafe_settings(
    tmp_path: Path, database_url: str, tiny_model_dir: Path, env: dict[str, str], message: str
) -> None:
    """With SVDFARM_PRODUCTION=1 the app will not start on a missing, short or placeholder
    secret, or a plain admin password; it says which and how to fix it, writing nothing."""
    values = {
        "SVDFARM_SECRET_KEY": GOOD_SECRET,
        "SVDFARM_PRODUCTION": "1",
        "SVDFARM_AUTH": "keys",
        **env,
    }
    settings = make_settings(tmp_path / "var", database_url, tiny_model_dir, **values)
    with pytest.raises(SettingsError, match=re.escape(message)):
        create_app({"SVDFARM_SETTINGS": settings})
    assert not (settings.data_dir / "secret_key").exists()
    assert not settings.storage_dir.exists()


def test_every_deploy_placeholder_is_refused() -> None:
    """The secrets the deploy examples ship are on the refusal list, whatever their length."""
    for placeholder in _deploy_placeholders():
        assert placeholder.lower() in KNOWN_DEFAULT_SECRETS, placeholder


def test_production_starts_with_good_settings(settings_with: Any) -> None:
    """A long random secret and a hashed admin password start; the session cookie is
    Secure (HTTPS only), HttpOnly and SameSite=Lax."""
    _, app = settings_with(
        SVDFARM_PRODUCTION="1",
        SVDFARM_AUTH="keys",
        SVDFARM_SECRET_KEY=secrets.token_hex(32),
        SVDFARM_ADMIN_PASSWORD=hash_password("correct horse"),
    )
    assert app.config["SESSION_COOKIE_SECURE"] is True
    # Production runs with keys: the form sends to the login page, whose form sets the cookie.
    cookie = app.test_client().get("/login", base_url="https://localhost").headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_svdfarm_web_refuses_to_start_in_production_with_a_default_secret(
    tmp_path: Path,
) -> None:
    """``svdfarm web`` exits with an error naming the problem instead of serving."""
    env = {
        "PATH": "/usr/bin:/bin",
        "SVDFARM_DATA_DIR": str(tmp_path / "var"),
        "SVDFARM_MODEL": "tiny",
        "SVDFARM_PRODUCTION": "1",
        "SVDFARM_SECRET_KEY": "change-me",
    }
    result = subprocess.run(
        [sys.executable, "-m", "cli", "web", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "SVDFARM_SECRET_KEY is a placeholder" in result.stderr
    assert "svdfarm web on" not in result.stdout


# ---- proxies and the client's address ------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_client_address_comes_from_trusted_proxies_only(settings_with: Any) -> None:
    """X-Forwarded-For names the client only when SVDFARM_TRUSTED_PROXIES says a proxy is
    there; otherwise a client could spoof it to dodge the per-client limit."""
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    for proxies, client_seen, hsts in (("0", "127.0.0.1", False), ("1", "203.0.113.7", True)):
        _, app = settings_with(SVDFARM_TRUSTED_PROXIES=proxies)
        form = {"image": (io.BytesIO(png_bytes()), "in.png")}
        response = app.test_client().post(
            "/api/v1/jobs", data=form, content_type="multipart/form-data", headers=forwarded
        )
        assert response.status_code == 201
        assert load_job(app, response.get_json()["id"]).client == client_seen
        assert ("Strict-Transport-Security" in response.headers) is hsts
        assert response.get_json()["status_url"].startswith("https://" if hsts else "http://")


# ---- limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_upload_limit_is_configurable(settings_with: Any) -> None:
    """A small SVDFARM_MAX_UPLOAD_BYTES refuses a bigger image 413 with the limit named,
    through the API and the form, and writes nothing."""
    settings, app = settings_with(SVDFARM_MAX_UPLOAD_BYTES="4096")
    big = noisy_png_bytes(64, 64)
    assert len(big) > 4096
    client = app.test_client()
    api = client.post(
        "/api/v1/jobs",
        data={"image": (io.BytesIO(big), "big.png")},
        content_type="multipart/form-data",
    )
    assert api.status_code == 413
    assert "the limit is 4,096 bytes" in api.get_json()["error"]
    form = client.post(
        "/", data={"image": (io.BytesIO(big), "big.png"), "csrf_token": form_token(client)}
    )
    assert form.status_code == 413
    assert "the limit is 4,096 bytes" in form.get_data(as_text=True)
    assert job_count(app) == 0 and stored_files(settings) == []


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_the_form_says_when_a_client_submits_too_often(settings_with: Any) -> None:
    """Over SVDFARM_SUBMIT_RATE per minute the form answers 429 with Retry-After and the
    reason, keeps the typed values, and records nothing more."""
    settings, app = settings_with(SVDFARM_SUBMIT_RATE="1")
    client = app.test_client()
    assert submit_form(client).status_code == 303
    refused = submit_form(client, num_frames="6")
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    html = refused.get_data(as_text=True)
    assert "Too many submissions: at most 1 per minute" in html
    assert re.search(r'<input id="num_frames" name="num_frames"[^>]*value="6"', html, re.DOTALL)
    assert job_count(app) == 1 and queued_messages(settings) == 1


def test_the_form_says_when_the_farm_is_full(settings_with: Any) -> None:
    """Over SVDFARM_MAX_QUEUED waiting jobs the form answers 503 with Retry-After."""
    _, app = settings_with(SVDFARM_MAX_QUEUED="1", SVDFARM_SUBMIT_RATE="0")
    client = app.test_client()
    assert submit_form(client).status_code == 303
    refused = submit_form(client)
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert "The farm is full" in refused.get_data(as_text=True)
    assert job_count(app) == 1
