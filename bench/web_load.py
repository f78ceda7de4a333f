"""Web: requests per second and latency of a job's status (API and page) and of a submit at
64 concurrent clients, the web served as deployed (``svdfarm web``: gunicorn), each figure
beside its target and beside the limit: a bare Flask endpoint doing one primary-key SELECT on
the same database, served the same way (:mod:`bench.bare_web`).

    .venv/bin/python -m bench.web_load [--concurrency 64 --duration 10] [--write]

The load comes from ``wrk`` when it is on PATH (C, one thread: it takes almost no CPU; the
script ``bench/load_runs.lua`` counts the answers that are not 2xx and prints the run as JSON),
else from :mod:`bench.loadgen` (asyncio), in a separate process on loopback.

PostgreSQL and Redis, no worker: the submits pile up in the queue (the submit rate limit and
the queue cap are off), and the status asked for is a queued job's, which also reads the
worker registry to say why the job waits. Each request gets a short warm-up run first.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bare_web import BARE_PATH
from bench.common import (
    BENCHMARKS_MD,
    ROOT,
    Farm,
    JobParams,
    child_pids,
    fmt_mb,
    fmt_ms,
    free_port,
    markdown_table,
    multipart,
    peak_rss_bytes,
    png_bytes,
    scratch_broker,
    scratch_database,
    section,
    submit,
    write_section,
)
from bench.load_runs import Run, costed, database_cpu_s, load, server_cpu_s
from cli.serve import stop_children

BARE = "bare: one SELECT by primary key"
STATUS = "GET /api/v1/jobs/<id>"
PAGE = "GET /jobs/<id>"
SUBMIT = "POST /api/v1/jobs"
#: The status endpoint's rate as a fraction of the bare endpoint's that we aim for.
RATIO_TARGET = 0.8


@dataclass(frozen=True)
class Target:
    """What a request must reach: a rate, and a p99 latency when one is set; no errors."""

    rps: float
    p99_s: float | None = None

    def met(self, run: Run) -> bool:
        """True when ``run`` reaches the target."""
        fast = self.p99_s is None or run.p99_s <= self.p99_s
        return run.errors == 0 and run.rps >= self.rps and fast

    def describe(self) -> str:
        """The target as the table shows it: ">= 1,000 req/s, p99 <= 150 ms"."""
        text = f">= {self.rps:,.0f} req/s"
        if self.p99_s is not None:
            text += f", p99 <= {self.p99_s * 1000:.0f} ms"
        return text


#: Issue 14's targets on 2 cores, 64 connections, PostgreSQL + Redis, 0 errors.
TARGETS = {STATUS: Target(1000, 0.150), PAGE: Target(600), SUBMIT: Target(300)}


def bare_ratio(runs: dict[str, Run]) -> float | None:
    """The status endpoint's rate as a fraction of the bare endpoint's (None without both)."""
    if STATUS not in runs or BARE not in runs or runs[BARE].rps <= 0:
        return None
    return runs[STATUS].rps / runs[BARE].rps


@contextmanager
def bare_web(farm: Farm, threads: int) -> Iterator[tuple[str, int]]:
    """Serve :mod:`bench.bare_web` with the farm's environment while the block runs; yields
    its base URL and its pid."""
    port = free_port()
    command = [sys.executable, "-m", "bench.bare_web", f"--port={port}", f"--threads={threads}"]
    log_path = farm.data_dir / "bare-web.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, env=farm.env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the bare web exited early:\n{log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
            except urllib.error.HTTPError:
                break  # a 404 from Flask: it serves
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the bare web did not start in 60 s") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        stop_children([process], 30)


def web_targets(
    farm: Farm, bare_base: str, params: JobParams, image: bytes, work: Path
) -> dict[str, tuple[str, Path | None, str]]:
    """What the web benchmark loads, by name, each as (URL, file holding the POST body or
    None, its content type): the bare endpoint, a queued job's status (API and page), a
    submit. Submits one job."""
    job_id = submit(farm.base, params, image)
    body, content_type = multipart(params.fields(), image)
    body_path = work / "submit.body"
    body_path.write_bytes(body)
    return {
        BARE: (f"{bare_base}{BARE_PATH}{job_id}", None, ""),
        STATUS: (f"{farm.base}/api/v1/jobs/{job_id}", None, ""),
        PAGE: (f"{farm.base}/jobs/{job_id}", None, ""),
        SUBMIT: (f"{farm.base}/api/v1/jobs", body_path, content_type),
    }


def fmt_cpu(seconds: float | None) -> str:
    """CPU per answer in milliseconds with two decimals; "?" when not measured."""
    return "?" if seconds is None else f"{seconds * 1000:.2f} ms"


def describe_run(name: str, run: Run, ratio_to: Run | None) -> str:
    """One run as printed while the benchmark goes: the figures beside their target."""
    text = (
        f"{name}: {run.rps:,.0f} req/s, p50 {fmt_ms(run.p50_s)}, p99 {fmt_ms(run.p99_s)}, "
        f"{run.errors} errors of {run.requests}; CPU per answer: server "
        f"{fmt_cpu(run.server_cpu_s)}, PostgreSQL {fmt_cpu(run.database_cpu_s)}"
    )
    if name in TARGETS:
        met = "met" if TARGETS[name].met(run) else "NOT met"
        text += f" (target {TARGETS[name].describe()}, 0 errors: {met})"
    if ratio_to is not None and ratio_to.rps > 0 and name != BARE:
        text += f"; {run.rps / ratio_to.rps:.2f} of bare"
    return text


def table_rows(runs: dict[str, Run], concurrency: int) -> list[list[Any]]:
    """The table's rows: each run with its target, whether it is met, its fraction of bare."""
    bare = runs.get(BARE)
    rows = []
    for name, run in runs.items():
        target = TARGETS.get(name)
        rows.append(
            [
                name,
                concurrency,
                run.requests,
                run.errors,
                f"{run.rps:.0f}",
                fmt_ms(run.p50_s),
                fmt_ms(run.p99_s),
                fmt_ms(run.max_s),
                fmt_cpu(run.server_cpu_s),
                fmt_cpu(run.database_cpu_s),
                target.describe() if target else "(the limit)",
                ("yes" if target.met(run) else "no") if target else "",
                f"{run.rps / bare.rps:.2f}" if bare and bare.rps > 0 else "",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Load each request, print the table; optionally write it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each")
    parser.add_argument(
        "--tool",
        choices=["auto", "wrk", "loadgen"],
        default="auto",
        help="the load generator (auto: wrk when on PATH, else bench.loadgen)",
    )
    parser.add_argument(
        "--web-server", choices=["gunicorn", "waitress"], default="", help="svdfarm web --server"
    )
    parser.add_argument(
        "--web-threads", type=int, default=0, help="threads per web process (0: its default)"
    )
    parser.add_argument("--only", default="", help="comma-separated requests to load (names)")
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the file --write updates")
    args = parser.parse_args(argv)
    tool = args.tool if args.tool != "auto" else ("wrk" if shutil.which("wrk") else "loadgen")
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    params = JobParams()
    image = png_bytes(params.size, params.size)
    data_dir = Path(tempfile.mkdtemp(prefix="svdfarm-bench-"))
    runs: dict[str, Run] = {}
    try:
        with (
            scratch_database("postgresql", data_dir) as database_url,
            scratch_broker("redis") as broker_url,
            Farm(
                database_url,
                broker_url,
                data_dir / "farm",
                worker=False,
                web_server=args.web_server,
                web_threads=args.web_threads,
            ) as farm,
            bare_web(farm, args.web_threads) as (bare_base, bare_pid),
        ):
            targets = web_targets(farm, bare_base, params, image, data_dir)
            web_pid = farm.processes["web"].pid
            body_bytes = (data_dir / "submit.body").stat().st_size
            for name, (url, body_file, kind) in targets.items():
                if only and name not in only:
                    continue
                server_pid = bare_pid if name == BARE else web_pid
                for seconds in (args.warmup, args.duration):
                    server = server_cpu_s(server_pid)
                    database = database_cpu_s(database_url)
                    run = load(
                        url,
                        concurrency=args.concurrency,
                        duration_s=seconds,
                        body=body_file,
                        content_type=kind,
                        tool=tool,
                    )
                    runs[name] = costed(
                        run,
                        (server, server_cpu_s(server_pid)),
                        (database, database_cpu_s(database_url)),
                    )
                print(describe_run(name, runs[name], runs.get(BARE)), flush=True)
            # gunicorn's workers serve; its master only watches them.
            web_rss = sum(peak_rss_bytes(pid) or 0 for pid in [web_pid, *child_pids(web_pid)])
            shape = re.search(r"\((\w+, \d+ process.*)\)$", farm.log("web"), re.M)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    table = markdown_table(
        [
            "request",
            "clients",
            "requests",
            "errors",
            "req/s",
            "p50",
            "p99",
            "max",
            "server CPU/req",
            "PostgreSQL CPU/req",
            "target",
            "met",
            "of bare",
        ],
        table_rows(runs, args.concurrency),
    )
    ratio = bare_ratio(runs)
    ratio_text = (
        f"The status endpoint answers at {ratio:.2f} of the bare endpoint's rate (aim: "
        f">= {RATIO_TARGET:g})."
        if ratio is not None
        else ""
    )
    load_text = (
        "wrk (one thread" if tool == "wrk" else "bench.loadgen (asyncio"
    ) + ", a separate process on loopback)"
    notes = (
        f"`svdfarm web` ({shape.group(1) if shape else '?'}) on PostgreSQL and Redis, no "
        f"worker; {args.concurrency} keep-alive clients from {load_text}, "
        f"{max(1, round(args.duration)) if tool == 'wrk' else args.duration:g} s per request "
        f"after a warm-up. {ratio_text} The bare endpoint (`bench/bare_web.py`) is Flask "
        "reading one job by primary key and answering its state as JSON, served by the same "
        "gunicorn settings, processes and threads on the same database: what this machine "
        f"allows. A submit is a {body_bytes}-byte multipart POST ({params.describe()}, a "
        f"{params.size} x {params.size} PNG): validated, inserted, its input stored, enqueued "
        "on Redis; the per-client submit rate and the queue cap are off "
        "(`SVDFARM_SUBMIT_RATE=0`, `SVDFARM_MAX_QUEUED=0`), since every client here comes from "
        "one address. The status is a queued job's, which also reads the worker registry to "
        "say why the job waits; the page is the same job's status page. Errors: answers that "
        "are not 2xx and socket errors. CPU per request: the CPU time the server's processes "
        "(gunicorn's master and workers), and the database's backends, used during the run, "
        "divided by the answers: what a request costs, less swayed than the rates by whatever "
        "else the machine runs. Peak RSS of the web's processes, summed, after the "
        f"runs: {fmt_mb(web_rss)}. The machine has {len(os.sched_getaffinity(0))} "
        "cores shared by the servers, the load generator, PostgreSQL and Redis."
    )
    print(table, notes, sep="\n\n")
    if args.write:
        write_section("web", section("3. Web", table, notes), args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
