"""Running the farm: ``svdfarm up`` (migrate, then the web and a worker), ``svdfarm web`` and
``svdfarm worker``, and the supervision of the child processes they start.

``up`` and ``worker --gpus`` count GPUs with :mod:`cli.gpus`, never importing torch in the
parent; a worker imports torch in its own process. Each picks its model by the one rule
(:func:`cli.settle_model`) and hands it to its children in ``SVDFARM_MODEL``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cli import fail, redact, settle_model
from cli.gpus import GpuQueryFailed, cuda_device_count, torch_installed
from cli.noise import silence_library_noise
from cli.web_server import ServePlan, Server, default_worker_class, serve
from svdfarm.settings import MAX_WEB, Settings, load_settings

#: How the farm starts its own children: this interpreter, ``python -m cli``.
SVDFARM = [sys.executable, "-m", "cli"]


def add_commands(sub: Any) -> None:
    """Register ``up``, ``web`` and ``worker``."""
    up = sub.add_parser("up", help="migrate, then run the web and one worker (Ctrl-C stops)")
    up.set_defaults(run=cmd_up)
    web = sub.add_parser("web", help="serve the web app")
    web.set_defaults(run=cmd_web)
    for p in (up, web):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
    web.add_argument(
        "--server",
        choices=[server.value for server in Server],
        default=Server.default().value,
        help="the WSGI server (default: gunicorn on Linux and macOS, waitress on Windows)",
    )
    web.add_argument(
        "--workers", type=int, default=0, help="server processes (default: SVDFARM_WEB_WORKERS)"
    )
    web.add_argument(
        "--threads", type=int, default=0, help="threads per process (default: SVDFARM_WEB_THREADS)"
    )

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.set_defaults(run=cmd_worker)
    worker.add_argument("--queues", "-Q", default="", help="comma-separated queues")
    worker.add_argument("--concurrency", "-c", type=int, default=1)
    worker.add_argument("--loglevel", "-l", default="INFO")
    worker.add_argument(
        "--hostname",
        "-n",
        default="",
        help="the worker's name, %%h for this machine's (default: worker<N>@<host>, the lowest "
        "N no other worker here holds)",
    )
    worker.add_argument("--gpus", default="", help="'all' or 0,1,...: one worker per GPU")


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm web``: serve the web app with gunicorn (waitress on Windows or when asked)."""
    settings = settle_model(settings)  # its form's defaults and the jobs' model follow it
    settings.check_production()  # once here, before any server process starts
    for flag, value in (("--workers", args.workers), ("--threads", args.threads)):
        if not 0 <= value <= MAX_WEB:
            return fail(f"{flag} {value} must be between 1 and {MAX_WEB} (0: the setting)")
    silence_library_noise(embedded_broker=settings.embedded_broker)
    plan = ServePlan(
        server=Server(args.server),
        host=args.host,
        port=args.port,
        workers=args.workers or settings.web_workers,
        threads=args.threads or settings.web_threads,
        worker_class=default_worker_class(),
    )
    print(plan.describe(), flush=True)
    return serve(plan, settings)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm worker``: probe, subscribe to every queue this machine can serve, run Celery.

    The same as ``celery -A svdfarm worker -Q <queues>`` with the queues worked out for you
    and a name no other worker on this machine holds. ``--gpus all`` (or ``0,1``) runs one
    such worker per GPU instead.
    """
    if args.gpus:
        return workers_per_gpu(args)
    # Before the Celery app is imported: it reads SVDFARM_MODEL when it is built.
    settings = settle_model(settings)
    from cli.nodenames import NameTaken, claim_worker_name

    try:
        name = claim_worker_name(args.hostname)
    except NameTaken as exc:
        return fail(str(exc), 1)
    from svdfarm.queues import TIERS_GB, expand_queues, queues_for
    from worker.probe import Capabilities, probe_in_subprocess
    from worker.tasks import CAPABILITIES_ENV

    silence_library_noise(embedded_broker=settings.embedded_broker)
    caps = probe_in_subprocess()
    os.environ[CAPABILITIES_ENV] = json.dumps(caps)
    keys = worker_model_keys(settings)
    pinned = [q for q in args.queues.split(",") if q]
    queues = expand_queues(pinned, keys) if pinned else queues_for(caps, keys)
    print(Capabilities.from_dict(caps).summary(), flush=True)
    if not queues:
        memory = (caps.get("total_memory_bytes") or 0) / 1e9
        return fail(
            f"no queue fits this {caps['device']} device: {memory:.1f} GB is below the "
            f"smallest memory tier ({TIERS_GB[0]} GB); give --queues to pin one"
        )
    print(f"worker {name.name}, consuming {len(queues)} queue(s): {', '.join(queues)}", flush=True)
    from svdfarm.celery_app import app, render_cut_short

    cut_short = render_cut_short(app)
    if cut_short:
        print(f"warning: {cut_short}", file=sys.stderr, flush=True)
    elif not settings.embedded_broker:
        print(
            "messages are acknowledged when a render starts: the broker's consumer or "
            "visibility timeout does not limit how long a render may take",
            flush=True,
        )

    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        f"--concurrency={args.concurrency}",
        f"--queues={','.join(queues)}",
        f"--hostname={name.name}",
        "--task-events",
    ]
    try:
        app.worker_main(argv)
    finally:
        name.release()
    return 0


def worker_model_keys(settings: Settings) -> list[str]:
    """The queue keys of the models this worker advertises (as its registry row will): it
    consumes only those models' queues, so it never receives a job for a model it lacks."""
    from svdfarm.catalog import advertised_models, queue_key

    sources = advertised_models(
        settings.catalog, settings.worker_models, settings.model, settings.models_dir
    )
    return list(dict.fromkeys(queue_key(settings.catalog, source) for source in sources))


