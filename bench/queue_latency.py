"""Queue latency: from submit (``jobs.created_at``) to the attempt's start
(``attempts.started_at``) with an idle worker, over many jobs, on Redis, RabbitMQ and the
embedded broker.

    .venv/bin/python -m bench.queue_latency [--jobs 200] [--setups redis,rabbitmq] [--write]

Each job is submitted over HTTP once the previous one has finished and the worker has been
idle for ``--idle`` seconds, so every job meets an idle worker. The jobs are the cheapest the
tiny model makes (2 frames, 1 step) to keep the run short; what is timed ends before the
render starts. Redis and RabbitMQ (``SVDFARM_BENCH_AMQP_URL``, a virtual host of the run's
own) run with PostgreSQL, the embedded broker with SQLite, as each is deployed. Target on Redis
and RabbitMQ: p50 <= 20 ms, p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    BENCHMARKS_MD,
    Farm,
    JobParams,
    check_succeeded,
    fmt_ms,
    markdown_table,
    percentile,
    png_bytes,
    scratch_broker,
    scratch_database,
    section,
    setup_name,
    submit,
    wait_jobs,
    write_section,
)

TARGET_P50_S = 0.020
TARGET_P99_S = 0.100
SETUPS = {
    "redis": ("postgresql", "redis"),
    "rabbitmq": ("postgresql", "rabbitmq"),
    "embedded": ("sqlite", "embedded"),
}
#: The setups the latency target applies to (the production brokers).
TARGETED = ("redis", "rabbitmq")


def measure(setup: str, jobs: int, idle_s: float, params: JobParams) -> dict[str, list[float]]:
    """Run ``jobs`` jobs one at a time on a fresh farm; returns, per job, submit -> claim,
    submit -> attempt start, and the HTTP submit's own round trip."""
    database, broker = SETUPS[setup]
    image = png_bytes(params.size, params.size)
    data_dir = Path(tempfile.mkdtemp(prefix="svdfarm-bench-"))
    found: dict[str, list[float]] = {"claim": [], "attempt": [], "http": []}
    try:
        with (
            scratch_database(database, data_dir) as database_url,
            scratch_broker(broker) as broker_url,
            Farm(database_url, broker_url, data_dir / "farm") as farm,
        ):
            engine = farm.engine()
            try:
                # The first job pays the worker's imports and model load.
                check_succeeded(
                    wait_jobs(engine, [submit(farm.base, params, image)], 300), farm.data_dir
                )
                for number in range(jobs):
                    time.sleep(idle_s)
                    sent = time.perf_counter()
                    job_id = submit(farm.base, params, image)
                    found["http"].append(time.perf_counter() - sent)
                    (record,) = wait_jobs(engine, [job_id], 120, poll_s=0.02)
                    check_succeeded([record], farm.data_dir)
                    assert record.started_at and record.attempt_started_at
                    found["claim"].append((record.started_at - record.created_at).total_seconds())
                    found["attempt"].append(
                        (record.attempt_started_at - record.created_at).total_seconds()
                    )
                    if (number + 1) % 50 == 0:
                        print(
                            f"{setup}: {number + 1} jobs, p50 so far "
                            f"{fmt_ms(statistics.median(found['attempt']))}",
                            flush=True,
                        )
            finally:
                engine.dispose()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on each setup, print the table and each setup's figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument(
        "--setups", default="redis,rabbitmq,embedded", help="any of redis, rabbitmq, embedded"
    )
    parser.add_argument("--idle", type=float, default=0.1, help="seconds the worker idles")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the file --write updates")
    args = parser.parse_args(argv)
    setups = [s for s in args.setups.split(",") if s]
    unknown = set(setups) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setup(s): {', '.join(sorted(unknown))}")
    params = JobParams(frames=args.frames, steps=args.steps, decode_chunk_size=args.frames)
    rows = []
    results = {}
    for setup in setups:
        found = measure(setup, args.jobs, args.idle, params)
        results[setup] = found
        latency = found["attempt"]
        on_target = ""
        if setup in TARGETED:
            ok = percentile(latency, 50) <= TARGET_P50_S and percentile(latency, 99) <= TARGET_P99_S
            on_target = "met" if ok else "**missed**"
        rows.append(
            [
                setup_name(*SETUPS[setup]),
                len(latency),
                fmt_ms(percentile(latency, 50)),
                fmt_ms(percentile(latency, 90)),
                fmt_ms(percentile(latency, 99)),
                fmt_ms(max(latency)),
                fmt_ms(percentile(found["claim"], 50)),
                fmt_ms(percentile(found["http"], 50)),
                on_target or "-",
            ]
        )
    table = markdown_table(
        [
            "setup",
            "jobs",
            "p50",
            "p90",
            "p99",
            "max",
            "p50 submit -> claimed",
            "p50 HTTP submit round trip",
            "target (Redis, RabbitMQ: p50 <= 20 ms, p99 <= 100 ms)",
        ],
        rows,
    )
    notes = (
        "Submit to attempt start is `attempts.started_at - jobs.created_at` (both written in "
        "UTC by the farm: the web sets `created_at` when it inserts the job, before it stores "
        "the input, commits and enqueues; the worker inserts the attempt once it has claimed "
        "the job and picked its plan). `submit -> claimed` ends at `jobs.started_at`, the "
        f"claim. Each job meets an idle worker ({args.idle:g} s after the previous job "
        f"finished); jobs of {params.describe()}, one warm-up job first."
    )
    print(table, notes, sep="\n\n")
    if args.write:
        write_section("queue-latency", section("2. Queue latency", table, notes), args.doc)
    for setup, found in results.items():
        print(
            f"{setup} submit -> attempt start: p50 {fmt_ms(percentile(found['attempt'], 50))}, "
            f"p99 {fmt_ms(percentile(found['attempt'], 99))}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
