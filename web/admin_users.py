"""The admin's users page under ``/admin/users``: users, their limits and API keys.

Every page needs the admin login and every POST its CSRF token (web/auth.py), as on the other
admin pages. The forms go through :mod:`svdfarm.users`, as ``svdfarm users`` and ``svdfarm
keys`` do. Bad input shows the page again with the reason, status 400, and writes nothing; a
new API key is shown once, on the page the form's POST answers, and never again.
"""

from __future__ import annotations

from typing import Any

from flask import (
    Blueprint,
    abort,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.datastructures import MultiDict

from svdfarm.models import ApiKey, User
from svdfarm.users import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    Limits,
    UserError,
    add_user,
    check_limits,
    create_key,
    disable_user,
    enable_user,
    list_users,
    live_keys,
    revoke_key,
    set_limits,
)
from web import auth
from web.admin import template_helpers
from web.database import get_session

bp = Blueprint("admin_users", __name__, url_prefix="/admin/users")


bp.before_request(auth.admin_guard)


bp.context_processor(template_helpers)


def _int_field(form: MultiDict[str, str], name: str, label: str) -> int | None:
    """The form's ``name`` as an integer, None when blank; :class:`UserError` otherwise."""
    raw = form.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"The {label} must be a whole number, not {raw[:20]!r}.") from None


def limits_from(form: MultiDict[str, str]) -> Limits:
    """The limits a form gives (blank queued or running: no limit; blank priority: 0; blank
    share: 1); :class:`UserError` names the first that is not a number or out of range."""
    raw_share = form.get("share", "").strip()
    try:
        share = float(raw_share) if raw_share else 1.0
    except ValueError:
        raise UserError(f"The share must be a number, not {raw_share[:20]!r}.") from None
    if share != share:  # NaN passes no range check
        raise UserError("The share must be a number.")
    return check_limits(
        max_queued=_int_field(form, "max_queued", "max queued limit"),
        max_running=_int_field(form, "max_running", "max running limit"),
        max_priority=_int_field(form, "max_priority", "max priority") or 0,
        share=share,
    )


def _page(
    *,
    error: str | None = None,
    status: int = 200,
    new_key: str | None = None,
    form: MultiDict[str, str] | None = None,
) -> Any:
    """The users page, with an error (nothing written; ``form``: the add form's values to
    show again) or a new key, shown once."""
    session = get_session()
    if error is not None:
        session.rollback()
    users = list_users(session)
    page = render_template(
        "admin/users.html",
        users=users,
        live={user.id: len(live_keys(user)) for user in users},
        error=error,
        new_key=new_key,
        form=form or {},
        priorities=(MIN_PRIORITY, MAX_PRIORITY),
    )
    response = make_response(page, status)
    response.headers["Cache-Control"] = "no-store"  # a new key must not be kept anywhere
    return response


def _user(user_id: int) -> User:
    """The user with this id, or 404."""
    user = get_session().get(User, user_id)
    if user is None:
        abort(404, description=f"No user with id {user_id}.")
    return user


def _done(message: str) -> Any:
    """Commit, flash ``message`` and go back to the users page."""
    get_session().commit()
    flash(message, "ok")
    return redirect(url_for("admin_users.index"), code=303)


@bp.get("/")
@auth.login_required
def index() -> Any:
    """Every user with their limits, live keys and forms to manage them."""
    return _page()


@bp.post("/")
@auth.login_required
def add() -> Any:
    """Add a user from the form (name, admin, optional password, limits)."""
    session = get_session()
    try:
        limits = limits_from(request.form)
        user = add_user(
            session,
            request.form.get("name", "").strip(),
            admin=bool(request.form.get("admin")),
            password=request.form.get("password") or None,
            limits=limits,
        )
    except UserError as exc:
        return _page(error=str(exc), status=400, form=request.form)
    return _done(f"User {user.name!r} added.")


@bp.post("/<int:user_id>/limits")
@auth.login_required
def limits(user_id: int) -> Any:
    """Replace a user's limits and share."""
    user = _user(user_id)
    try:
        set_limits(get_session(), user.name, limits=limits_from(request.form))
    except UserError as exc:
        return _page(error=f"Limits of {user.name!r} not changed: {exc}", status=400)
    return _done(f"Limits of {user.name!r} changed.")


@bp.post("/<int:user_id>/disable")
@auth.login_required
def disable(user_id: int) -> Any:
    """Disable a user: their keys and login are refused from the next request on."""
    user = disable_user(get_session(), _user(user_id).name)
    return _done(f"User {user.name!r} is disabled: their keys and login are refused.")


@bp.post("/<int:user_id>/enable")
@auth.login_required
def enable(user_id: int) -> Any:
    """Enable a disabled user again."""
    user = enable_user(get_session(), _user(user_id).name)
    return _done(f"User {user.name!r} is enabled.")


@bp.post("/<int:user_id>/keys")
@auth.login_required
def new_key(user_id: int) -> Any:
    """Make an API key for the user and show it, once, on the page this answers."""
    session = get_session()
    try:
        _row, key = create_key(session, _user(user_id), label=request.form.get("label", ""))
    except UserError as exc:
        return _page(error=str(exc), status=400)
    session.commit()
    return _page(new_key=key)


@bp.post("/keys/<key_id>/revoke")
@auth.login_required
def revoke(key_id: str) -> Any:
    """Revoke an API key: it is refused from the next request on."""
    session = get_session()
    if session.get(ApiKey, key_id) is None:
        abort(404, description=f"No API key {key_id[:40]!r}.")
    key = revoke_key(session, key_id)
    return _done(f"API key {key.id} of {key.user.name!r} is revoked.")
