"""``svdfarm cleanup``: one retention pass by hand (every worker's reaper runs one each pass).

Deletes the outputs and inputs of ended jobs past ``SVDFARM_RETENTION`` and
``SVDFARM_INPUT_RETENTION`` and marks the jobs expired; ``--dry-run`` only says what would go.
"""

from __future__ import annotations

import argparse
import json
import socket
from typing import Any

from svdfarm.settings import Settings


def add_commands(sub: Any) -> None:
    """Register ``cleanup``."""
    cleanup = sub.add_parser(
        "cleanup", help="delete the files of ended jobs past their retention (one pass)"
    )
    cleanup.set_defaults(run=cmd_cleanup)
    cleanup.add_argument(
        "--dry-run", action="store_true", help="say what would be deleted, delete nothing"
    )
    cleanup.add_argument("--json", action="store_true", help="print what was done as JSON")


def cmd_cleanup(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm cleanup [--dry-run] [--json]``."""
    from svdfarm.db import database_for
    from svdfarm.lifecycle import By
    from svdfarm.retention import sweep
    from svdfarm.states import Actor

    db = database_for(settings.database_url)
    swept = sweep(db, settings, by=By(Actor.CLI, socket.gethostname()), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(swept.as_dict(), indent=2))
        return 0
    if swept.skipped:
        print(f"nothing done: {swept.skipped}")
        return 0
    verb = "would expire" if swept.dry_run else "expired"
    print(f"{verb} outputs of {len(swept.expired)} job(s), inputs of {len(swept.inputs)} job(s)")
    for key in swept.files:
        print(f"  {key}")
    return 0
