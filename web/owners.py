"""Who is asking: each request's caller, resolved once, and the jobs it may see.

Every job has an owner (:mod:`svdfarm.users`). The caller of a request is, first match wins:

1. ``Authorization: Bearer <key>``: the key's user (owner ``user:<id>``; an admin user sees
   every job). A key that is sent must be good, in either ``SVDFARM_AUTH`` mode: an unknown,
   revoked or malformed key, or a disabled user's, is answered 401 with
   ``WWW-Authenticate: Bearer realm="svdfarm"`` (other ``Authorization`` schemes are ignored).
2. The admin's password login (:mod:`web.auth`): the user ``admin`` (made on first use); it
   sees every job, and its own jobs are those it submits.
3. A user's own login (``/login``, name and password): the session keeps the user's id and
   the user is read again on every request, so a disabled user is refused at the next one.
4. Otherwise the caller is anonymous. In open mode (``SVDFARM_AUTH=open``, the default) a
   browser session gets an ``anon:<random hex>`` id in Flask's signed session cookie the first
   time it submits through the form, and an API client without a key is ``addr:<its address>``
   (:func:`web.security.client_address`). An anonymous caller may see the jobs of both: a
   browser sees its own session's jobs and the key-less API jobs of its address; new jobs get
   the session's id from the form and the address from the API.

In keys mode (``SVDFARM_AUTH=keys``) an anonymous caller gets nothing but the public routes:
every ``/api/v1`` route except ``GET /api/v1/models`` and the OpenAPI document answers 401,
and the form, "My jobs" and every job and batch page send it to ``/login`` (303).
``/healthz``, ``/metrics``, ``/static`` and the admin (which has its own login) are unchanged.

Logins live in the session cookie (HttpOnly, SameSite=Lax), so a browser's page scripts read
the API as the logged-in user. A cookie-borne login is not used for a POST under ``/api/``
that says it comes from another site (``Origin`` of another host or
``Sec-Fetch-Site: cross-site``): the API takes no CSRF token, keys are its credentials.

A job or batch the caller may not see is answered 404 exactly as an unknown id
(:func:`may_see`), so ids of others' jobs cannot be told from ids of none.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any, NoReturn
from urllib.parse import urlsplit

from flask import abort, current_app, g, jsonify, redirect, request, session, url_for
from werkzeug.exceptions import HTTPException

from svdfarm.models import Job, User
from svdfarm.settings import AuthMode, Settings
from svdfarm.users import admin_user, authenticate_key, limits_of, owner_names
from web import auth
from web.database import get_session
from web.security import client_address

#: Session keys: the anonymous browser's owner id, the logged-in user's id and expiry.
SESSION_ANON = "anon"
SESSION_USER = "user_id"
SESSION_USER_UNTIL = "user_login_until"
#: How long a user's login lasts, whatever the cookie's own lifetime.
USER_LOGIN_LIFETIME = timedelta(hours=12)
#: The realm of the ``WWW-Authenticate`` challenge.
REALM = 'Bearer realm="svdfarm"'
#: Endpoints anyone may reach in keys mode (the rest of ``api.*`` and ``pages.*`` need a
#: caller); endpoints of other blueprints (health, metrics, static, admin) are never gated.
PUBLIC_ENDPOINTS = frozenset(
    {
        "api.models",
        "openapi.document",
        "pages.login",
        "pages.login_post",
        "pages.logout",
        "pages.favicon",
    }
)
GATED_BLUEPRINTS = ("api", "openapi", "pages")
_G_CALLER = "svdfarm_caller"
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})

NEEDS_KEY = (
    "This farm needs an API key: send it as 'Authorization: Bearer <key>' (an admin makes "
    "one with 'svdfarm keys create')."
)
BAD_KEY = "The API key is not valid: it is unknown, malformed or revoked, or its user is disabled."


class Via(str, Enum):
    """How the caller was recognised."""

    KEY = "key"
    LOGIN = "login"
    ADMIN = "admin"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Caller:
    """The caller of one request: the owner its new jobs get, the owners whose jobs it may
    see (an admin sees every job besides), its user, and how it was recognised."""

    owner: str
    identities: frozenset[str]
    user: User | None
    is_admin: bool
    via: Via

    def may_see(self, owner: str) -> bool:
        """True when the caller may see a job of ``owner``."""
        return self.is_admin or owner in self.identities

    @property
    def name(self) -> str:
        """The user's name, or ``anonymous``."""
        return self.user.name if self.user is not None else "anonymous"


def settings() -> Settings:
    """The running app's settings."""
    found: Settings = current_app.config["SVDFARM_SETTINGS"]
    return found


def is_api_request() -> bool:
    """True for a request under ``/api/``."""
    return request.path.startswith("/api/")


def unauthorized(message: str) -> NoReturn:
    """Abort with 401, ``{"error": message}`` and the Bearer challenge."""
    response = jsonify({"error": message})
    response.status_code = 401
    response.headers["WWW-Authenticate"] = REALM
    abort(response)


