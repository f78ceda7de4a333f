"""``svdfarm storage migrate --to URL``: copy every job's files to another store.

The copying is :func:`svdfarm.migrate_store.migrate_store`; this module parses the options and
says what the operator does next (point ``SVDFARM_STORAGE_URL`` at the target everywhere).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from cli import fail
from svdfarm.settings import Settings, parse_storage_url


def add_commands(sub: Any) -> None:
    """Register ``storage migrate``."""
    storage = sub.add_parser("storage", help="work on the job file store")
    commands = storage.add_subparsers(dest="storage_command", required=True)
    migrate = commands.add_parser(
        "migrate",
        help="copy every job's files from SVDFARM_STORAGE_URL to another store (same keys)",
    )
    migrate.set_defaults(run=cmd_migrate)
    migrate.add_argument(
        "--to", required=True, metavar="URL", help="the target store: s3://bucket/prefix"
    )
    migrate.add_argument(
        "--dry-run", action="store_true", help="say what would be copied, copy nothing"
    )
    migrate.add_argument("--json", action="store_true", help="print what was done as JSON")


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm storage migrate --to URL [--dry-run] [--json]``; 1 when a copy failed."""
    from svdfarm.db import database_for
    from svdfarm.migrate_store import migrate_store
    from svdfarm.storage import open_store

    target = parse_storage_url(args.to, name="--to")  # a SettingsError: exit 2, naming it
    source = settings.storage
    if target == source:
        return fail(f"--to {args.to!r} is the store in use already ({source})")
    db = database_for(settings.database_url)
    run = migrate_store(
        db,
        open_store(settings),
        open_store(settings.with_overrides(storage_url=args.to)),
        dry_run=args.dry_run,
    )
    if args.json:
        print(json.dumps({"source": str(source), "target": str(target), **run.as_dict()}, indent=2))
    else:
        verb = "would copy" if run.dry_run else "copied"
        print(
            f"{verb} {len(run.copied)} file(s) of {run.jobs} job(s) from {source} to {target}; "
            f"{len(run.skipped)} already there"
        )
        for key in run.copied:
            print(f"  {key}")
        for key in run.missing:
            print(f"warning: {key} is named by its job but not stored in {source}")
    if run.failed:
        lines = "".join(f"\n  {f.key}: {f.reason}" for f in run.failed)
        return fail(f"{len(run.failed)} file(s) were not copied; run it again:{lines}", 1)
    if not args.json and not run.dry_run:
        print(
            f"next: set SVDFARM_STORAGE_URL={target} (and the AWS_* variables that reach it) on "
            "every web and worker, and restart them. The jobs' keys in the database stay as "
            "they are: the keys are the same in the new store, so switching the URL is all "
            "that re-points the farm."
        )
    return 0
