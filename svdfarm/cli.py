"""The ``svdfarm`` command: run the farm (``up``, ``web``, ``worker``), migrate the database,
render one image without the queue, and write the built-in tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from svdfarm.settings import Settings, SettingsError, load_settings


def _cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm db upgrade|downgrade``."""
    from svdfarm import db

    if args.action == "upgrade":
        db.upgrade(settings.database_url, args.revision or "head")
    else:
        db.downgrade(settings.database_url, args.revision or "-1")
    print(f"database {_redact(settings.database_url)} is at {args.revision or args.action}")
    return 0


def _redact(url: str) -> str:
    """A database or broker URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _cmd_web(args: argparse.Namespace, settings: Settings) -> int:
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


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm worker``: probe, subscribe to every queue this machine can serve, run Celery.

    The same as ``celery -A svdfarm worker -Q <queues>`` with the queues worked out for you.
    ``--gpus all`` (or ``0,1``) runs one such worker per GPU instead.
    """
    if args.gpus:
        return _workers_per_gpu(args)
    from svdfarm.queues import TIERS_GB, queues_for
    from worker.probe import Capabilities, probe_in_subprocess
    from worker.tasks import CAPABILITIES_ENV

    caps = probe_in_subprocess()
    os.environ[CAPABILITIES_ENV] = json.dumps(caps)
    queues = [q for q in args.queues.split(",") if q] if args.queues else queues_for(caps)
    print(Capabilities.from_dict(caps).summary(), flush=True)
    if not queues:
        memory = (caps.get("total_memory_bytes") or 0) / 1e9
        print(
            f"error: no queue fits this {caps['device']} device: {memory:.1f} GB is below the "
            f"smallest memory tier ({TIERS_GB[0]} GB); give --queues to pin one",
            file=sys.stderr,
        )
        return 2
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


