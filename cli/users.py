"""``svdfarm users`` and ``svdfarm keys``: the farm's users, their limits and API keys.

Each subcommand calls :mod:`svdfarm.users` in one transaction: committed when it succeeds,
rolled back when it is refused. A new key is printed once, alone on the last line of the
output, and never again: listings show a key's public id, never its secret or its hash.
Exit status: 0 when done; 2 for bad input (an unusable or taken name, a limit out of range,
a user or key that does not exist, two passwords that differ), with one line on stderr.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from cli import fail
from svdfarm.settings import Settings

if TYPE_CHECKING:  # the commands import the database layer when they run, not for --help
    from sqlalchemy.orm import Session

    from svdfarm.models import ApiKey, User


def add_commands(sub: Any) -> None:
    """Register ``users`` (add, list, disable, enable) and ``keys`` (create, list, revoke)."""
    _add_users(sub)
    _add_keys(sub)


def _add_users(sub: Any) -> None:
    """Register ``users`` and its actions."""
    users = sub.add_parser(
        "users",
        help="add, list, disable and enable the users who submit jobs",
        description="Exit status: 0 done, 2 bad input (the reason is on stderr).",
    )
    actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = actions.add_parser("add", help="add a user with their limits")
    add.set_defaults(run=cmd_add)
    add.add_argument("name", metavar="NAME")
    add.add_argument("--admin", action="store_true", help="an admin user")
    add.add_argument(
        "--password",
        action="store_true",
        help="ask for a login password (twice; one line from stdin when it is not a terminal)",
    )
    add.add_argument("--max-queued", type=int, metavar="N", help="queued jobs at once")
    add.add_argument("--max-running", type=int, metavar="N", help="running jobs at once")
    add.add_argument(
        "--max-priority", type=int, default=0, metavar="P", help="highest priority (-10..10)"
    )
    add.add_argument(
        "--share", type=float, default=1.0, metavar="W", help="fair-share weight (default 1)"
    )

    listing = actions.add_parser("list", help="every user with their limits")
    listing.set_defaults(run=cmd_list)

    for name, run, what in (
        ("disable", cmd_disable, "refuse the user's keys and login from now on"),
        ("enable", cmd_enable, "let a disabled user in again"),
    ):
        action = actions.add_parser(name, help=what)
        action.set_defaults(run=run)
        action.add_argument("name", metavar="NAME")


def _add_keys(sub: Any) -> None:
    """Register ``keys`` and its actions."""
    keys = sub.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="Exit status: 0 done, 2 bad input (the reason is on stderr).",
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="a new key for a user, printed once")
    create.set_defaults(run=cmd_key_create)
    create.add_argument("name", metavar="NAME")
    create.add_argument("--label", default="", metavar="TEXT", help="what the key is for")

    listing = actions.add_parser("list", help="keys (of one user), never their secrets")
    listing.set_defaults(run=cmd_key_list)
    listing.add_argument("name", metavar="NAME", nargs="?")

    revoke = actions.add_parser("revoke", help="refuse a key from the next request on")
    revoke.set_defaults(run=cmd_key_revoke)
    revoke.add_argument("key_id", metavar="KEY_ID")


@contextmanager
def _transaction(settings: Settings) -> Iterator[Session]:
    """A session in a transaction on the farm's database: committed when the block ends,
    rolled back when it raises; the engine disposed afterwards."""
    from svdfarm.db import Database

    database = Database(settings.database_url)
    try:
        with database.begin() as session:
            yield session
    finally:
        database.dispose()


def _when(value: datetime | None) -> str:
    """A time as ``2026-11-30 07:00`` in UTC, or ``-``."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M") if value else "-"


def _limit(value: int | None) -> str:
    """A limit, or ``-`` for none."""
    return "-" if value is None else str(value)


