"""Operating the farm: ``svdfarm db`` (migrations), ``svdfarm queues`` (what waits, and who
consumes it; ``purge`` empties them), ``svdfarm reap`` (one reaper pass) and ``svdfarm admin
hash-password``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from cli import fail, redact
from svdfarm.settings import Settings


def add_commands(sub: Any) -> None:
    """Register ``db``, ``queues``, ``reap`` and ``admin``."""
    db = sub.add_parser("db", help="database migrations and upkeep")
    migrations = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = migrations.add_parser("upgrade", help="migrate up to REV (default: the newest)")
    down = migrations.add_parser("downgrade", help="migrate down to REV (default: one step)")
    for action in (up, down):
        action.set_defaults(run=cmd_db)
        action.add_argument("revision", nargs="?", default="", metavar="REV")
    again = migrations.add_parser(
        "recount",
        help="count /metrics' job and attempt totals again from every row",
        description="Count the totals /metrics reads again from every row. The database keeps "
        "them as rows change; only rows changed with its triggers off (a bulk load, a "
        "restore, a TRUNCATE) need this.",
    )
    again.set_defaults(run=cmd_db)

    queues = sub.add_parser(
        "queues", help="jobs waiting in each queue and its live workers; purge: empty them all"
    )
    queues.set_defaults(run=cmd_queues)
    queues.add_argument(
        "action",
        nargs="?",
        choices=["purge"],
        help="purge: remove every message from the farm's queues and cancel the queued jobs",
    )
    queues.add_argument("--all", action="store_true", help="also queues with nothing on them")
    queues.add_argument("--yes", action="store_true", help="purge without asking")
    queues.add_argument("--json", action="store_true", help="print them as JSON")

    reap = sub.add_parser(
        "reap", help="requeue jobs of lost workers and publish queued jobs the broker lost"
    )
    reap.set_defaults(run=cmd_reap)
    reap.add_argument("--json", action="store_true", help="print what was done as JSON")

    admin = sub.add_parser("admin", help="admin pages: make the password hash")
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")
    hash_password = actions.add_parser(
        "hash-password",
        help="read a password (twice, or one line from stdin), print its hash",
        description="Read a password (twice at a terminal, or one line from stdin) and print "
        "its hash, the value SVDFARM_ADMIN_PASSWORD takes.",
    )
    hash_password.set_defaults(run=cmd_admin)


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm db upgrade|downgrade|recount``."""
    from svdfarm import db

    if args.action == "recount":
        from svdfarm.counts import recount

        with db.database_for(settings.database_url).begin() as session:
            recount(session)
        print(f"database {redact(settings.database_url)}: /metrics' totals counted again")
        return 0
    if args.action == "upgrade":
        db.upgrade(settings.database_url, args.revision or "head")
    else:
        db.downgrade(settings.database_url, args.revision or "-1")
    revision, newest = db.revision_of(settings.database_url)
    where = f"revision {revision}" + (" (the newest)" if newest else "")
    if revision is None:
        where = "no revision (every migration undone)"
    print(f"database {redact(settings.database_url)} is at {where}")
    return 0


def _queue_order(name: str) -> tuple[str, str, int, str]:
    """Sort queues by device, precision, tier as a number (8g before 12g), then model."""
    from svdfarm.queues import parse_queue, queue_model

    try:
        wc = parse_queue(name)
    except ValueError:
        return (name, "", 0, "")
    return (wc.device, wc.precision, wc.tier_gb, queue_model(name) or "")


