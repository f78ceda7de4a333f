"""Users, API keys and owners: who a job belongs to, and the limits and share they have.

Every job has an owner, a short string:

- ``user:<id>``: a user of the ``users`` table (API key or password login; the admin's
  password login is the user ``admin``, made on first use);
- ``anon:<hex>``: in open mode (``SVDFARM_AUTH=open``), one browser session;
- ``addr:<address>``: in open mode, an API client without a key, by its address.

An API key is ``svdf_<id>_<secret>``: the id is public (listings, ``keys revoke``), the
secret is shown once and kept as its SHA-256 (a random 32-byte secret needs no slow hash).
A revoked key or a disabled user is refused at the next request: every request reads them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload
from werkzeug.security import check_password_hash, generate_password_hash

from svdfarm.models import ApiKey, User, utcnow

#: Priorities a job may ask for.
MIN_PRIORITY, MAX_PRIORITY = -10, 10
KEY_PREFIX = "svdf_"
#: The user the admin password login maps to.
ADMIN_USER = "admin"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_KEY = re.compile(r"^svdf_([a-z0-9]{8})_([A-Za-z0-9_-]{20,100})$")
#: A key's ``last_used_at`` is written at most this often (a key polled ten times a second
#: would otherwise write a row on every read).
LAST_USED_RESOLUTION_S = 60.0


class UserError(ValueError):
    """A name, limit or key the farm cannot take, with a message for the user."""


@dataclass(frozen=True)
class Limits:
    """What an owner may do: queued and running jobs at once (None: no limit of their own),
    the highest priority, and their weight in fair share."""

    max_queued: int | None = None
    max_running: int | None = None
    max_priority: int = 0
    share: float = 1.0


#: Anonymous owners (open mode): no priority above 0, an equal share.
ANONYMOUS = Limits()


def check_name(name: str) -> str:
    """``name`` when it is a usable user name, else :class:`UserError`."""
    if not _NAME.match(name or ""):
        raise UserError(
            f"User name {name[:70]!r} is not usable: 1 to 64 letters, digits and . _ @ -, "
            "starting with a letter or digit."
        )
    return name


def check_limits(
    *,
    max_queued: int | None = None,
    max_running: int | None = None,
    max_priority: int = 0,
    share: float = 1.0,
) -> Limits:
    """The limits given, or :class:`UserError` naming the first that is out of range."""
    for label, value in (("max queued", max_queued), ("max running", max_running)):
        if value is not None and value < 1:
            raise UserError(f"The {label} limit must be at least 1 (leave it out for none).")
    if not MIN_PRIORITY <= max_priority <= MAX_PRIORITY:
        raise UserError(f"The max priority must be {MIN_PRIORITY} to {MAX_PRIORITY}.")
    if not 0.01 <= share <= 1000:
        raise UserError("The share must be between 0.01 and 1000.")
    return Limits(max_queued, max_running, max_priority, share)


def add_user(
    session: Session,
    name: str,
    *,
    admin: bool = False,
    password: str | None = None,
    limits: Limits = ANONYMOUS,
) -> User:
    """Record a new user (flushed, not committed); :class:`UserError` when the name is
    taken or unusable."""
    check_name(name)
    if find_user(session, name) is not None:
        raise UserError(f"A user named {name!r} already exists.")
    if password is not None and not password:
        raise UserError("The password must not be empty.")
    user = User(
        name=name,
        is_admin=admin,
        password_hash=generate_password_hash(password) if password else None,
        max_queued=limits.max_queued,
        max_running=limits.max_running,
        max_priority=limits.max_priority,
        share=limits.share,
    )
    session.add(user)
    session.flush()
    return user


def find_user(session: Session, name: str) -> User | None:
    """The user named ``name``, or None."""
    return session.scalar(select(User).where(User.name == name))


def get_user(session: Session, name: str) -> User:
    """The user named ``name``; :class:`UserError` when there is none."""
    user = find_user(session, name)
    if user is None:
        raise UserError(f"No user named {name[:70]!r} (svdfarm users list shows them).")
    return user


def disable_user(session: Session, name: str) -> User:
    """Disable a user: their keys and logins are refused from the next request on."""
    user = get_user(session, name)
    if user.disabled_at is None:
        user.disabled_at = utcnow()
    return user


def enable_user(session: Session, name: str) -> User:
    """Enable a disabled user again: their live keys and login work from the next request on."""
    user = get_user(session, name)
    user.disabled_at = None
    return user


def set_limits(session: Session, name: str, *, limits: Limits) -> User:
    """Replace a user's limits and share with ``limits`` (checked with :func:`check_limits`)."""
    user = get_user(session, name)
    check_limits(
        max_queued=limits.max_queued,
        max_running=limits.max_running,
        max_priority=limits.max_priority,
        share=limits.share,
    )
    user.max_queued, user.max_running = limits.max_queued, limits.max_running
    user.max_priority, user.share = limits.max_priority, limits.share
    return user


