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
