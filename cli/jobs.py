"""``svdfarm jobs``: list, show, cancel, requeue, delete and reprioritize jobs from a terminal.

Each subcommand calls :mod:`svdfarm.actions`, as the admin pages and the API do, and acts as
``cli:<login name>`` in the job's events. Exit status: 0 when done; 1 when the job's state
refused the action (the reason is printed); 2 for bad arguments (an unknown state, a job id
that is malformed or names no job, a queue outside the naming scheme; for ``priority``, also
a priority out of range or a job that no longer waits in the database).
"""

from __future__ import annotations

import argparse
import enum
import getpass
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from cli import fail
from svdfarm.settings import Settings
from svdfarm.states import Actor, JobState

if TYPE_CHECKING:  # the commands import the database layer when they run, not for --help
    from sqlalchemy.orm import Session

    from svdfarm.actions import JobChange
    from svdfarm.lifecycle import By
    from svdfarm.models import Attempt, Job, JobEvent


def add_commands(sub: Any) -> None:
    """Register ``jobs`` and its actions: list, show, cancel, requeue, delete, priority."""
    jobs = sub.add_parser(
        "jobs",
        help="list, show, cancel, requeue, delete and reprioritize jobs",
        description="Exit status: 0 done, 1 refused by the job's state (the reason is on "
        "stderr), 2 bad arguments (an unknown state, a job id that names no job).",
    )
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="the newest jobs first")
    listing.set_defaults(run=cmd_list)
    states = ", ".join(s.value for s in JobState)
    listing.add_argument("--state", default="", help=f"only jobs in this state: {states}")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="print them as JSON")

    show = actions.add_parser("show", help="one job with its attempts and events")
    show.set_defaults(run=cmd_show)
    show.add_argument("job_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print it as JSON")

    cancel = actions.add_parser("cancel", help="cancel a queued or running job")
    cancel.set_defaults(run=cmd_cancel)
    cancel.add_argument("job_id", metavar="ID")

    requeue = actions.add_parser("requeue", help="put a failed or canceled job back in the queue")
    requeue.set_defaults(run=cmd_requeue)
    requeue.add_argument("job_id", metavar="ID")
    requeue.add_argument("--fp32", action="store_true", help="every component in fp32")
    requeue.add_argument("--queue", default="", help="send it to this queue")
    requeue.add_argument("--no-casts", action="store_true", help="turn the boundary casts off")

    delete = actions.add_parser("delete", help="delete a job that is not running, and its files")
    delete.set_defaults(run=cmd_delete)
    delete.add_argument("job_id", metavar="ID")

    priority = actions.add_parser(
        "priority",
        help="change a queued job's priority (-10..10), or move it to the front",
        description="Exit status: 0 done, 2 a bad id or priority, or a job not waiting in "
        "the queue (the reason is on stderr).",
    )
    priority.set_defaults(run=cmd_priority)
    priority.add_argument("job_id", metavar="ID")
    priority.add_argument("priority", metavar="N", type=int, nargs="?", help="-10 to 10")
    priority.add_argument(
        "--front", action="store_true", help="the highest priority: dispatched next"
    )


def operator() -> By:
    """Who the job's events say acted: ``cli:<login name>`` (``cli`` when there is none)."""
    from svdfarm.lifecycle import By

    try:
        name = getpass.getuser()
    except (OSError, KeyError):  # no USER variable and no passwd entry (a bare container)
        name = ""
    return By(Actor.CLI, name)


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    """A session on the farm's database, its engine disposed afterwards."""
    from svdfarm.db import Database

    database = Database(settings.database_url)
    try:
        with database.session() as session:
            yield session
    finally:
        database.dispose()


def _find(session: Session, raw: str) -> Job:
    """The job ``raw`` names; LookupError says why there is none (as :mod:`svdfarm.actions`
    words it)."""
    from svdfarm.actions import parse_job_id
    from svdfarm.models import Job

    key = parse_job_id(raw)
    if key is None:
        raise LookupError(f"{raw[:64]!r} is not a job id (job ids are UUIDs).")
    job = session.get(Job, key)
    if job is None:
        raise LookupError(f"No job with id {key}.")
    return job


def _plain(value: Any) -> Any:
    """A column value as JSON holds it: ids and times as strings, enums as their values."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def columns(row: Job | Attempt) -> dict[str, Any]:
    """Every column of a job or attempt row, as JSON values."""
    return {attr.key: _plain(getattr(row, attr.key)) for attr in row.__mapper__.column_attrs}


def job_document(job: Job, events: list[JobEvent]) -> dict[str, Any]:
    """What ``svdfarm jobs show --json`` prints: the job's columns, attempts and events."""
    return {
        **columns(job),
        "attempts": [columns(a) for a in job.attempts],
        "events": [e.as_dict() for e in events],
    }