def list_users(session: Session) -> list[User]:
    """Every user by name, their keys loaded."""
    return list(session.scalars(select(User).options(selectinload(User.keys)).order_by(User.name)))


def list_keys(session: Session, *, name: str | None = None) -> list[ApiKey]:
    """Every API key (of the user ``name`` only, when given), oldest first, users loaded."""
    stmt = select(ApiKey).options(selectinload(ApiKey.user))
    if name is not None:
        stmt = stmt.where(ApiKey.user_id == get_user(session, name).id)
    return list(session.scalars(stmt.order_by(ApiKey.created_at, ApiKey.id)))


def live_keys(user: User) -> list[ApiKey]:
    """The user's keys that are not revoked."""
    return [key for key in user.keys if key.revoked_at is None]


def admin_user(session: Session) -> User:
    """The user the admin password login acts as (made on first use)."""
    user = find_user(session, ADMIN_USER)
    if user is None:
        user = add_user(session, ADMIN_USER, admin=True, limits=Limits(max_priority=MAX_PRIORITY))
    return user


def check_login(session: Session, name: str, password: str) -> User | None:
    """The enabled user ``name`` when ``password`` is theirs, else None."""
    user = find_user(session, name)
    if user is None or user.disabled_at is not None or not user.password_hash:
        return None
    try:
        return user if check_password_hash(user.password_hash, password) else None
    except ValueError:
        return None


def _digest(secret: str) -> str:
    """The SHA-256 a key's secret is kept as."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, user: User, label: str = "") -> tuple[ApiKey, str]:
    """A new key for ``user``: its row (flushed) and the key itself, to show once."""
    if user.disabled_at is not None:
        raise UserError(f"User {user.name!r} is disabled: enable them before making a key.")
    key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(id=key_id, user_id=user.id, secret_hash=_digest(secret), label=label[:100])
    session.add(row)
    session.flush()
    return row, f"{KEY_PREFIX}{key_id}_{secret}"


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key by its id; :class:`UserError` when there is no such key."""
    key = session.get(ApiKey, key_id.removeprefix(KEY_PREFIX))
    if key is None:
        raise UserError(f"No API key {key_id[:40]!r} (svdfarm keys list shows them).")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def authenticate_key(session: Session, raw: str) -> User | None:
    """The enabled user whose live key ``raw`` is, else None (unknown, revoked, malformed)."""
    match = _KEY.match(raw.strip())
    if match is None:
        return None
    key = session.get(ApiKey, match.group(1))
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.secret_hash, _digest(match.group(2))):
        return None
    user = key.user
    if user.disabled_at is not None:
        return None
    now = utcnow()
    last = key.last_used_at
    if last is None or (now - last).total_seconds() > LAST_USED_RESOLUTION_S:
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return user


def user_id_of(owner: str) -> int | None:
    """The user id in an owner string ``user:<id>``; None for anonymous owners."""
    kind, _, rest = owner.partition(":")
    return int(rest) if kind == "user" and rest.isdigit() else None


def limits_of(session: Session, owners: Iterable[str]) -> dict[str, Limits]:
    """Each owner's limits: a user's own (disabled users keep theirs), else the anonymous."""
    owners = set(owners)
    ids = {uid for o in owners if (uid := user_id_of(o)) is not None}
    users = {u.id: u for u in session.scalars(select(User).where(User.id.in_(ids)))} if ids else {}
    found = {}
    for owner in owners:
        user = users.get(user_id_of(owner) or -1)
        found[owner] = (
            Limits(user.max_queued, user.max_running, user.max_priority, user.share)
            if user is not None
            else ANONYMOUS
        )
    return found


def owner_names(session: Session, owners: Iterable[str]) -> dict[str, str]:
    """Each owner as pages show it: a user's name, ``anonymous`` or ``anonymous (address)``."""
    owners = set(owners)
    ids = {uid for o in owners if (uid := user_id_of(o)) is not None}
    names: dict[int, str] = {}
    if ids:
        rows = session.execute(select(User.id, User.name).where(User.id.in_(ids)))
        names = {uid: name for uid, name in rows}
    shown = {}
    for owner in owners:
        uid = user_id_of(owner)
        if uid is not None:
            shown[owner] = names.get(uid, owner)
        elif owner.startswith("addr:"):
            shown[owner] = f"anonymous ({owner[5:] or 'unknown address'})"
        else:
            shown[owner] = "anonymous"
    return shown
