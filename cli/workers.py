"""The farm's workers: ``svdfarm workers list`` (each with its state and, when flagged, why)
and ``svdfarm workers clear NAME`` (an operator fixed a flagged worker: it takes jobs again).
See :mod:`svdfarm.worker_health` for when a worker is flagged.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from cli import fail
from svdfarm.settings import Settings


def add_commands(sub: Any) -> None:
    """Register ``workers list`` and ``workers clear``."""
    workers = sub.add_parser(
        "workers", help="the workers, their state and flags; clear: clear a worker's flag"
    )
    actions = workers.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="every known worker with its state, its job and, when flagged, why",
        description="List every worker the database knows: its state (offline when its "
        "heartbeats stopped), its current job, and, for a flagged worker (it failed several "
        "jobs in a row the same way, and takes no job until cleared), when and why.",
    )
    listing.set_defaults(run=cmd_list)
    listing.add_argument("--json", action="store_true", help="print them as JSON")
    clear = actions.add_parser(
        "clear",
        help="clear a flagged worker's flag: it takes jobs again at its next heartbeat",
        description="Clear the flag of a worker flagged for failing several jobs in a row "
        "the same way (fix it first): it takes jobs again at its next heartbeat.",
    )
    clear.set_defaults(run=cmd_clear)
    clear.add_argument("name", metavar="NAME", help="the worker's name (its hostname)")


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm workers list [--json]``."""
    from sqlalchemy import select

    from svdfarm.db import database_for
    from svdfarm.models import Worker, utcnow
    from svdfarm.registry import effective_state

    now = utcnow()
    with database_for(settings.database_url).session() as session:
        rows: list[dict[str, Any]] = [
            {
                "name": w.hostname,
                "state": effective_state(w, settings, now).value,
                "job": str(w.current_job_id) if w.current_job_id else None,
                "loaded_model": w.loaded_model,
                "queues": list(w.queues or []),
                "flagged_at": w.flagged_at.isoformat() if w.flagged_at else None,
                "flagged_reason": w.flagged_reason if w.flagged_at else None,
            }
            for w in session.scalars(select(Worker).order_by(Worker.hostname))
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("(no worker has registered yet; start one with svdfarm worker)")
        return 0
    width = max(len("worker"), *(len(r["name"]) for r in rows))
    model_width = max(len("model"), *(len(r["loaded_model"] or "-") for r in rows))
    print(f"{'worker':<{width}}  {'state':<8}  {'flag':<7}  {'model':<{model_width}}  job")
    for row in rows:
        flag = "FLAGGED" if row["flagged_at"] else "-"
        model = row["loaded_model"] or "-"
        print(
            f"{row['name']:<{width}}  {row['state']:<8}  {flag:<7}  {model:<{model_width}}  "
            f"{row['job'] or '-'}"
        )
    for row in rows:
        if row["flagged_at"]:
            print(f"\n{row['name']} flagged at {row['flagged_at']}: {row['flagged_reason']}")
            print(f"  clear it once fixed: svdfarm workers clear {row['name']}")
    return 0


def cmd_clear(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm workers clear NAME``: exit 2 for an unknown worker, 1 for one not flagged."""
    from svdfarm.db import database_for
    from svdfarm.models import Worker
    from svdfarm.worker_health import clear_flag

    with database_for(settings.database_url).begin() as session:
        if session.get(Worker, args.name) is None:
            return fail(f"no worker is named {args.name!r} (see svdfarm workers list)")
        if not clear_flag(session, args.name):
            return fail(f"worker {args.name} is not flagged", 1)
    print(f"worker {args.name}: flag cleared; it takes jobs again at its next heartbeat")
    return 0