def read_password() -> str:
    """The new user's password: asked twice on a terminal, else one line of stdin.

    Raises :class:`svdfarm.users.UserError` when the two differ.
    """
    from svdfarm.users import UserError

    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != password:
        raise UserError("The two passwords differ.")
    return password


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm users add NAME [--admin] [--password] [--max-queued N] [--max-running N]
    [--max-priority P] [--share W]``."""
    from svdfarm.users import UserError, add_user, check_limits, check_name

    try:
        check_name(args.name)
        limits = check_limits(
            max_queued=args.max_queued,
            max_running=args.max_running,
            max_priority=args.max_priority,
            share=args.share,
        )
        password = read_password() if args.password else None
        with _transaction(settings) as session:
            user = add_user(session, args.name, admin=args.admin, password=password, limits=limits)
            name = user.name
    except UserError as exc:
        return fail(str(exc))
    print(f"User {name!r} added" + (" (admin)." if args.admin else "."))
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm users list``: every user with their limits, live keys and creation time."""
    from svdfarm.users import list_users, live_keys

    with _transaction(settings) as session:
        users = list_users(session)
        print(
            f"{'name':<24} {'admin':<5} {'disabled':<16} {'max_queued':>10} "
            f"{'max_running':>11} {'max_priority':>12} {'share':>7} {'keys':>4}  created (UTC)"
        )
        for user in users:
            print(_user_row(user, len(live_keys(user))))
    if not users:
        print("(no users)")
    return 0


def _user_row(user: User, keys: int) -> str:
    """One line of ``users list``."""
    return (
        f"{user.name:<24} {'yes' if user.is_admin else 'no':<5} {_when(user.disabled_at):<16} "
        f"{_limit(user.max_queued):>10} {_limit(user.max_running):>11} "
        f"{user.max_priority:>12} {user.share:>7g} {keys:>4}  {_when(user.created_at)}"
    )


def cmd_disable(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm users disable NAME``: their keys and login are refused from now on."""
    from svdfarm.users import UserError, disable_user

    try:
        with _transaction(settings) as session:
            name = disable_user(session, args.name).name
    except UserError as exc:
        return fail(str(exc))
    print(f"User {name!r} is disabled: their keys and login are refused.")
    return 0


def cmd_enable(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm users enable NAME``: a disabled user's live keys and login work again."""
    from svdfarm.users import UserError, enable_user

    try:
        with _transaction(settings) as session:
            name = enable_user(session, args.name).name
    except UserError as exc:
        return fail(str(exc))
    print(f"User {name!r} is enabled.")
    return 0


def cmd_key_create(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm keys create NAME [--label TEXT]``: the new key alone on the last line."""
    from svdfarm.users import UserError, create_key, get_user

    try:
        with _transaction(settings) as session:
            row, key = create_key(session, get_user(session, args.name), label=args.label)
            key_id, name = row.id, args.name
    except UserError as exc:
        return fail(str(exc))
    print(f"API key {key_id} for {name!r}; it is shown once, now, and never again:")
    print(key)
    return 0


def cmd_key_list(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm keys list [NAME]``: every key (of one user), never a secret."""
    from svdfarm.users import UserError, list_keys

    try:
        with _transaction(settings) as session:
            keys = list_keys(session, name=args.name)
            print(
                f"{'id':<8}  {'user':<24} {'label':<24} {'created':<16} {'last used':<16} revoked"
            )
            for key in keys:
                print(_key_row(key))
    except UserError as exc:
        return fail(str(exc))
    if not keys:
        print("(no keys)")
    return 0


def _key_row(key: ApiKey) -> str:
    """One line of ``keys list``: public id, owner, label, times; no secret, no hash."""
    return (
        f"{key.id:<8}  {key.user.name:<24} {key.label or '-':<24} {_when(key.created_at):<16} "
        f"{_when(key.last_used_at):<16} {_when(key.revoked_at)}"
    )


def cmd_key_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm keys revoke KEY_ID``: the key is refused from the next request on."""
    from svdfarm.users import UserError, revoke_key

    try:
        with _transaction(settings) as session:
            key = revoke_key(session, args.key_id)
            key_id, name = key.id, key.user.name
    except UserError as exc:
        return fail(str(exc))
    print(f"API key {key_id} of {name!r} is revoked.")
    return 0
