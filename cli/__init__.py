"""The ``svdfarm`` command: run the farm (``up``, ``web``, ``worker``), operate it (``db``,
``queues``, ``reap``, ``admin``, ``jobs``), and work on this machine without the queue
(``render``, ``caps``, ``model``).

The CLI sits above the three packages: it imports the core (``svdfarm``), the web side and
the worker, each only inside the command that needs it, so ``svdfarm --help``, ``svdfarm web``
and ``svdfarm jobs`` never load torch. One module per group of commands: :mod:`cli.serve`,
:mod:`cli.farm`, :mod:`cli.jobs` and :mod:`cli.local`.
"""

from __future__ import annotations

import argparse
import sys

from svdfarm.settings import SettingsError, load_settings

DESCRIPTION = (
    "Run the farm (up, web, worker), operate it (db, queues, reap, admin, jobs), and work on "
    "this machine without the queue (render, caps, model)."
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``svdfarm`` command; each subcommand sets ``run``."""
    from cli import farm, jobs, local, serve

    parser = argparse.ArgumentParser(prog="svdfarm", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (serve, farm, jobs, local):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``svdfarm`` command."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        status: int = args.run(args, settings)
    except SettingsError as exc:
        return fail(str(exc))
    return status
