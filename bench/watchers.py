"""Live watchers: 1,000 server-sent event streams of running jobs held open against
``svdfarm web``; how fast each progress step reaches every one of them, and what the web
spends doing it.

    .venv/bin/python -m bench.watchers [--watchers 1000 --jobs 10 --rounds 20] [--write]

A scratch PostgreSQL database and Redis; ``svdfarm web`` as deployed (gunicorn, gevent
workers, one process per core, open mode), no worker: ``--jobs`` jobs of the key-less API
owner ``addr:127.0.0.1`` are submitted, claimed and moved to denoising here, with
:mod:`svdfarm.lifecycle` as a worker does. The watchers are :mod:`bench.watch_client`, a
separate process on loopback: ``--watchers`` streams of ``GET /api/v1/jobs/<id>/events``
spread evenly over the jobs, opened in batches. Once all are connected the web's CPU is
measured for ``--idle`` seconds with nothing happening; then, ``--rounds`` times,
``--interval`` seconds apart, every job gets its next denoising step written (one transaction
each, the time taken after its commit), and the time each watcher received that step's
``progress`` message is compared with it.

Targets (issue 18, on 2 cores): every step delivered to every watcher, p99 <= 1 s, the web's
CPU (gunicorn's master and workers) below one core while it delivers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from bench.common import (
    BENCHMARKS_MD,
    ROOT,
    Farm,
    JobParams,
    fmt_mb,
    fmt_ms,
    markdown_table,
    percentile,
    png_bytes,
    scratch_broker,
    scratch_database,
    section,
    write_section,
)
from bench.load_runs import database_cpu_s
from cli.serve import stop_children
from svdfarm.db import Database
from svdfarm.lifecycle import By, claim, progress
from svdfarm.states import Actor, Phase

#: The owner key-less API clients from 127.0.0.1 are in open mode (web.owners).
OWNER = "addr:127.0.0.1"
#: Issue 18's targets on 2 cores.
TARGET_P99_S = 1.0
TARGET_CPU_CORES = 1.0
#: The worker the benchmark writes progress as.
WORKER = By(Actor.WORKER, "bench-watchers@localhost")
#: Seconds after the last round the watchers get to receive it before they report.
SETTLE_S = 3.0


@dataclass(frozen=True)
class Figures:
    """What one run measured."""

    watchers: int
    connected: int
    failed: int
    expected: int
    received: int
    latencies_s: list[float]
    #: CPU as cores (CPU seconds over wall seconds) while delivering and while idle.
    web_cores: float
    web_idle_cores: float
    database_cores: float | None
    client_cores: float
    web_rss: int
    web_processes: int

    @property
    def p99_s(self) -> float:
        """The 99th percentile of the delivery latencies (infinite without any)."""
        return percentile(self.latencies_s, 99) if self.latencies_s else float("inf")

    def met(self) -> bool:
        """True when every watcher connected and got every step, p99 and CPU on target."""
        everything = self.connected == self.watchers and self.received == self.expected
        fast = self.p99_s <= TARGET_P99_S
        return everything and self.failed == 0 and fast and self.web_cores < TARGET_CPU_CORES


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants (gunicorn's master and its workers)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process and its live descendants have used."""
    total = 0.0
    for process in process_tree(pid):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def tree_rss(pid: int) -> tuple[int, int]:
    """The summed resident set size of a process and its descendants, and their count."""
    processes = process_tree(pid)
    return sum(p.memory_info().rss for p in processes), len(processes)


