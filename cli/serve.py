"""Running the farm: ``svdfarm up`` (migrate, then the web and a worker), ``svdfarm web`` and
``svdfarm worker``, and the supervision of the child processes they start.

``up`` and ``worker --gpus`` count GPUs with :mod:`cli.gpus`, never importing torch in the
parent; a worker imports torch in its own process.
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
from typing import Any

from cli import fail, redact
from cli.gpus import GpuQueryFailed, cuda_device_count, torch_installed
from svdfarm.settings import Settings, load_settings

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
    web.add_argument("--threads", type=int, default=8)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.set_defaults(run=cmd_worker)
    worker.add_argument("--queues", "-Q", default="", help="comma-separated queues")
    worker.add_argument("--concurrency", "-c", type=int, default=1)
    worker.add_argument("--loglevel", "-l", default="INFO")
    worker.add_argument("--hostname", "-n", default="")
    worker.add_argument("--gpus", default="", help="'all' or 0,1,...: one worker per GPU")


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm web``: serve the web app with waitress."""
    from waitress import serve

    from web import create_app

    app = create_app({"SVDFARM_SETTINGS": settings})
    print(f"svdfarm web on http://{args.host}:{args.port}/", flush=True)
    serve(
        app,
        host=args.host,
        port=args.port,
        threads=args.threads,
        ident="svdfarm",
        # waitress drops X-Forwarded-* unless told otherwise; keep them only when a proxy is
        # trusted (SVDFARM_TRUSTED_PROXIES), and ProxyFix decides how many hops to believe.
        clear_untrusted_proxy_headers=not settings.trusted_proxies,
    )
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm worker``: probe, subscribe to every queue this machine can serve, run Celery.

    The same as ``celery -A svdfarm worker -Q <queues>`` with the queues worked out for you.
    ``--gpus all`` (or ``0,1``) runs one such worker per GPU instead.
    """
    if args.gpus:
        return workers_per_gpu(args)
    from svdfarm.queues import TIERS_GB, queues_for
    from worker.probe import Capabilities, probe_in_subprocess
    from worker.tasks import CAPABILITIES_ENV

    caps = probe_in_subprocess()
    os.environ[CAPABILITIES_ENV] = json.dumps(caps)
    queues = [q for q in args.queues.split(",") if q] if args.queues else queues_for(caps)
    print(Capabilities.from_dict(caps).summary(), flush=True)
    if not queues:
        memory = (caps.get("total_memory_bytes") or 0) / 1e9
        return fail(
            f"no queue fits this {caps['device']} device: {memory:.1f} GB is below the "
            f"smallest memory tier ({TIERS_GB[0]} GB); give --queues to pin one"
        )
    print(f"consuming {len(queues)} queue(s): {', '.join(queues)}", flush=True)
    from svdfarm.celery_app import app

    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        f"--concurrency={args.concurrency}",
        f"--queues={','.join(queues)}",
        "--task-events",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    app.worker_main(argv)
    return 0


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
        children.append(subprocess.Popen(argv, env=env))
    # Each worker gets its full stop timeout to finish its running job.
    return supervise(children, grace_s=load_settings().stop_timeout_s + 30)


def supervise(children: list[subprocess.Popen[bytes]], grace_s: float = 30) -> int:
    """Wait while every child runs; on Ctrl-C, SIGTERM or a child's exit, stop them all,
    killing those still running ``grace_s`` seconds later."""

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        status = next(child.returncode for child in children if child.poll() is not None)
        print(f"a child process exited with status {status}; stopping the rest", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping…", file=sys.stderr)
    finally:
        stop_children(children, grace_s)
    return status


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


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm up``: migrate, then run the web and one worker until Ctrl-C.

    Without ``SVDFARM_MODEL`` and without a CUDA device it uses the built-in tiny model.
    """
    from svdfarm import db

    if not torch_installed():
        return fail(
            "svdfarm up runs a worker, which needs torch: install the worker extra "
            "(pip install 'svdfarm[worker]', or make run)"
        )
    env = dict(os.environ)
    if not env.get("SVDFARM_MODEL"):
        try:
            gpus = cuda_device_count(env)
        except GpuQueryFailed as exc:
            return fail(f"{exc}; set SVDFARM_MODEL to choose the model yourself")
        if not gpus:
            env["SVDFARM_MODEL"] = "tiny"
            print("no GPU found: using the built-in tiny model (set SVDFARM_MODEL to change)")
    settings = load_settings(env)
    settings.check_production()  # before anything is written or started
    settings.ensure_dirs()
    db.upgrade(settings.database_url)
    print(f"database: {redact(settings.database_url)}; broker: {redact(settings.broker_url)}")
    children = [
        subprocess.Popen([*SVDFARM, "web", "--host", args.host, "--port", str(args.port)], env=env),
        subprocess.Popen([*SVDFARM, "worker", "--loglevel", "INFO"], env=env),
    ]
    return supervise(children, grace_s=settings.stop_timeout_s + 30)