def _workers_per_gpu(args: argparse.Namespace) -> int:
    """One ``svdfarm worker`` process per GPU, each seeing only its own card."""
    if args.gpus == "all":
        from worker.probe import probe_in_subprocess

        caps = probe_in_subprocess()
        if caps["device"] != "cuda":
            print("error: --gpus all found no CUDA device", file=sys.stderr)
            return 2
        indices = [str(i) for i in range(int(caps["count"]))]
    else:
        indices = [i.strip() for i in args.gpus.split(",") if i.strip()]
        if not all(i.isdigit() for i in indices):
            print(
                f"error: --gpus takes 'all' or GPU indices like 0,1; got {args.gpus!r}",
                file=sys.stderr,
            )
            return 2
    children = []
    for index in indices:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": index}
        argv = [
            sys.executable,
            "-m",
            "svdfarm.cli",
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
    return _supervise(children, grace_s=load_settings().stop_timeout_s + 30)


def _supervise(children: list[subprocess.Popen[bytes]], grace_s: float = 30) -> int:
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


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm up``: migrate, then run the web and one worker until Ctrl-C."""
    from svdfarm import db

    env = dict(os.environ)
    if not env.get("SVDFARM_MODEL"):
        import torch

        if not torch.cuda.is_available():
            env["SVDFARM_MODEL"] = "tiny"
            print("no GPU found: using the built-in tiny model (set SVDFARM_MODEL to change)")
    settings = load_settings(env)
    if settings.production:
        from web.security import check_production

        check_production(settings)  # before anything is written or started
    settings.ensure_dirs()
    db.upgrade(settings.database_url)
    print(f"database: {_redact(settings.database_url)}; broker: {_redact(settings.broker_url)}")
    me = [sys.executable, "-m", "svdfarm.cli"]
    children = [
        subprocess.Popen([*me, "web", "--host", args.host, "--port", str(args.port)], env=env),
        subprocess.Popen([*me, "worker", "--loglevel", "INFO"], env=env),
    ]
    return _supervise(children, grace_s=settings.stop_timeout_s + 30)


def _progress_bar(phase: str, progress: float, step: int) -> None:
    """Draw a one-line progress bar on stderr."""
    width = 30
    filled = int(round(progress * width))
    bar = "#" * filled + "-" * (width - filled)
    sys.stderr.write(f"\r[{bar}] {progress * 100:5.1f}%  {phase:<10} step {step}")
    sys.stderr.flush()


def _cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm render IMAGE -o OUT.mp4``: the worker's render path, without the queue."""
    from svdfarm.images import ImageError, inspect_image, open_upright_rgb
    from svdfarm.params import ParamError, parse_params

    if args.model:
        settings = settings.with_overrides(model=args.model)
    settings.ensure_dirs()
    try:
        data = Path(args.image).read_bytes()
        info = inspect_image(data, settings.max_upload_bytes, settings.max_image_pixels)
        raw = {
            "num_frames": args.frames,
            "num_inference_steps": args.steps,
            "fps": args.fps,
            "motion_bucket_id": args.motion_bucket_id,
            "noise_aug_strength": args.noise_aug_strength,
            "seed": args.seed,
            "decode_chunk_size": args.decode_chunk_size,
            "width": args.width,
            "height": args.height,
            "precision": args.precision,
        }
        params = parse_params(raw, (info.width, info.height), settings.model)
    except OSError as exc:
        print(f"error: cannot read {args.image}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (ImageError, ParamError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from worker.planner import first_plan
    from worker.plans import parse_dtypes
    from worker.runner import RenderFailed, local_capabilities, render_with_ladder

    try:
        dtypes = parse_dtypes(args.dtypes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    casts = settings.casts and not args.no_casts
    plan, reason = first_plan(local_capabilities(), params, casts=casts, dtypes=dtypes)
    if reason:
        print(f"note: {reason}", file=sys.stderr)
    print(
        f"rendering {params.num_frames} frames at {params.width}x{params.height}, "
        f"{params.num_inference_steps} steps, seed {params.seed}, model {settings.model}",
        file=sys.stderr,
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    hooks = _PrintedAttempts(quiet=args.json, steps=params.num_inference_steps)
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        poster = Path(args.poster) if args.poster else Path(tmp) / "poster.png"
        try:
            render_with_ladder(
                settings,
                params,
                plan,
                reason,
                open_upright_rgb(data),
                out,
                poster,
                _progress_bar,
                hooks,
            )
        except RenderFailed as failed:
            sys.stderr.write("\n")
            print(f"error: {failed}", file=sys.stderr)
            status = 1
    if args.json:
        print(
            json.dumps(
                {
                    "output": str(out) if status == 0 else None,
                    "attempts": [a.as_dict() for a in hooks.attempts],
                },
                indent=2,
            )
        )
    elif status == 0:
        total = sum(a.duration_s for a in hooks.attempts)
        print(f"wrote {out} in {total:.1f} s ({len(hooks.attempts)} attempt(s))")
    return status


class _PrintedAttempts:
    """Attempt hooks for the command line: a line on stderr as each attempt starts and ends."""

    def __init__(self, quiet: bool, steps: int) -> None:
        """Collect attempts of a ``steps``-step render; ``quiet`` keeps stderr to the bar."""
        self.attempts: list[Any] = []
        self.quiet = quiet
        self.steps = steps

    def started(self, attempt: Any) -> None:
        """Say which plan this attempt runs."""
        self.attempts.append(attempt)
        if not self.quiet:
            why = f" ({attempt.reason})" if attempt.reason and attempt.number > 1 else ""
            print(f"\nattempt {attempt.number}: {attempt.plan.name}{why}", file=sys.stderr)

    def finished(self, attempt: Any) -> None:
        """Say how the attempt ended."""
        if attempt.outcome.value == "succeeded":
            _progress_bar("done", 1.0, self.steps)
        if not self.quiet:
            what = attempt.outcome.value
            if attempt.error_class:
                what += f" ({attempt.error_class.label}: {(attempt.message or '')[:160]})"
            print(
                f"\nattempt {attempt.number}: {what} in {attempt.duration_s:.1f} s", file=sys.stderr
            )


def _cmd_caps(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm caps``: this machine's capabilities and the plans it would pick."""
    from svdfarm.params import PRECISIONS, parse_params
    from worker.planner import first_plan
    from worker.runner import local_capabilities

    caps = local_capabilities()
    params = parse_params({}, (1024, 576), settings.model)
    plans = {}
    for precision in PRECISIONS:
        plan, reason = first_plan(caps, params, precision, casts=settings.casts)
        plans[precision] = {"plan": plan.name, "reason": reason, **plan.as_dict()}
    if args.json:
        print(json.dumps({"capabilities": caps.as_dict(), "plans": plans}, indent=2))
        return 0
    print(caps.summary())
    for key, value in caps.as_dict().items():
        print(f"  {key:<20} {value}")
    print(
        f"plans for a {params.num_frames}-frame {params.width}x{params.height} job "
        f"(boundary casts {'on' if settings.casts else 'off'}):"
    )
    for precision, info in plans.items():
        note = f"  ({info['reason']})" if info["reason"] else ""
        print(f"  {precision:<5} -> {info['plan']}{note}")
    return 0


def _queue_order(name: str) -> tuple[str, str, int]:
    """Sort queues by device, precision, then tier as a number (8g before 12g)."""
    from svdfarm.queues import parse_queue

    try:
        wc = parse_queue(name)
    except ValueError:
        return (name, "", 0)
    return (wc.device, wc.precision, wc.tier_gb)


def _cmd_queues(args: argparse.Namespace, settings: Settings) -> int:
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
        print(f"error: {exc}", file=sys.stderr)
        return 1
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


def _cmd_reap(args: argparse.Namespace, settings: Settings) -> int:
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


def _cmd_admin(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm admin hash-password``: read a password twice, print its hash for the env."""
    import getpass

    from web.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Admin password: ")
        if getpass.getpass("Again: ") != password:
            print("error: the two passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("error: the password must not be empty", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def _cmd_model(args: argparse.Namespace, settings: Settings) -> int:
    """``svdfarm model tiny DIR``: write the built-in tiny model to a folder."""
    from worker.tiny import save_tiny

    path = save_tiny(Path(args.directory))
    print(f"tiny model saved to {path}; use it with SVDFARM_MODEL={path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``svdfarm`` command."""
    parser = argparse.ArgumentParser(prog="svdfarm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="migrate, then run the web and one worker (Ctrl-C stops)")
    web = sub.add_parser("web", help="serve the web app")
    for p in (up, web):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
    web.add_argument("--threads", type=int, default=8)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", "-Q", default="", help="comma-separated queues")
    worker.add_argument("--concurrency", "-c", type=int, default=1)
    worker.add_argument("--loglevel", "-l", default="INFO")
    worker.add_argument("--hostname", "-n", default="")
    worker.add_argument("--gpus", default="", help="'all' or 0,1,...: one worker per GPU")

    db = sub.add_parser("db", help="database migrations")
    db.add_argument("action", choices=["upgrade", "downgrade"])
    db.add_argument("revision", nargs="?", default="")

    render = sub.add_parser("render", help="render one image to an MP4 without the queue")
    render.add_argument("image")
    render.add_argument("-o", "--output", required=True, help="the MP4 to write")
    render.add_argument("--poster", default="", help="also write a poster PNG here")
    render.add_argument("--frames", type=int, default=None)
    render.add_argument("--steps", type=int, default=None)
    render.add_argument("--width", type=int, default=None)
    render.add_argument("--height", type=int, default=None)
    render.add_argument("--fps", type=int, default=None)
    render.add_argument("--seed", type=int, default=None)
    render.add_argument("--motion-bucket-id", type=int, default=None)
    render.add_argument("--noise-aug-strength", type=float, default=None)
    render.add_argument("--decode-chunk-size", type=int, default=None)
    render.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    render.add_argument("--model", default="", help="override SVDFARM_MODEL")
    render.add_argument(
        "--dtypes",
        default="",
        help="per-component dtypes, e.g. image_encoder=bf16,unet=fp32,vae=bf16",
    )
    render.add_argument("--no-casts", action="store_true", help="turn the boundary casts off")
    render.add_argument("--json", action="store_true", help="print the attempts as JSON")

    admin = sub.add_parser("admin", help="admin pages: make the password hash")
    admin.add_argument("action", choices=["hash-password"])

    queues = sub.add_parser("queues", help="queue depths and the live workers on each queue")
    queues.add_argument("--all", action="store_true", help="also queues with nothing on them")
    queues.add_argument("--json", action="store_true", help="print them as JSON")

    reap = sub.add_parser(
        "reap", help="requeue jobs of lost workers and publish queued jobs the broker lost"
    )
    reap.add_argument("--json", action="store_true", help="print what was done as JSON")

    caps = sub.add_parser("caps", help="this machine's capabilities and the plans it would pick")
    caps.add_argument("--json", action="store_true", help="print them as JSON")

    model = sub.add_parser("model", help="write a built-in model to disk")
    model.add_argument("name", choices=["tiny"])
    model.add_argument("directory")
    return parser


COMMANDS = {
    "up": _cmd_up,
    "web": _cmd_web,
    "worker": _cmd_worker,
    "db": _cmd_db,
    "render": _cmd_render,
    "model": _cmd_model,
    "caps": _cmd_caps,
    "queues": _cmd_queues,
    "reap": _cmd_reap,
    "admin": _cmd_admin,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``svdfarm`` command."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args, settings)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
