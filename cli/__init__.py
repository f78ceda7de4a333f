"""The ``svdfarm`` command: run the farm (``up``, ``web``, ``worker``), operate it (``db``,
``queues``, ``reap``, ``admin``, ``jobs``, ``users``, ``keys``, ``workers``, ``cleanup``,
``storage``), and
work on this machine without the queue (``render``, ``caps``, ``model``).

The CLI sits above the three packages: it imports the core (``svdfarm``), the web side and
the worker, each only inside the command that needs it, so ``svdfarm --help``, ``svdfarm web``
and ``svdfarm jobs`` never load torch. One module per group of commands: :mod:`cli.serve`,
:mod:`cli.farm`, :mod:`cli.jobs`, :mod:`cli.users`, :mod:`cli.workers`, :mod:`cli.cleanup`,
:mod:`cli.storage` and :mod:`cli.local`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from sqlalchemy.exc import DBAPIError

from cli import gpus
from svdfarm.catalog import find_entry
from svdfarm.settings import ModelChoice, Settings, SettingsError, choose_model, load_settings

DESCRIPTION = (
    "Run the farm (up, web, worker), operate it (db, queues, reap, admin, jobs, users, keys, "
    "workers, cleanup, storage), and work on this machine without the queue (render, caps, "
    "model)."
)


def fail(message: str, status: int = 2) -> int:
    """Print ``error: <message>`` on stderr and return ``status`` (2: bad input, 1: refused)."""
    print(f"error: {message}", file=sys.stderr)
    return status


def redact(url: str) -> str:
    """A database or broker URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def settle_model(settings: Settings, given: str = "") -> Settings:
    """Pick the model by the one rule (:func:`svdfarm.settings.choose_model`; ``given`` is a
    ``--model`` flag: a source, or a catalog id), print it, and export it as ``SVDFARM_MODEL``,
    so the processes this one starts and the Celery app (built from the environment) run the
    same model."""
    if given:
        # A catalog id (svd-xt, tiny, ...) names its source; anything else is a source itself.
        entry = find_entry(settings.catalog, given)
        choice = ModelChoice(entry.source if entry is not None else given, "--model")
    else:
        try:
            choice = choose_model(os.environ, gpu_count=gpus.cuda_device_count)
        except gpus.GpuQueryFailed as exc:
            raise SettingsError(f"{exc}; set SVDFARM_MODEL to choose the model yourself") from None
    os.environ["SVDFARM_MODEL"] = choice.model
    print(choice, file=sys.stderr, flush=True)
    return settings.with_overrides(model=choice.model)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``svdfarm`` command; each subcommand sets ``run``."""
    from cli import cleanup, farm, jobs, local, serve, storage, users, webhooks, workers

    parser = argparse.ArgumentParser(prog="svdfarm", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (serve, farm, workers, jobs, users, cleanup, storage, local, webhooks):
        group.add_commands(sub)
    return parser


def missing_schema(exc: DBAPIError) -> bool:
    """True when a database error says a table or column of ours is missing (a database not
    migrated, or migrated to an older revision)."""
    text = str(exc.orig).lower()
    return any(sign in text for sign in ("no such table", "no such column", "does not exist")) and (
        "relation" in text or "column" in text or "no such" in text
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``svdfarm`` command."""
    try:
        try:
            args = build_parser().parse_args(argv)
            settings = load_settings()
            status: int = args.run(args, settings)
        finally:
            sys.stdout.flush()  # a reader that left (``| head``) shows here, not at exit
    except SettingsError as exc:
        return fail(str(exc))
    except DBAPIError as exc:
        if not missing_schema(exc):
            raise
        return fail(
            "the database has no svdfarm tables yet, or an older schema: run "
            "`svdfarm db upgrade` first (`svdfarm up` does it on its own)."
        )
    except BrokenPipeError:
        # Whatever reads our output stopped reading: say nothing more to it, and make the
        # flush at exit write to nowhere instead of printing a second error.
        with contextlib.suppress(OSError, ValueError):  # stdout may be no file (a test's)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return status
