"""Web: requests per second and latency of GET job status and POST submit at 64 concurrent
clients, the web served as deployed (``svdfarm web``: gunicorn), the load from a separate
process on loopback (:mod:`bench.loadgen`).

    .venv/bin/python -m bench.web_load [--concurrency 64 --duration 10] [--write]

PostgreSQL and Redis, no worker: the submits pile up in the queue (the submit rate limit and
the queue cap are off), and the status asked for is a queued job's, which also reads the
worker registry to say why the job waits. Each endpoint gets a short warm-up run first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    BENCHMARKS_MD,
    Farm,
    JobParams,
    child_pids,
    fmt_mb,
    fmt_ms,
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


def load(
    url: str, concurrency: int, duration_s: float, body: Path | None = None, content_type: str = ""
) -> dict[str, Any]:
    """Run :mod:`bench.loadgen` against ``url`` in its own process; returns its result."""
    command = [
        sys.executable,
        "-m",
        "bench.loadgen",
        url,
        f"--concurrency={concurrency}",
        f"--duration={duration_s}",
    ]
    if body is not None:
        command += ["--method=POST", f"--body-file={body}", f"--content-type={content_type}"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def web_targets(
    farm: Farm, params: JobParams, image: bytes, work: Path
) -> dict[str, tuple[str, Path | None, str]]:
    """What the web benchmarks load: a queued job's status and a submit, by name, each as
    (URL, file holding the POST body or None, its content type). Submits one job."""
    job_id = submit(farm.base, params, image)
    body, content_type = multipart(params.fields(), image)
    body_path = work / "submit.body"
    body_path.write_bytes(body)
    return {
        "GET /api/v1/jobs/<id>": (f"{farm.base}/api/v1/jobs/{job_id}", None, ""),
        "POST /api/v1/jobs": (f"{farm.base}/api/v1/jobs", body_path, content_type),
    }


def main(argv: list[str] | None = None) -> int:
    """Load each endpoint, print the table; optionally write it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per endpoint")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each")
    parser.add_argument(
        "--web-server", choices=["gunicorn", "waitress"], default="", help="svdfarm web --server"
    )
    parser.add_argument(
        "--web-threads", type=int, default=0, help="threads per web process (0: its default)"
    )
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the file --write updates")
    args = parser.parse_args(argv)
    params = JobParams()
    image = png_bytes(params.size, params.size)
    data_dir = Path(tempfile.mkdtemp(prefix="svdfarm-bench-"))
    results: dict[str, dict[str, Any]] = {}
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
        ):
            targets = web_targets(farm, params, image, data_dir)
            body_bytes = (data_dir / "submit.body").stat().st_size
            for name, (url, body_file, kind) in targets.items():
                load(url, args.concurrency, args.warmup, body_file, kind)
                results[name] = load(url, args.concurrency, args.duration, body_file, kind)
                print(f"{name}: {json.dumps(results[name])}", flush=True)
            web_pid = farm.processes["web"].pid
            # gunicorn's workers serve; its master only watches them.
            web_rss = sum(peak_rss_bytes(pid) or 0 for pid in [web_pid, *child_pids(web_pid)])
            shape = re.search(r"\((\w+, \d+ process.*)\)$", farm.log("web"), re.M)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    rows = [
        [
            name,
            args.concurrency,
            r["requests"],
            r["requests"] - r["ok"],
            f"{r['rps']:.0f}",
            fmt_ms(r["p50_s"]),
            fmt_ms(r["p99_s"]),
            fmt_ms(r["max_s"]),
        ]
        for name, r in results.items()
    ]
    table = markdown_table(
        ["request", "clients", "requests", "errors", "req/s", "p50", "p99", "max"], rows
    )
    notes = (
        f"`svdfarm web` ({shape.group(1) if shape else '?'}) on PostgreSQL and Redis, no "
        f"worker; {args.concurrency} keep-alive clients on asyncio in a separate process on "
        f"loopback, {args.duration:g} s per request after a {args.warmup:g} s warm-up. A "
        f"submit is a {body_bytes}-byte multipart POST ({params.describe()}, a "
        f"{params.size} x {params.size} PNG): validated, inserted, its input stored, enqueued "
        "on Redis; the per-client submit rate and the queue cap are off "
        "(`SVDFARM_SUBMIT_RATE=0`, `SVDFARM_MAX_QUEUED=0`), since every client here comes from "
        "one address. The status is a queued job's, which also reads the worker registry to "
        f"say why the job waits. Peak RSS of the web's processes, summed, after both "
        f"runs: {fmt_mb(web_rss)}. The machine has {len(os.sched_getaffinity(0))} "
        "cores shared by the server, the load generator, PostgreSQL and Redis."
    )
    print(table, notes, sep="\n\n")
    if args.write:
        write_section("web", section("3. Web", table, notes), args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
