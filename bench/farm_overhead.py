"""Farm overhead: N tiny jobs through the whole farm (HTTP submit, broker, worker, database,
MP4 stored) against the same N renders in a bare loop (one process calling the diffusers
pipeline and writing the MP4 the way the worker does), side by side in one run.

    .venv/bin/python -m bench.farm_overhead [--jobs 20 --rounds 4] [--write]

Both sides are warm (one job each before timing) and use the same parameters, seed and torch
thread count. The jobs run in rounds that alternate bare-farm, farm-bare, ... so drift in the
machine's load falls on both sides alike. A farm round is timed from just before its first
submit to the last ``jobs.finished_at``; it submits every job of the round at once, so the
worker renders them back to back, as the bare loop does. The last line of the output is
``farm/bare ratio: X`` (farm time over bare time, all rounds together); the target is 1.05.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from bench.common import (
    BENCHMARKS_MD,
    Farm,
    JobParams,
    JobRecord,
    check_succeeded,
    cpu_seconds,
    cpus,
    fmt_mb,
    fmt_ms,
    markdown_table,
    model_cpus,
    peak_rss_bytes,
    pin,
    png_bytes,
    scratch_broker,
    scratch_database,
    section,
    setup_name,
    submit,
    thread_env,
    torch_threads,
    wait_jobs,
    write_section,
)

TARGET = 1.05


class BareLoop:
    """The bare loop's process (:mod:`bench.bare_loop`), warmed up and waiting for commands."""

    def __init__(
        self, model_dir: Path, image: Path, out_dir: Path, params: JobParams, threads: int
    ):
        """Start it and wait until it has rendered its warm-up video."""
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.bare_loop",
                str(model_dir),
                str(image),
                str(out_dir),
                f"--frames={params.frames}",
                f"--steps={params.steps}",
                f"--size={params.size}",
                f"--seed={params.seed}",
                f"--threads={threads}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **thread_env(threads)},
        )
        self.ready = self._line()
        if not self.ready.startswith("ready"):
            raise RuntimeError(f"the bare loop did not start: {self.ready!r}")

    def _line(self) -> str:
        """The next line the process prints."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the bare loop exited ({self.process.wait()})")
        return line.strip()

    def run(self, jobs: int) -> float:
        """Render ``jobs`` videos; returns the seconds they took."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"run {jobs}\n")
        self.process.stdin.flush()
        return float(self._line().split()[1])

    def peak_rss(self) -> int | None:
        """The process's peak RSS so far."""
        return peak_rss_bytes(self.process.pid)

    def close(self) -> None:
        """Ask it to quit and wait."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.process.stdin is not None:
            self.process.stdin.close()


def farm_round(
    farm: Farm, params: JobParams, image: bytes, jobs: int, poll_s: float = 0.5
) -> tuple[float, list[JobRecord]]:
    """Submit ``jobs`` jobs at once and wait for them (reading the database every ``poll_s``
    seconds); returns the round's seconds (first submit to last finish) and the records."""
    engine = farm.engine()
    try:
        started = datetime.now(timezone.utc)
        ids = [submit(farm.base, params, image) for _ in range(jobs)]
        records = wait_jobs(engine, ids, timeout_s=120 + 60 * jobs, poll_s=poll_s)
    finally:
        engine.dispose()
    check_succeeded(records, farm.data_dir)
    finished = max(r.finished_at for r in records if r.finished_at is not None)
    return (finished - started).total_seconds(), records


def breakdown(rounds: list[list[JobRecord]]) -> dict[str, list[float]]:
    """Where a farm job's time goes: the queue (submit to attempt start, for a round's first
    job; the previous job's end to the next attempt's start for the others), the attempt
    (load or re-cast, render, MP4, poster, progress writes), closing the job after it."""
    parts: dict[str, list[float]] = {"queue": [], "between": [], "attempt": [], "close": []}
    for records in rounds:
        ordered = sorted(records, key=lambda r: r.attempt_started_at or r.created_at)
        previous: JobRecord | None = None
        for record in ordered:
            assert record.attempt_started_at and record.finished_at and record.attempt_duration_s
            if previous is None:
                parts["queue"].append(
                    (record.attempt_started_at - record.created_at).total_seconds()
                )
            elif previous.finished_at is not None:
                waited = record.attempt_started_at - previous.finished_at
                parts["between"].append(waited.total_seconds())
            parts["attempt"].append(record.attempt_duration_s)
            attempt_end = record.attempt_started_at.timestamp() + record.attempt_duration_s
            parts["close"].append(record.finished_at.timestamp() - attempt_end)
            previous = record
    return parts


