"""Operating the farm: ``svdfarm db`` (migrations), ``svdfarm queues`` (depths and consumers),
``svdfarm reap`` (one reaper pass) and ``svdfarm admin hash-password``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cli import fail, redact
from svdfarm.settings import Settings


def add_commands(sub: Any) -> None:
    """Register ``db``, ``queues``, ``reap`` and ``admin``."""
    db = sub.add_parser("db", help="database migrations")
    db.set_defaults(run=cmd_db)
    db.add_argument("action", choices=["upgrade", "downgrade"])
    db.add_argument("revision", nargs="?", default="")

    queues = sub.add_parser("queues", help="queue depths and the live workers on each queue")
    queues.set_defaults(run=cmd_queues)
    queues.add_argument("--all", action="store_true", help="also queues with nothing on them")
    queues.add_argument("--json", action="store_true", help="print them as JSON")

    reap = sub.add_parser(
        "reap", help="requeue jobs of lost workers and publish queued jobs the broker lost"
    )
    reap.set_defaults(run=cmd_reap)
    reap.add_argument("--json", action="store_true", help="print what was done as JSON")

    admin = sub.add_parser("admin", help="admin pages: make the password hash")
    admin.set_defaults(run=cmd_admin)
    admin.add_argument("action", choices=["hash-password"])


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm db upgrade|downgrade``."""
    from svdfarm import db

    if args.action == "upgrade":
        db.upgrade(settings.database_url, args.revision or "head")
    else:
        db.downgrade(settings.database_url, args.revision or "-1")
    print(f"database {redact(settings.database_url)} is at {args.revision or args.action}")
    return 0


def _queue_order(name: str) -> tuple[str, str, int]:
    """Sort queues by device, precision, then tier as a number (8g before 12g)."""
    from svdfarm.queues import parse_queue

    try:
        wc = parse_queue(name)
    except ValueError:
        return (name, "", 0)
    return (wc.device, wc.precision, wc.tier_gb)


def cmd_queues(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm queues``: messages waiting in each queue and the live workers consuming it."""
    from svdfarm.db import database_for
    from svdfarm.depths import BrokerUnavailable, queue_depths
    from svdfarm.queues import all_queues
    from svdfarm.registry import online_workers

    with database_for(settings.database_url).session() as session:
        workers = online_workers(session, settings)
    consumers: dict[str, list[str]] = {}
    for worker in workers:
        for queue in worker.queues:
            consumers.setdefault(queue, []).append(worker.hostname)
    names = sorted(set(all_queues()) | set(consumers), key=_queue_order)
    try:
        depths = queue_depths(settings, names)
    except BrokerUnavailable as exc:
        return fail(str(exc), 1)
    rows: list[dict[str, Any]] = [
        {"queue": queue, "waiting": depths[queue], "workers": consumers.get(queue, [])}
        for queue in names
        if depths[queue] or queue in consumers or args.all
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'queue':<22} {'waiting':>7}  workers")
    for row in rows:
        print(f"{row['queue']:<22} {row['waiting']:>7}  {', '.join(row['workers']) or '-'}")
    if not rows:
        print("(no queue has messages or live workers)")
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
        print(json.dumps(reaped.__dict__, indent=2))
        return 0
    for what, ids in reaped.__dict__.items():
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