def make_running_jobs(farm: Farm, count: int, steps: int) -> list[uuid.UUID]:
    """``count`` jobs of :data:`OWNER`, submitted, claimed and denoising at step 0 (as a
    worker leaves them), written with :mod:`svdfarm.lifecycle`."""
    from svdfarm.celery_app import create_celery
    from svdfarm.jobs import submit_job, validate_submission
    from svdfarm.settings import load_settings

    settings = load_settings(farm.env())
    db = Database(settings.database_url)
    params = JobParams(steps=steps)
    submission = validate_submission(
        settings, params.fields(), png_bytes(params.size, params.size), "in.png"
    )
    celery = create_celery(settings)
    ids = []
    try:
        for _ in range(count):
            with db.session() as session:
                job = submit_job(
                    session, celery, settings, submission, by=By(Actor.API), owner=OWNER
                )
                ids.append(job.id)
        for job_id in ids:
            with db.begin() as session:
                found = claim(session, settings, job_id, by=WORKER)
                if not found.token:
                    raise RuntimeError(f"job {job_id} could not be claimed: {found.outcome}")
            with db.begin() as session:
                progress(session, job_id, by=WORKER, phase=Phase.DENOISING, fraction=0.0, step=0)
    finally:
        db.dispose()
    return ids


def read_line(stream: IO[bytes], key: str, timeout_s: float) -> Any:
    """The value of the next ``{key: ...}`` JSON line on ``stream``, within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stream], [], [], left)[0]:
            raise TimeoutError(f"the watchers said nothing ({key}) in {timeout_s:g} s")
        line = stream.readline()
        if not line:
            raise RuntimeError(f"the watchers ended before saying {key!r}")
        found = json.loads(line)
        if key in found:
            return found[key]


def write_rounds(
    database_url: str, jobs: Sequence[uuid.UUID], *, rounds: int, interval_s: float, steps: int
) -> dict[tuple[str, int], float]:
    """Every ``interval_s`` seconds, write each job's next step (one commit each); the time
    after each commit, by (job, step)."""
    db = Database(database_url)
    committed: dict[tuple[str, int], float] = {}
    start = time.monotonic()
    try:
        for step in range(1, rounds + 1):
            time.sleep(max(0.0, start + (step - 1) * interval_s - time.monotonic()))
            for job_id in jobs:
                with db.begin() as session:
                    progress(
                        session,
                        job_id,
                        by=WORKER,
                        phase=Phase.DENOISING,
                        fraction=min(1.0, step / steps),
                        step=step,
                    )
                committed[(str(job_id), step)] = time.time()
        time.sleep(max(0.0, start + rounds * interval_s - time.monotonic()))
    finally:
        db.dispose()
    return committed


def deliveries(
    received: dict[str, dict[str, list[float]]],
    committed: dict[tuple[str, int], float],
) -> tuple[int, list[float]]:
    """How many of the written steps arrived at a watcher, and each arrival's latency."""
    latencies = []
    for job, steps in received.items():
        for step, times in steps.items():
            written = committed.get((job, int(step)))
            if written is not None:
                latencies += [t - written for t in times]
    return len(latencies), latencies


@dataclass
class CpuMeter:
    """CPU of the web's processes, this database's backends and the watchers' process since
    :meth:`start`, each as cores (CPU seconds over wall seconds)."""

    web_pid: int
    client_pid: int
    database_url: str
    since: tuple[float, float, float | None, float] = (0.0, 0.0, None, 0.0)

    def read(self) -> tuple[float, float, float | None, float]:
        """Now: the monotonic clock, then the CPU seconds of the web, database, watchers."""
        return (
            time.monotonic(),
            tree_cpu_s(self.web_pid),
            database_cpu_s(self.database_url),
            tree_cpu_s(self.client_pid),
        )

    def start(self) -> None:
        """Start a window."""
        self.since = self.read()

    def cores(self) -> tuple[float, float | None, float]:
        """The web's, the database's (None when unknown) and the watchers' cores so far."""
        now = self.read()
        wall = now[0] - self.since[0]
        before_db, after_db = self.since[2], now[2]
        database = None if before_db is None or after_db is None else (after_db - before_db)
        return (
            (now[1] - self.since[1]) / wall,
            None if database is None else database / wall,
            max(0.0, now[3] - self.since[3]) / wall,
        )


