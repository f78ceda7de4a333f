"""Fixtures of the web tests."""

from __future__ import annotations

import pytest

from tests.web.admin_login import PASSWORD
from web.auth import hash_password


@pytest.fixture(scope="session")
def password_hash() -> str:
    """The admin password's hash, made once (scrypt is slow on purpose)."""
    return hash_password(PASSWORD)
