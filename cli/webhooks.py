"""``svdfarm webhooks``: the endpoints owners registered for their jobs' events.

``add OWNER URL [--events ...]`` registers a URL for every job of the owner (a user's name,
or ``user:<id>``, ``anon:<hex>``, ``addr:<address>``) and prints the endpoint's id and the
owner's signing secret (made on first use); ``list [OWNER]`` shows the endpoints; ``remove
ID`` deletes one and cancels its pending deliveries. Exit status: 0 when done; 2 for bad
input (an unknown user or endpoint, an unusable URL or event), with one line on stderr.
"""

from __future__ import annotations

import argparse
from datetime import timezone
from typing import Any

from cli import fail
from svdfarm.settings import Settings


def add_commands(sub: Any) -> None:
    """Register ``webhooks`` (add, list, remove)."""
    hooks = sub.add_parser(
        "webhooks",
        help="add, list and remove owners' webhook endpoints",
        description="Exit status: 0 done, 2 bad input (the reason is on stderr). "
        "docs/WEBHOOKS.md describes the deliveries.",
    )
    actions = hooks.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = actions.add_parser("add", help="send an owner's job events to a URL")
    add.set_defaults(run=cmd_add)
    add.add_argument("owner", metavar="OWNER", help="a user's name, or user:<id>, anon:<hex>...")
    add.add_argument("url", metavar="URL")
    add.add_argument(
        "--events",
        nargs="+",
        default=[],
        metavar="EVENT",
        help="job.queued job.started job.progress job.succeeded job.failed job.canceled "
        "(commas allowed; default: all but job.progress)",
    )

    listing = actions.add_parser("list", help="the endpoints (of one owner)")
    listing.set_defaults(run=cmd_list)
    listing.add_argument("owner", metavar="OWNER", nargs="?")

    remove = actions.add_parser("remove", help="delete an endpoint; its pending deliveries stop")
    remove.set_defaults(run=cmd_remove)
    remove.add_argument("endpoint_id", metavar="ID", type=int)


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm webhooks add``: register the endpoint, print its id and the secret."""
    from svdfarm.db import Database
    from svdfarm.webhooks import WebhookError, add_endpoint, parse_events, resolve_owner, secret_for

    database = Database(settings.database_url)
    try:
        with database.begin() as session:
            owner = resolve_owner(session, args.owner)
            row = add_endpoint(
                session,
                owner=owner,
                url=args.url,
                events=parse_events(args.events),
                allow_private=settings.webhook_allow_private,
            )
            key = secret_for(session, owner)
            print(f"endpoint {row.id} of {owner}: {row.url} ({', '.join(row.events)})")
            print(f"signing secret of {owner}: {key}")
    except WebhookError as exc:
        return fail(str(exc))
    finally:
        database.dispose()
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm webhooks list``: one line per endpoint."""
    from svdfarm.db import Database
    from svdfarm.webhooks import WebhookError, list_endpoints, resolve_owner

    database = Database(settings.database_url)
    try:
        with database.begin() as session:
            owner = resolve_owner(session, args.owner) if args.owner else None
            rows = list_endpoints(session, owner)
            print(f"{'ID':>5}  {'OWNER':<24} {'STATE':<9} {'EVENTS':<40} URL")
            for row in rows:
                state = "disabled" if row.disabled_at else "enabled"
                events = ",".join(e.removeprefix("job.") for e in row.events)
                print(f"{row.id:>5}  {row.owner:<24} {state:<9} {events:<40} {row.url}")
                if row.disabled_at is not None:
                    when = row.disabled_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
                    print(f"{'':>7}disabled {when}: {row.disabled_reason or ''}")
    except WebhookError as exc:
        return fail(str(exc))
    finally:
        database.dispose()
    return 0


def cmd_remove(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm webhooks remove``: delete the endpoint, cancel its pending deliveries."""
    from svdfarm.db import Database
    from svdfarm.webhooks import WebhookError, remove_endpoint

    database = Database(settings.database_url)
    try:
        with database.begin() as session:
            row = remove_endpoint(session, args.endpoint_id)
            print(f"removed endpoint {row.id} of {row.owner}: {row.url}")
    except WebhookError as exc:
        return fail(str(exc))
    finally:
        database.dispose()
    return 0