def cmd_queues(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm queues``: jobs waiting in each queue (from the database), the messages the
    broker holds there, and the live workers consuming it; ``purge`` empties them."""
    from svdfarm.catalog import catalog_keys
    from svdfarm.db import database_for
    from svdfarm.depths import BrokerUnavailable, queue_depths, waiting_jobs
    from svdfarm.queues import all_queues
    from svdfarm.registry import online_workers

    if args.action == "purge":
        return cmd_purge(args, settings)
    with database_for(settings.database_url).session() as session:
        workers = online_workers(session, settings)
        waiting = waiting_jobs(session, all_queues(catalog_keys(settings.catalog)))
    consumers: dict[str, list[str]] = {}
    for worker in workers:
        for queue in worker.queues:
            consumers.setdefault(queue, []).append(worker.hostname)
    names = sorted(set(waiting) | set(consumers), key=_queue_order)
    try:
        messages = queue_depths(settings, names)
    except BrokerUnavailable as exc:
        return fail(str(exc), 1)
    rows: list[dict[str, Any]] = [
        {
            "queue": queue,
            "waiting": waiting.get(queue, 0),
            "messages": messages[queue],
            "workers": consumers.get(queue, []),
        }
        for queue in names
        if waiting.get(queue) or messages[queue] or queue in consumers or args.all
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'queue':<22} {'waiting':>7} {'messages':>8}  workers")
    for row in rows:
        print(
            f"{row['queue']:<22} {row['waiting']:>7} {row['messages']:>8}  "
            f"{', '.join(row['workers']) or '-'}"
        )
    if not rows:
        print("(no queue has jobs, messages or live workers)")
    if any(row["messages"] > row["waiting"] for row in rows):
        print(
            "(waiting counts queued jobs; the other messages are of jobs canceled while queued, "
            "which workers drop)"
        )
    return 0


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm queues purge [--yes]``: empty every queue of the farm on the broker and cancel
    the jobs queued on them (event reason ``purged``); asks first unless ``--yes``."""
    from cli.jobs import operator
    from svdfarm.celery_app import create_celery, farm_queues
    from svdfarm.db import database_for
    from svdfarm.depths import BrokerUnavailable, queue_depths, waiting_jobs
    from svdfarm.purge import purge
    from svdfarm.registry import online_workers

    db = database_for(settings.database_url)
    with db.session() as session:
        consumed = {q for worker in online_workers(session, settings) for q in worker.queues}
        waiting = waiting_jobs(session, farm_queues(settings))
    names = sorted(set(waiting) | consumed, key=_queue_order)
    if not args.yes:
        try:
            held = sum(queue_depths(settings, names).values())
        except BrokerUnavailable as exc:
            return fail(str(exc), 1)
        what = (
            f"{held} message(s) from {len(names)} queues and cancel "
            f"{sum(waiting.values())} queued job(s)"
        )
        if not sys.stdin.isatty():
            return fail(f"purging would remove {what}; add --yes to do it", 1)
        if input(f"Remove {what}? Type yes to go on: ").strip().lower() != "yes":
            return fail("nothing was purged", 1)
    celery = create_celery(settings)
    try:
        purged = purge(db, settings, celery, names, by=operator())
    except BrokerUnavailable as exc:
        return fail(str(exc), 1)
    finally:
        celery.close()
    removed = {queue: n for queue, n in purged.messages.items() if n}
    if args.json:
        print(json.dumps({"messages": removed, "canceled": purged.canceled}, indent=2))
        return 0
    for queue, n in sorted(removed.items(), key=lambda item: _queue_order(item[0])):
        print(f"{queue:<22} {n:>7} message(s) removed")
    print(
        f"purged {purged.message_count} message(s) from {len(names)} queues; "
        f"canceled {len(purged.canceled)} queued job(s)"
    )
    return 0


def cmd_reap(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm reap``: one reaper pass (workers run it on their own every reap interval)."""
    from svdfarm.celery_app import create_celery
    from svdfarm.db import database_for
    from svdfarm.reaper import reap

    celery = create_celery(settings)
    try:
        reaped = reap(database_for(settings.database_url), settings, celery)
    finally:
        celery.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(reaped), indent=2))
        return 0
    if reaped.skipped:
        print(f"lost workers not looked for: {reaped.skipped}")
    for what, ids in reaped.by_outcome().items():
        print(f"{what}: {len(ids)}" + (f" ({', '.join(ids)})" if ids else ""))
    return 0


def cmd_admin(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm admin hash-password``: read a password twice, print its hash for the env."""
    import getpass

    from web.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Admin password: ")
        if getpass.getpass("Again: ") != password:
            return fail("the two passwords differ", 1)
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        return fail("the password must not be empty", 1)
    print(hash_password(password))
    return 0