def _when(value: datetime | None) -> str:
    """A time as ``2026-11-30 07:00:05`` in UTC, or ``-``."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm jobs list [--state S] [--limit N] [--json]``: the newest jobs first."""
    from svdfarm.actions import list_jobs

    state = None
    if args.state:
        try:
            state = JobState(args.state)
        except ValueError:
            states = ", ".join(s.value for s in JobState)
            return fail(f"unknown state {args.state!r}: use one of {states}")
    if args.limit < 1:
        return fail(f"--limit must be at least 1, got {args.limit}")
    with _session(settings) as session:
        jobs = list_jobs(session, state=state, limit=args.limit)
        if args.json:
            print(json.dumps([columns(job) for job in jobs], indent=2))
            return 0
        header = f"{'id':<36}  {'state':<16} {'progress':>8}  {'size':<16} {'queue':<18}"
        print(f"{header} created (UTC)")
        for job in jobs:
            size = f"{job.num_frames}f {job.width}x{job.height}"
            print(
                f"{job.id!s:<36}  {job.state.value:<16} {job.progress:>8.0%}  {size:<16} "
                f"{job.queue or '-':<18} {_when(job.created_at)}"
            )
    if not jobs:
        print(f"(no {state.value} jobs)" if state else "(no jobs)")
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm jobs show ID [--json]``: one job, its attempts and its events."""
    from svdfarm.actions import show_job

    with _session(settings) as session:
        try:
            job, events = show_job(session, args.job_id)
        except LookupError as exc:
            return fail(str(exc))
        if args.json:
            print(json.dumps(job_document(job, events), indent=2))
            return 0
        _print_job(job, events)
    return 0


def _print_job(job: Job, events: list[JobEvent]) -> None:
    """The job as a person reads it: its fields, then one line per attempt and per event."""
    params = (
        f"{job.num_frames} frames {job.width}x{job.height}, {job.num_inference_steps} steps, "
        f"{job.fps} fps, seed {job.seed}, precision {job.precision}"
    )
    fields = [
        ("state", f"{job.state.label} ({job.phase.label}, {job.progress:.0%})"),
        ("queue", f"{job.queue or '-'} (about {job.memory_estimate_bytes / 1e9:.1f} GB)"),
        ("model", job.model),
        ("params", params),
        ("input", job.input_filename or job.input_key),
        ("created", _when(job.created_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
        ("error", job.error or "-"),
    ]
    print(f"job {job.id}")
    for name, value in fields:
        print(f"  {name:<9} {value}")
    print("attempts" if job.attempts else "attempts: none")
    for a in job.attempts:
        outcome = a.outcome.value + (f" ({a.error_class.label})" if a.error_class else "")
        took = f"{a.duration_s:.1f} s" if a.duration_s is not None else "-"
        print(f"  #{a.number:<3} {a.worker:<28} {outcome:<28} {took:>9}  {a.plan_name}")
    print("events" if events else "events: none")
    for e in events:
        event = e.as_dict()
        details = json.dumps(event["details"], sort_keys=True) if event["details"] else ""
        print(f"  {_when(e.at)}  {event['type']:<16} {event['actor']:<24} {details}".rstrip())


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm jobs cancel ID``: a queued job at once, a running one at its next step."""
    from svdfarm.actions import cancel_job

    with _session(settings) as session:
        try:
            job = _find(session, args.job_id)
        except LookupError as exc:
            return fail(str(exc))
        return _report(cancel_job(session, job.id, by=operator()))


def cmd_requeue(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm jobs requeue ID [--fp32] [--queue Q] [--no-casts]``."""
    from svdfarm.actions import check_queue, requeue_jobs
    from svdfarm.celery_app import create_celery

    try:
        queue = check_queue(args.queue)
    except ValueError as exc:
        return fail(str(exc))
    with _session(settings) as session:
        try:
            job = _find(session, args.job_id)
        except LookupError as exc:
            return fail(str(exc))
        celery = create_celery(settings)
        try:
            [change] = requeue_jobs(
                session,
                celery,
                settings,
                [job.id],
                by=operator(),
                force_fp32=args.fp32,
                queue=queue,
                casts_off=args.no_casts,
            )
        finally:
            celery.close()
        return _report(change)


def cmd_delete(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm jobs delete ID``: a job no worker runs, with its attempts and files."""
    from svdfarm.actions import delete_job

    with _session(settings) as session:
        try:
            job = _find(session, args.job_id)
        except LookupError as exc:
            return fail(str(exc))
        return _report(delete_job(session, settings, job.id))


def cmd_priority(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm jobs priority ID N`` or ``svdfarm jobs priority ID --front``: a queued job's
    new priority, committed; exit 2 for a bad id or priority, or a job no longer waiting."""
    from svdfarm.lifecycle import reprioritize

    if (args.priority is None) == (not args.front):
        return fail("give either a priority N (-10 to 10) or --front, not both")
    with _session(settings) as session:
        try:
            job_id = _find(session, args.job_id).id
            new = reprioritize(
                session, job_id, by=operator(), priority=args.priority, front=args.front
            )
        except (LookupError, ValueError) as exc:  # IllegalMove is a ValueError
            session.rollback()
            return fail(str(exc))
        session.commit()
    where = "moved to the front: priority" if args.front else "priority is now"
    print(f"Job {job_id} {where} {new}.")
    return 0


def _report(change: JobChange) -> int:
    """Print what an action did (0), or why it was refused on stderr (1)."""
    if not change.done:
        return fail(change.message, 1)
    print(change.message)
    return 0