def order_of(number: int) -> tuple[str, str]:
    """Which side runs first in round ``number`` (from 1): bare-farm, farm-bare, farm-bare,
    bare-farm, ... (ABBA), so a steady drift in load costs both sides the same."""
    return ("bare", "farm") if number % 4 in (0, 1) else ("farm", "bare")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its tables and the ratio; optionally write them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="timed jobs on each side")
    parser.add_argument(
        "--rounds", type=int, default=0, help="alternating rounds (default: one per job)"
    )
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--broker", choices=["redis", "embedded"], default="redis")
    parser.add_argument(
        "--threads", type=int, default=torch_threads(), help="torch threads (cores but one)"
    )
    parser.add_argument(
        "--all-cores", action="store_true", help="torch threads: every core (overrides --threads)"
    )
    parser.add_argument(
        "--poll", type=float, default=0.5, help="seconds between reads of the jobs' states"
    )
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the file --write updates")
    args = parser.parse_args(argv)
    if args.all_cores:
        args.threads = cpus()
    rounds = max(1, min(args.rounds or args.jobs, args.jobs))
    sizes = [args.jobs // rounds + (1 if r < args.jobs % rounds else 0) for r in range(rounds)]
    params = JobParams(frames=args.frames, steps=args.steps, size=args.size)
    image = png_bytes(args.size, args.size)

    data_dir = Path(tempfile.mkdtemp(prefix="svdfarm-bench-"))
    image_path = data_dir / "input.png"
    image_path.write_bytes(image)
    rows = []
    wall = {"farm": 0.0, "bare": 0.0}
    cpu = {"farm": 0.0, "bare": 0.0}
    ratios: list[float] = []
    farm_rounds: list[list[JobRecord]] = []
    try:
        with (
            scratch_database(args.database, data_dir) as database_url,
            scratch_broker(args.broker) as broker_url,
            Farm(database_url, broker_url, data_dir / "farm", threads=args.threads) as farm,
        ):
            # Warm the worker: its first job imports torch and loads the model.
            first_s, _ = farm_round(farm, params, image, 1)
            bare = BareLoop(
                farm.data_dir / "models" / "tiny",
                image_path,
                data_dir / "bare",
                params,
                args.threads,
            )
            if args.threads < cpus():
                # Both sides' model on the same cores, the farm's own processes beside them.
                farm.pin()
                pin(bare.process.pid, model_cpus())
            try:
                for number, size in enumerate(sizes, start=1):
                    order = order_of(number)
                    times: dict[str, float] = {}
                    for side in order:
                        if side == "bare":
                            cpu_before = cpu_seconds(bare.process.pid)
                            times["bare"] = bare.run(size)
                            cpu["bare"] += cpu_seconds(bare.process.pid) - cpu_before
                        else:
                            cpu_before = farm.cpu_seconds()
                            times["farm"], records = farm_round(
                                farm, params, image, size, args.poll
                            )
                            cpu["farm"] += farm.cpu_seconds() - cpu_before
                            farm_rounds.append(records)
                    for side in wall:
                        wall[side] += times[side]
                    ratios.append(times["farm"] / times["bare"])
                    rows.append(
                        [
                            number,
                            size,
                            " then ".join(order),
                            f"{times['bare']:.2f} s",
                            f"{times['farm']:.2f} s",
                            f"{ratios[-1]:.3f}",
                        ]
                    )
                    print(f"round {number}: {' | '.join(str(c) for c in rows[-1][1:])}", flush=True)
                rss = farm.peak_rss()
                rss["bare loop"] = bare.peak_rss()
            finally:
                bare.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    ratio = statistics.median(ratios)
    total_ratio = wall["farm"] / wall["bare"]
    cpu_ratio = cpu["farm"] / cpu["bare"] if cpu["bare"] else float("nan")
    summary = markdown_table(
        ["figure", "bare loop", "farm", "farm/bare"],
        [
            ["median of the per-round ratios", "", "", f"**{ratio:.3f}**"],
            [
                f"wall time, all {args.jobs} jobs",
                f"{wall['bare']:.2f} s",
                f"{wall['farm']:.2f} s",
                f"{total_ratio:.3f}",
            ],
            [
                "CPU time, all jobs (web, worker, pool, ffmpeg; not PostgreSQL or Redis)",
                f"{cpu['bare']:.2f} s",
                f"{cpu['farm']:.2f} s",
                f"{cpu_ratio:.3f}",
            ],
            [
                "wall time per job",
                f"{wall['bare'] / args.jobs:.3f} s",
                f"{wall['farm'] / args.jobs:.3f} s",
                "",
            ],
        ],
    )
    parts = breakdown(farm_rounds)
    labels = {
        "queue": "submit -> attempt start",
        "between": "previous job finished -> attempt start",
        "attempt": "attempt: re-cast, render, MP4, poster, progress writes",
        "close": "attempt end -> job finished",
    }
    detail = markdown_table(
        ["farm job, where the time goes", "median", "min", "max"],
        [
            [labels[name], fmt_ms(statistics.median(v)), fmt_ms(min(v)), fmt_ms(max(v))]
            for name, v in parts.items()
            if v
        ],
    )
    rounds_table = markdown_table(
        ["round", "jobs", "order", "bare loop", "farm", "farm/bare"], rows
    )
    setup = setup_name(args.database, args.broker)
    verdict = "at or under" if ratio <= TARGET else "above"
    if args.threads < cpus():
        threads_note = (
            f"torch threads {args.threads} on both sides, pinned to the same "
            f"{len(model_cpus())} of the {cpus()} cores (the bare loop and the worker's pool "
            "process), the web and the worker's main process pinned to the core left (on a "
            "GPU farm the model does not run on the CPU at all)"
        )
    else:
        threads_note = (
            f"torch threads {args.threads} on both sides: every core, so the farm's own "
            "processes (web, worker main process, PostgreSQL, Redis) and anything else on the "
            "machine preempt one of torch's threads whenever they wake, and the whole thread "
            "team waits for it"
        )
    notes = (
        f"{args.jobs} jobs of {params.describe()} (tiny model, seed {params.seed}, "
        f"{threads_note}) on {setup}, the web served by waitress "
        f"(`svdfarm web`), one `svdfarm worker`. Before timing, the worker runs one job "
        f"({first_s:.2f} s from submit to finished: imports and model load) and the bare loop "
        f"one render. {rounds} rounds alternate the sides (bare-farm, farm-bare, farm-bare, "
        "bare-farm, ...); a farm round is timed from just before its first HTTP submit to "
        "its last `jobs.finished_at`, the bare loop from its first image read to its last "
        "MP4 written. The headline is the median of the per-round ratios, which a burst of "
        "load from other processes on the machine moves least; the wall-time ratio of all "
        "jobs together and the CPU-time ratio are shown beside it. "
        f"farm/bare = **{ratio:.3f}**: {verdict} the target of {TARGET}."
    )
    print(rounds_table, summary, detail, notes, sep="\n\n")
    if args.write:
        body = "\n\n".join([summary, detail, "Rounds:", rounds_table])
        if args.threads == torch_threads():
            name, title = "farm-overhead", "1. Farm overhead"
        elif args.threads == cpus():
            name, title = "farm-overhead-all-cores", "1b. Farm overhead, torch on every core"
        else:
            name, title = f"farm-overhead-{args.threads}-threads", "Farm overhead"
            title += f", {args.threads} torch threads"
        write_section(name, section(title, body, notes), args.doc)
    if args.write and name == "farm-overhead":
        memory = markdown_table(
            ["process", "peak RSS"], [[proc, fmt_mb(value)] for proc, value in rss.items()]
        )
        memory_notes = (
            f"Peak resident set size (`VmHWM`) of each process after the {args.jobs + 1} jobs "
            "of the farm-overhead run; the worker's pool process loads the model and renders, "
            "as the bare loop does. The web's peak under load is in the web section."
        )
        write_section("memory", section("5. Memory", memory, memory_notes), args.doc)
    for proc, value in rss.items():
        print(f"peak RSS {proc}: {fmt_mb(value)}")
    print(f"farm/bare ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
