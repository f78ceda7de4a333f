"""Fixtures of the web tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from svdfarm.settings import Settings
from tests.web.admin_login import PASSWORD, admin_app, log_in
from web.auth import hash_password


@pytest.fixture(scope="session")
def password_hash() -> str:
    """The admin password's hash, made once (scrypt is slow on purpose)."""
    return hash_password(PASSWORD)


@pytest.fixture
def admin(settings: Settings, password_hash: str) -> Iterator[FlaskClient]:
    """A client of the web app with the admin on (``SVDFARM_ADMIN_PASSWORD``: a hash),
    logged in. (test_admin.py and test_admin_users.py keep their own, over their ``app``.)"""
    flask_app = admin_app(settings, password_hash)
    client = flask_app.test_client()
    assert log_in(client).status_code == 303
    yield client
    flask_app.extensions["svdfarm.db"].dispose()


@pytest.fixture
def same_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hypothesis draws the same examples in a full run as in a file run alone.

    Besides its seed (``derandomize``), Hypothesis mixes in literals it reads from every local
    module imported so far, so a test's examples depend on which tests ran before it. A full
    run once drew an example that schemathesis' negative generation cannot build ("Unsupported
    type: 'Binary'"), which the same test alone never drew. This leaves those literals out.
    """
    from hypothesis.internal.conjecture import providers

    empty = providers.Constants(
        integers=providers.SortedSet(),
        floats=providers.SortedSet(key=providers.float_to_int),
        bytes=providers.SortedSet(),
        strings=providers.SortedSet(),
    )
    monkeypatch.setattr(providers, "_get_local_constants", lambda: empty)