def workers_per_gpu(args: argparse.Namespace) -> int:
    """One ``svdfarm worker`` process per GPU, each seeing only its own card."""
    if args.gpus == "all":
        try:
            count = cuda_device_count()
        except GpuQueryFailed as exc:
            return fail(f"--gpus all cannot count the GPUs: {exc}")
        if not count:
            return fail("--gpus all found no CUDA device")
        indices = [str(i) for i in range(count)]
    else:
        indices = [i.strip() for i in args.gpus.split(",") if i.strip()]
        if not all(i.isdigit() for i in indices):
            return fail(f"--gpus takes 'all' or GPU indices like 0,1; got {args.gpus!r}")
    settings = settle_model(load_settings())  # once here; each worker inherits the choice
    children = []
    for index in indices:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": index}
        argv = [
            *SVDFARM,
            "worker",
            "--concurrency",
            "1",
            "--loglevel",
            args.loglevel,
            "--hostname",
            f"gpu{index}@%h",
        ]
        if args.queues:
            argv += ["--queues", args.queues]
        print(f"starting the worker for GPU {index}", flush=True)
        children.append(Child.start(f"the worker for GPU {index}", argv, env, worker=True))
    return supervise(children, stop_timeout_s=settings.stop_timeout_s)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm up``: migrate, then run the web and one worker until Ctrl-C."""
    from svdfarm import db

    if not torch_installed():
        return fail(
            "svdfarm up runs a worker, which needs torch: install the worker extra "
            "(pip install 'svdfarm[worker]', or make run)"
        )
    settings = settle_model(settings)  # exported: the web and the worker use the same model
    settings.check_production()  # before anything is written or started
    settings.ensure_dirs()
    db.upgrade(settings.database_url)
    print(f"database: {redact(settings.database_url)}; broker: {redact(settings.broker_url)}")
    env = dict(os.environ)
    web = [*SVDFARM, "web", "--host", args.host, "--port", str(args.port)]
    children = [
        Child.start("the web", web, env),
        Child.start("the worker", [*SVDFARM, "worker", "--loglevel", "INFO"], env, worker=True),
    ]
    return supervise(children, stop_timeout_s=settings.stop_timeout_s)


@dataclass
class Child:
    """A process ``up`` or ``worker --gpus`` started, in a process group of its own.

    Its own group keeps a terminal's Ctrl-C to the parent, which alone decides what each
    child hears, and lets the parent kill what a child leaves behind (a worker's pool).
    """

    name: str
    process: subprocess.Popen[bytes]
    #: A worker: SIGQUIT (Celery's cold shutdown) stops it at once, handing its job back.
    worker: bool = False

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str], worker: bool = False) -> Child:
        """Start ``argv`` with ``env`` in a new session (and so a new process group)."""
        return cls(name, subprocess.Popen(argv, env=env, start_new_session=True), worker)

    def running(self) -> bool:
        """True until the process has exited."""
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process, if it still runs."""
        if self.running():
            self.process.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL the process and whatever is left in its group (its pool, say)."""
        if self.running():
            self.process.kill()
            self.process.wait()
        _kill_group(self.process.pid)


def _kill_group(pgid: int) -> None:
    """SIGKILL every process still in group ``pgid``; nothing when it is empty.

    While a group has a member its id cannot be reused, so this never reaches a stranger.
    """
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


#: Seconds a child gets after the second Ctrl-C (or SIGTERM) before it is killed.
HURRY_S = 20.0
#: Seconds past the stop timeout before children still running after one signal are killed.
PAST_TIMEOUT_S = 30.0


def supervise(children: list[Child], *, stop_timeout_s: float) -> int:
    """Wait while every child runs, then stop them all; the exit status of the command.

    The first Ctrl-C, SIGTERM or SIGHUP (or a child's exit) asks each child to stop: a worker
    finishes its running job for up to ``stop_timeout_s`` (``SVDFARM_STOP_TIMEOUT``), then
    hands it back itself; a countdown says so. A second signal stops them now: a worker hands
    its job back to the queue and exits. A third kills them. Whatever a child leaves behind
    is killed with its process group.
    """
    signals: list[int] = []

    def note(signum: int, _frame: Any) -> None:
        signals.append(signum)

    # SIGINT too: a process started in the background inherits SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, note)
    status = 0
    while not signals:
        ended = [child for child in children if not child.running()]
        if ended:
            status = ended[0].process.returncode
            print(f"{ended[0].name} exited with status {status}; stopping", file=sys.stderr)
            break
        time.sleep(0.2)
    _stop(children, signals, stop_timeout_s)
    return status


def _stop(children: list[Child], signals: list[int], stop_timeout_s: float) -> None:
    """Stop the children in up to three steps, one per signal received (see supervise)."""
    countdown = _Countdown(stop_timeout_s)
    for child in children:
        child.signal(signal.SIGTERM)
    seen = len(signals)
    kill_at = time.monotonic() + stop_timeout_s + PAST_TIMEOUT_S
    hurried = False
    while any(child.running() for child in children):
        if len(signals) > seen and not hurried:
            seen, hurried = len(signals), True
            countdown.close()
            print("stopping now: handing the running job back to the queue", file=sys.stderr)
            for child in children:
                child.signal(signal.SIGQUIT if child.worker else signal.SIGTERM)
            kill_at = min(kill_at, time.monotonic() + HURRY_S)
        elif len(signals) > seen or time.monotonic() > kill_at:
            countdown.close()
            print("stopping: killing what is left", file=sys.stderr)
            break
        if not hurried and any(child.worker and child.running() for child in children):
            countdown.show()
        time.sleep(0.2)
    countdown.close()
    for child in children:
        child.kill_group()


class _Countdown:
    """The one line that says what a stopping farm waits for: rewritten in place on a
    terminal, printed once a minute elsewhere (a log)."""

    def __init__(self, stop_timeout_s: float) -> None:
        """Start counting now; the first line shows after a second (an idle worker is gone)."""
        self.started = time.monotonic()
        self.stop_timeout_s = stop_timeout_s
        self.tty = sys.stderr.isatty()
        self.shown_at: float | None = None
        self.open = False

    def show(self) -> None:
        """Draw the line if it is time to."""
        now = time.monotonic()
        if now - self.started < 1.0:
            return
        if self.shown_at is not None and now - self.shown_at < (1.0 if self.tty else 60.0):
            return
        self.shown_at = now
        left = self.stop_timeout_s - (now - self.started)
        if left > 0:
            line = (
                "stopping: waiting for the running job, Ctrl-C again to hand it back now "
                f"({left:.0f} s left)"
            )
        else:
            line = "stopping: the stop timeout passed; the worker is handing its job back"
        if self.tty:
            sys.stderr.write(f"\r{line}\x1b[K")
            self.open = True
        else:
            sys.stderr.write(f"{line}\n")
        sys.stderr.flush()

    def close(self) -> None:
        """End a line drawn in place, so that what follows starts on its own."""
        if self.open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.open = False


def stop_children(children: Sequence[subprocess.Popen[Any]], grace_s: float) -> None:
    """SIGTERM each child still running, then SIGKILL whatever has not exited after
    ``grace_s`` seconds (one deadline for all)."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