def start_watchers(farm: Farm, jobs: Sequence[uuid.UUID], args: argparse.Namespace) -> Any:
    """Start :mod:`bench.watch_client` on ``jobs`` (its stderr in the farm's folder)."""
    with open(farm.data_dir / "watchers.log", "ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.watch_client",
                f"--base={farm.base}",
                f"--jobs={','.join(map(str, jobs))}",
                f"--watchers={args.watchers}",
                f"--batch={args.batch}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
        )


def measure(farm: Farm, args: argparse.Namespace) -> Figures:
    """Run the watchers against a started farm; the figures."""
    steps = min(200, max(args.rounds, 1))
    jobs = make_running_jobs(farm, args.jobs, steps)
    print(f"{len(jobs)} jobs running", flush=True)
    web_pid = farm.processes["web"].pid
    client = start_watchers(farm, jobs, args)
    meter = CpuMeter(web_pid, client.pid, farm.database_url)
    try:
        ready = read_line(client.stdout, "ready", 300)
        print(f"watchers connected: {ready['connected']} of {args.watchers}", flush=True)
        if ready["failed"]:
            print(f"watchers failed: {ready['failed']}: {ready['errors'][:3]}", flush=True)
        meter.start()
        time.sleep(args.idle)
        idle_cores = meter.cores()[0]
        meter.start()
        committed = write_rounds(
            farm.database_url, jobs, rounds=args.rounds, interval_s=args.interval, steps=steps
        )
        web_cores, database_cores, client_cores = meter.cores()
        rss, processes = tree_rss(web_pid)
        time.sleep(SETTLE_S)
        client.stdin.close()
        result = read_line(client.stdout, "result", 60)
        client.wait(30)
    finally:
        stop_children([client], 10)
    received, latencies = deliveries(result["received"], committed)
    return Figures(
        watchers=args.watchers,
        connected=result["connected"],
        failed=result["failed"],
        expected=args.rounds * args.watchers,
        received=received,
        latencies_s=latencies,
        web_cores=web_cores,
        web_idle_cores=idle_cores,
        database_cores=database_cores,
        client_cores=client_cores,
        web_rss=rss,
        web_processes=processes,
    )


def table(figures: Figures) -> str:
    """The section's table: each figure beside its target, and whether it is met."""
    f, lat = figures, figures.latencies_s

    def ms(q: float) -> str:
        """The ``q``-th percentile of the latencies in milliseconds, or a dash."""
        return fmt_ms(percentile(lat, q)) if lat else "-"

    database = "?" if f.database_cores is None else f"{f.database_cores:.2f} cores"
    rows: list[tuple[str, str, str, bool | None]] = [
        ("watchers connected", f"{f.connected:,} of {f.watchers:,} ({f.failed} failed)", "all",
         f.connected == f.watchers and f.failed == 0),
        ("steps delivered", f"{f.received:,} of {f.expected:,}", "all", f.received == f.expected),
        ("latency, commit -> received: p50", ms(50), "", None),
        ("latency: p99", ms(99), f"<= {TARGET_P99_S * 1000:.0f} ms", f.p99_s <= TARGET_P99_S),
        ("latency: max", ms(100), "", None),
        ("web CPU while delivering", f"{f.web_cores:.2f} cores", f"< {TARGET_CPU_CORES:g} core",
         f.web_cores < TARGET_CPU_CORES),
        ("web CPU, watchers idle", f"{f.web_idle_cores:.3f} cores", "", None),
        ("PostgreSQL CPU while delivering (this database's backends)", database, "", None),
        ("the watchers' process CPU while delivering", f"{f.client_cores:.2f} cores", "", None),
        (f"web RSS ({f.web_processes} processes, summed)", fmt_mb(f.web_rss), "", None),
    ]  # fmt: skip
    met = {True: "yes", False: "**no**", None: ""}
    return markdown_table(
        ["figure", "measured", "target", "met"], [[*row[:3], met[row[3]]] for row in rows]
    )


