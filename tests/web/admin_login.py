"""The admin's login in tests: the password, an app with the admin on, the login form."""

from __future__ import annotations

import re

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from svdfarm.settings import Settings
from web import create_app

PASSWORD = "correct horse battery staple"


def register_admin(app: Flask) -> Flask:
    """Register the admin and metrics blueprints unless create_app already does."""
    from web.admin import bp as admin_bp
    from web.metrics import bp as metrics_bp

    for bp in (admin_bp, metrics_bp):
        if bp.name not in app.blueprints:
            app.register_blueprint(bp)
    return app


def admin_app(settings: Settings, admin_password: str) -> Flask:
    """The web app with the admin on, using ``admin_password`` (a hash or plain)."""
    configured = settings.with_overrides(admin_password=admin_password)
    return register_admin(create_app({"SVDFARM_SETTINGS": configured, "TESTING": True}))


def token(client: FlaskClient, path: str = "/admin/login") -> str:
    """The CSRF token of the form on ``path``."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).get_data(True))
    assert found, f"no CSRF field on {path}"
    return found.group(1)


def log_in(client: FlaskClient, password: str = PASSWORD, **environ: str) -> TestResponse:
    """Submit the login form with its CSRF token."""
    csrf = token(client)
    return client.post(
        "/admin/login",
        data={"password": password, "csrf_token": csrf, "next": "/admin/"},
        environ_base=environ,
    )
