"""svdfarm's web side: the Flask app factory. Imports no torch."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from flask import Flask, render_template, request
from werkzeug.exceptions import HTTPException

from svdfarm.celery_app import create_celery
from svdfarm.images import format_size
from svdfarm.settings import Settings, load_settings, persistent_secret
from web import security

#: Room for the form fields around an upload of the largest allowed image.
FORM_OVERHEAD_BYTES = 64 * 1024


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Create the web app; ``test_config`` may carry ``SVDFARM_SETTINGS`` and Flask options.

    Raises :class:`~svdfarm.settings.SettingsError` when production mode is on with unsafe
    settings (:meth:`svdfarm.settings.Settings.check_production`).
    """
    test_config = dict(test_config or {})
    settings: Settings = test_config.pop("SVDFARM_SETTINGS", None) or load_settings()
    settings.check_production()  # before anything is written
    settings.ensure_dirs()

    app = Flask(__name__)
    app.config.from_mapping(
        SECRET_KEY=persistent_secret(settings),
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(hours=12),
        SVDFARM_SETTINGS=settings,
    )
    app.config.update(test_config)

    from web import database

    security.init_app(app, settings)
    database.init_app(app, settings)
    app.extensions["celery"] = create_celery(settings)

    from web.admin import bp as admin_bp
    from web.admin_users import bp as admin_users_bp
    from web.admin_webhooks import bp as admin_webhooks_bp
    from web.api import bp as api_bp
    from web.health import bp as health_bp
    from web.metrics import bp as metrics_bp
    from web.openapi import bp as openapi_bp
    from web.pages import bp as pages_bp
    from web.streams import bp as streams_bp
    from web.streams import init_app as init_streams

    app.register_blueprint(pages_bp)
    app.register_blueprint(api_bp)
    app.register_blueprint(openapi_bp)
    app.register_blueprint(health_bp)
    app.register_blueprint(admin_bp)
    app.register_blueprint(admin_users_bp)
    app.register_blueprint(admin_webhooks_bp)
    app.register_blueprint(metrics_bp)
    app.register_blueprint(streams_bp)
    init_streams(app)

    too_large = f"The upload is larger than the {format_size(settings.max_upload_bytes)} limit."

    def _too_large_message() -> str:
        """Why werkzeug refused the body 413: its size, or (under the size limit) a form of
        more parts, or a longer text field, than Flask allows."""
        length = request.content_length
        if length is None or length > app.config["MAX_CONTENT_LENGTH"]:
            return too_large
        return (
            f"The form has more than {app.config['MAX_FORM_PARTS']:,} parts or a text field over "
            f"{format_size(app.config['MAX_FORM_MEMORY_SIZE'])}: send the image and the "
            "documented fields only."
        )

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        """JSON errors under /api, the site's error page elsewhere; both keep the exception's
        headers (``Allow`` on a 405)."""
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        if request.path.startswith("/api/"):
            from web.api import error_response

            message = exc.description or exc.name
            if exc.code == 413:
                message = _too_large_message()
            response, status = error_response(message, exc.code or 500)
            response.headers.extend(headers)
            return response, status
        if exc.code == 413:
            from web.pages import form_page

            return form_page({"image": _too_large_message()}, 413)
        return error_page(exc), exc.code or 500, headers

    return app


def error_page(exc: HTTPException) -> str:
    """The error page: the status and its name, what went wrong, and the way back.

    A 500's description is werkzeug's generic one: an exception's text never reaches it.
    """
    return render_template(
        "error.html", code=exc.code or 500, name=exc.name, message=exc.description
    )