def notes(figures: Figures, args: argparse.Namespace, shape: str, load: float) -> str:
    """The section's notes: the setup, how each figure is taken, the machine's load."""
    per_job = args.watchers // max(1, args.jobs)
    broker = "Redis" if args.broker == "redis" else "the embedded broker"
    text = (
        f"`svdfarm web` ({shape}) on PostgreSQL and {broker}, open mode, no worker. "
        f"{args.jobs} running jobs of the key-less API owner `{OWNER}`, submitted, claimed "
        "and moved to denoising with `svdfarm.lifecycle` as a worker does; "
        f"{args.watchers:,} watchers (about {per_job} per job) hold `GET /api/v1/jobs/<id>/"
        "events` (`Accept: text/event-stream`) open from `bench/watch_client.py`, one "
        "asyncio process on loopback, connected in batches of "
        f"{args.batch}. Then {args.rounds} rounds, {args.interval:g} s apart: each job's next "
        "denoising step is written with `lifecycle.progress` (one transaction per job, the "
        "time taken after its commit), and each watcher's `progress` message with that step "
        "is timed when its bytes arrive (`time.time()`, the same clock). Latency is "
        "received - committed over every (watcher, step). Web CPU: user and system time of "
        "gunicorn's master and workers over the rounds' window "
        f"({args.rounds} x {args.interval:g} s), as cores; idle: the same over {args.idle:g} s "
        "with every watcher connected and nothing written (keep-alives only). PostgreSQL: "
        "the CPU of this scratch database's backends (the feed's LISTEN connections, the "
        "web's pools, the writer) over the same window. RSS: the web's processes summed "
        f"(shared pages counted in each). The machine has {len(os.sched_getaffinity(0))} "
        "cores shared by the web, the watchers, the writer, PostgreSQL and Redis; load "
        f"average (1 min) at the start: {load:.2f}."
    )
    if args.note:
        text += f" {args.note.strip()}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table; optionally write its section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=10, help="running jobs watched")
    parser.add_argument("--rounds", type=int, default=20, help="steps written per job")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between rounds")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle figure")
    parser.add_argument("--batch", type=int, default=100, help="watchers connected at once")
    parser.add_argument("--web-workers", type=int, default=0, help="0: one per core")
    parser.add_argument(
        "--broker",
        choices=["redis", "embedded"],
        default="redis",
        help="the farm's broker (only the submits use it)",
    )
    parser.add_argument("--note", default="", help="a sentence added to the section's notes")
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the file --write updates")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 200 or args.jobs < 1 or args.watchers < 1:
        parser.error("--rounds must be 1-200, --jobs and --watchers at least 1")
    # The web and the watchers each hold a socket per watcher; children inherit the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.watchers + 1000)), hard))
    load = os.getloadavg()[0]
    extra = {"SVDFARM_AUTH": "open"}
    if args.web_workers:
        extra["SVDFARM_WEB_WORKERS"] = str(args.web_workers)
    data_dir = Path(tempfile.mkdtemp(prefix="svdfarm-bench-"))
    try:
        with (
            scratch_database("postgresql", data_dir) as database_url,
            scratch_broker(args.broker) as broker_url,
            Farm(
                database_url, broker_url, data_dir / "farm", worker=False, extra_env=extra
            ) as farm,
        ):
            print(f"svdfarm web up: {farm.base}", flush=True)
            figures = measure(farm, args)
            found = [line for line in farm.log("web").splitlines() if "svdfarm web on" in line]
            shape = found[0].rsplit("(", 1)[-1].rstrip(")") if found else "?"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    body = table(figures)
    text = notes(figures, args, shape, load)
    print(body, text, sep="\n\n")
    print(f"steps delivered: {figures.received} of {figures.expected}")
    print(f"latency p99: {figures.p99_s:.3f} s; web CPU: {figures.web_cores:.2f} cores")
    print(f"targets met: {'yes' if figures.met() else 'no'}")
    if args.write:
        write_section("watchers", section("Live watchers", body, text), args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
