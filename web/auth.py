"""The admin login: a password from ``SVDFARM_ADMIN_PASSWORD``, a session, CSRF, a rate limit.

- ``SVDFARM_ADMIN_PASSWORD`` holds a werkzeug password hash (``scrypt:...`` or
  ``pbkdf2:...``, made with ``svdfarm admin hash-password``). A value without a known method
  prefix is taken as a plain password, for local use, with a warning logged once per app.
  Unset, the admin is disabled and every ``/admin`` page says how to turn it on.
- The login lives in Flask's signed session cookie (HttpOnly, SameSite=Lax, set by
  ``create_app``), marked permanent, and expires :data:`LOGIN_LIFETIME` after login whatever
  the cookie's own lifetime.
- Every POST under ``/admin`` must carry the session's CSRF token in a ``csrf_token`` form
  field (:func:`csrf_token` puts it in templates); otherwise 400.
- :class:`LoginLimiter` allows :data:`MAX_FAILURES` failed logins per client IP in
  :data:`FAILURE_WINDOW`, then answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

from flask import current_app, redirect, render_template, request, session, url_for
from werkzeug.security import check_password_hash, generate_password_hash

from svdfarm.settings import is_password_hash
from web.security import (  # noqa: F401 - the admin views use them as auth.*
    CSRF_FIELD,
    check_csrf,
    client_address,
    csrf_token,
    new_csrf_token,
)

log = logging.getLogger(__name__)

#: Method prefixes of werkzeug password hashes; anything else is a plain password.
LOGIN_LIFETIME = timedelta(hours=12)
MAX_FAILURES = 5
FAILURE_WINDOW = timedelta(minutes=15)
_SESSION_USER = "admin_login_until"
_LIMITER_KEY = "svdfarm.admin_limiter"

F = TypeVar("F", bound=Callable[..., Any])


def hash_password(plain: str) -> str:
    """A hash of ``plain`` for ``SVDFARM_ADMIN_PASSWORD`` (werkzeug's default method, scrypt)."""
    if not plain:
        raise ValueError("The admin password must not be empty.")
    return generate_password_hash(plain)


def check_password(configured: str, given: str) -> bool:
    """True when ``given`` matches the configured hash (or plain password); constant time."""
    if not configured or not given:
        return False
    if is_password_hash(configured):
        try:
            return check_password_hash(configured, given)
        except ValueError:  # a damaged hash: nobody can log in until it is fixed
            log.error("SVDFARM_ADMIN_PASSWORD is not a valid password hash; make a new one.")
            return False
    return hmac.compare_digest(configured.encode(), given.encode())


def warn_if_plain(configured: str) -> None:
    """Log once, at app setup, that the admin password is stored in plain text."""
    if configured and not is_password_hash(configured):
        log.warning(
            "SVDFARM_ADMIN_PASSWORD is a plain password, not a hash: fine on your own machine, "
            "but set a hash elsewhere (make one with `svdfarm admin hash-password`)."
        )


def admin_password() -> str:
    """The configured ``SVDFARM_ADMIN_PASSWORD`` of the running app ('' when unset)."""
    return str(current_app.config["SVDFARM_SETTINGS"].admin_password)


class LoginLimiter:
    """Failed logins per client IP over a sliding window, kept in this process's memory.

    Memory is enough for one web process; with several processes or hosts each keeps its own
    count, so the real limit is ``MAX_FAILURES`` times their number. Behind a reverse proxy,
    apply werkzeug's ``ProxyFix`` so ``request.remote_addr`` is the client's address.
    """

    def __init__(
        self, max_failures: int = MAX_FAILURES, window_s: float = FAILURE_WINDOW.total_seconds()
    ) -> None:
        """Allow ``max_failures`` failures per client within ``window_s`` seconds."""
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        """The client's failures still inside the window (older ones dropped)."""
        failures = self._failures.setdefault(client, deque())
        while failures and now - failures[0] >= self.window_s:
            failures.popleft()
        return failures

    def retry_after(self, client: str, now: float | None = None) -> int:
        """Seconds until ``client`` may try again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            failures = self._recent(client, now)
            if len(failures) < self.max_failures:
                return 0
            return max(1, int(failures[0] + self.window_s - now + 0.999))

    def failed(self, client: str, now: float | None = None) -> None:
        """Count one failed login of ``client``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._recent(client, now).append(now)

    def reset(self, client: str) -> None:
        """Forget ``client``'s failures (after a successful login)."""
        with self._lock:
            self._failures.pop(client, None)


def limiter(key: str = _LIMITER_KEY) -> LoginLimiter:
    """The running app's :class:`LoginLimiter` named ``key`` (the admin's by default; the
    users' login keeps its own), made on first use."""
    extensions = current_app.extensions
    if key not in extensions:
        extensions[key] = LoginLimiter()
    found: LoginLimiter = extensions[key]
    return found


def admin_guard() -> Any:
    """Before every admin request: off without a password (503 with how to turn it on), and
    every POST must carry the CSRF token."""
    if not admin_password():
        return render_template("admin/disabled.html"), 503
    if request.method == "POST":
        check_csrf()
    return None


def too_many_failures(wait_s: int) -> str:
    """The refusal after too many failed logins, with the wait in minutes."""
    return (
        f"Too many failed logins from this address: try again in {-(-wait_s // 60)} min "
        f"({MAX_FAILURES} failures are allowed per "
        f"{int(FAILURE_WINDOW.total_seconds() // 60)} minutes)."
    )


def safe_next(target: str | None, default: str) -> str:
    """``target`` when it is a path inside the admin (no open redirect), else ``default``."""
    if target and target.startswith("/admin") and "//" not in target and "\\" not in target:
        return target
    return default


def log_in() -> None:
    """Start an admin session: a fresh session (no fixation), a new CSRF token, an expiry."""
    session.clear()
    session.permanent = True
    session[_SESSION_USER] = time.time() + LOGIN_LIFETIME.total_seconds()
    new_csrf_token()


def log_out() -> None:
    """End the admin session."""
    session.clear()


def logged_in() -> bool:
    """True when this session holds an admin login that has not expired."""
    until = session.get(_SESSION_USER)
    return isinstance(until, (int, float)) and time.time() < until


def login_required(view: F) -> F:
    """Send visitors without an admin login to the login page, then back to ``view``."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        """Run ``view`` for a logged-in admin; otherwise redirect to the login page."""
        if not logged_in():
            return redirect(url_for("admin.login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return cast(F, wrapped)