def _bearer() -> str | None:
    """The key of an ``Authorization: Bearer`` header; None when there is no such header."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip()


def _cross_site() -> bool:
    """True for an unsafe API request that says it comes from another site: its cookie's
    login is not used (the API takes no CSRF token)."""
    if not is_api_request() or request.method not in _UNSAFE:
        return False
    if request.headers.get("Sec-Fetch-Site", "") == "cross-site":
        return True
    origin = request.headers.get("Origin", "")
    return bool(origin) and urlsplit(origin).netloc != request.host


def _session_user() -> User | None:
    """The enabled user of this session's login (None, and the login dropped, when it
    expired or the user is gone or disabled)."""
    user_id = session.get(SESSION_USER)
    if user_id is None:
        return None
    until = session.get(SESSION_USER_UNTIL)
    user = None
    if isinstance(user_id, int) and isinstance(until, (int, float)) and time.time() < until:
        user = get_session().get(User, user_id)
    if user is None or user.disabled_at is not None:
        session.pop(SESSION_USER, None)
        session.pop(SESSION_USER_UNTIL, None)
        return None
    return user


def _known(user: User, via: Via) -> Caller:
    """The caller of a recognised user."""
    return Caller(
        owner=user.owner,
        identities=frozenset({user.owner}),
        user=user,
        is_admin=bool(user.is_admin) or via is Via.ADMIN,
        via=via,
    )


def _resolve(*, make_anon: bool) -> Caller:
    """Work out this request's caller (see the module's docstring)."""
    key = _bearer()
    if key is not None:
        db = get_session()
        user = authenticate_key(db, key)
        if user is None:
            db.rollback()
            unauthorized(BAD_KEY)
        db.commit()  # the key's last use, written at most once a minute
        return _known(user, Via.KEY)
    if not _cross_site():
        if auth.logged_in():
            db = get_session()
            admin = admin_user(db)
            db.commit()
            return _known(admin, Via.ADMIN)
        user = _session_user()
        if user is not None:
            return _known(user, Via.LOGIN)
    anon = session.get(SESSION_ANON)
    if (not isinstance(anon, str) or not anon.startswith("anon:")) and make_anon:
        anon = f"anon:{secrets.token_hex(16)}"
        session[SESSION_ANON] = anon
        session.permanent = True
    anon = anon if isinstance(anon, str) and anon.startswith("anon:") else ""
    address = f"addr:{client_address()}"[:80]
    owner = address if is_api_request() else anon
    return Caller(
        owner=owner,
        identities=frozenset(i for i in (anon, address) if i),
        user=None,
        is_admin=False,
        via=Via.ANONYMOUS,
    )


def current_caller() -> Caller:
    """This request's caller, resolved once (401 for a bad API key)."""
    found: Caller | None = g.get(_G_CALLER)
    if found is None:
        found = _resolve(make_anon=False)
        setattr(g, _G_CALLER, found)
    return found


def submitting_caller() -> Caller:
    """This request's caller as a submitter: an anonymous browser session gets its
    ``anon:<hex>`` id now if it has none, so the job it submits has an owner."""
    found = current_caller()
    if found.via is Via.ANONYMOUS and not found.owner:
        found = _resolve(make_anon=True)
        setattr(g, _G_CALLER, found)
    return found


def may_see(job: Job) -> bool:
    """True when this request's caller may see ``job``."""
    return current_caller().may_see(job.owner)


def max_priority() -> int:
    """The highest priority this request's caller may give a job."""
    caller = current_caller()
    if caller.user is not None:
        return int(caller.user.max_priority)
    return limits_of(get_session(), [caller.owner])[caller.owner].max_priority


def shown_owner(owner: str, names: dict[str, str] | None = None) -> str:
    """``owner`` as this request's caller may read it: its own user name, else ``anonymous``;
    the admin reads every owner's name (and an anonymous API client's address). ``names``:
    :func:`svdfarm.users.owner_names` already read, to spare a query."""
    caller = current_caller()
    if caller.user is not None and owner == caller.owner:
        return caller.user.name
    if not caller.is_admin:
        return "anonymous"
    if names is None or owner not in names:
        names = display_names([owner])
    return names[owner]


def display_names(owners: Iterable[str]) -> dict[str, str]:
    """Each owner as the admin reads it: a user's name, ``anonymous`` or ``anonymous
    (address)`` (:func:`svdfarm.users.owner_names`, in this request's session)."""
    return owner_names(get_session(), owners)


def safe_next(target: str | None, default: str = "/") -> str:
    """``target`` when it is a path on this site outside the API (no open redirect), else
    ``default``."""
    if (
        target
        and target.startswith("/")
        and not target.startswith("/api/")
        and "//" not in target
        and "\\" not in target
    ):
        return target
    return default


def gate() -> Any:
    """Before each request: refuse a bad API key (401, either mode); in keys mode answer an
    anonymous caller 401 under ``/api/`` and send it to the login page elsewhere (303)."""
    endpoint = request.endpoint or ""
    if not endpoint or endpoint in PUBLIC_ENDPOINTS:
        return None
    if endpoint.split(".", 1)[0] not in GATED_BLUEPRINTS:
        return None
    caller = current_caller()
    if settings().auth is not AuthMode.KEYS or caller.via is not Via.ANONYMOUS:
        return None
    if is_api_request():
        unauthorized(NEEDS_KEY)
    return redirect(url_for("pages.login", next=request.full_path.rstrip("?")), code=303)


def signed_in() -> Caller | None:
    """For the page header: the caller when a person is logged in to show a name and a log-out
    button for (a user's login; the admin's in keys mode), else None. Never raises."""
    try:
        caller = current_caller()
    except HTTPException:
        return None
    if caller.via is Via.LOGIN:
        return caller
    if caller.via is Via.ADMIN and settings().auth is AuthMode.KEYS:
        return caller
    return None


def log_in_user(user: User) -> None:
    """Start a user's login: a fresh session (no fixation), a new CSRF token, an expiry."""
    from web.security import new_csrf_token

    session.clear()
    session.permanent = True
    session[SESSION_USER] = user.id
    session[SESSION_USER_UNTIL] = time.time() + USER_LOGIN_LIFETIME.total_seconds()
    new_csrf_token()
    g.pop(_G_CALLER, None)


def log_out() -> None:
    """End whatever login this session holds (and its anonymous id)."""
    session.clear()
    g.pop(_G_CALLER, None)
