"""The web side's protections: security headers, CSRF tokens, production checks, proxies.

- Every response carries a Content-Security-Policy that allows scripts, styles, images, media
  and fetches from this origin only (no inline script or style, no plugins, no framing), plus
  ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and
  ``Referrer-Policy: same-origin``; ``Strict-Transport-Security`` only over HTTPS.
- Every form POST of the pages carries the session's CSRF token in a ``csrf_token`` field
  (:func:`csrf_token` puts it in templates, :func:`csrf_problem` checks it). The JSON API under
  ``/api/`` uses no cookies and needs no token.
- With ``SVDFARM_PRODUCTION=1`` the app refuses to start on a missing, short or placeholder
  ``SVDFARM_SECRET_KEY`` or a plain-text ``SVDFARM_ADMIN_PASSWORD``
  (:meth:`svdfarm.settings.Settings.check_production`), and the session cookie is sent over
  HTTPS only.
- Behind ``SVDFARM_TRUSTED_PROXIES`` reverse proxies, werkzeug's ``ProxyFix`` takes the client's
  address and scheme from their ``X-Forwarded-For`` and ``X-Forwarded-Proto`` headers, so
  :func:`client_address` (the per-client submit limit's key) is the real client.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from flask import Flask, Response, abort, request, session
from werkzeug.middleware.proxy_fix import ProxyFix

from svdfarm.settings import Settings

#: The policy every response carries: this origin only, nothing inline, never in a frame
#: (``blob:`` images: the form's previews of the images chosen, made by its own script).
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "media-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
#: Sent over HTTPS only: browsers ignore it over plain HTTP, and it must not pin a plain site.
STRICT_TRANSPORT_SECURITY = "max-age=31536000"

CSRF_FIELD = "csrf_token"
_SESSION_CSRF = "csrf"
CSRF_MISSING = "The form's security token is missing: reload the page and submit it again."
CSRF_WRONG = (
    "The form's security token is wrong or out of date: reload the page and submit it again."
)


def init_app(app: Flask, settings: Settings) -> None:
    """Trust the configured proxies, add the headers to every response, give templates the CSRF
    token; in production, send the session cookie over HTTPS only.

    ``create_app`` runs the settings' ``check_production`` first, before anything is written.
    """
    if settings.production:
        app.config["SESSION_COOKIE_SECURE"] = True
    if settings.trusted_proxies:
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)  # type: ignore[method-assign]
    app.after_request(add_security_headers)
    app.context_processor(_template_helpers)


def add_security_headers(response: Response) -> Response:
    """Add the security headers to ``response`` (those a view set itself are kept)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.is_secure:
        response.headers.setdefault("Strict-Transport-Security", STRICT_TRANSPORT_SECURITY)
    return response


def _template_helpers() -> dict[str, Any]:
    """``csrf_token()`` for every template's forms."""
    return {"csrf_token": csrf_token}


def client_address() -> str:
    """The client's IP address: the TCP peer, or the proxies' ``X-Forwarded-For`` when trusted."""
    return request.remote_addr or "unknown"


def csrf_token() -> str:
    """This session's CSRF token, made on first use; every form POST carries it."""
    token = session.get(_SESSION_CSRF)
    if not isinstance(token, str) or not token:
        token = new_csrf_token()
    return token


def new_csrf_token() -> str:
    """Give the session a fresh CSRF token (at login, so a token from before is void)."""
    token = secrets.token_urlsafe(32)
    session[_SESSION_CSRF] = token
    return token


def csrf_problem() -> str | None:
    """Why the POSTed form's CSRF token is refused, or None when it is this session's token."""
    expected = session.get(_SESSION_CSRF)
    given = request.form.get(CSRF_FIELD, "")
    if not isinstance(expected, str) or not expected or not given:
        return CSRF_MISSING
    if not hmac.compare_digest(expected.encode(), given.encode()):
        return CSRF_WRONG
    return None


def check_csrf() -> None:
    """Abort with 400 and the reason unless the POSTed form carries this session's token."""
    problem = csrf_problem()
    if problem:
        abort(400, description=problem)
