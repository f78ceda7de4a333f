"""Farm overhead: N tiny jobs through the whole farm (HTTP submit, broker, worker, database,
MP4 stored) against the same N renders in a bare loop (one process calling the diffusers
pipeline and writing the MP4 the way the worker does), side by side in one run.

    .venv/bin/python -m bench.farm_overhead [--jobs 20] [--all-cores] [--write]

Both sides are warm (one job each before timing) and use the same parameters, seed and torch
thread count; by default torch gets every core but one, and the model's processes are pinned
to the same cores. Two bare loops run, and the farm is compared with their mean: two
identical processes differ by a few percent on their own, and the second loop against the
first (an A/A control) shows how much. Each round runs one job on each of the three, in an
order that cycles through all six, so drift in the machine's load falls on all alike; the
rounds are split over fresh processes (``--epochs``), since each process keeps its own few
percent for as long as it lives. A farm round is timed from just before its HTTP submit to
its ``jobs.finished_at``. The last line of the output is ``farm/bare ratio: X``, the median
of the rounds' ratios; the target is 1.05.
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


SIDES = ("bare", "farm", "bare2")
ORDERS = (
    ("bare", "farm", "bare2"),
    ("farm", "bare2", "bare"),
    ("bare2", "bare", "farm"),
    ("bare2", "farm", "bare"),
    ("farm", "bare", "bare2"),
    ("bare", "bare2", "farm"),
)


def order_of(number: int) -> tuple[str, ...]:
    """The order of the sides in round ``number`` (from 1): all six orders in turn, so each
    side runs first, second and last equally often, after each of the others."""
    return ORDERS[(number - 1) % len(ORDERS)]


def epoch_rounds(epochs: list[list[int]]) -> list[range]:
    """The indexes (from 0) of the rounds each set of processes ran, in order."""
    spans, start = [], 0
    for sizes in epochs:
        spans.append(range(start, start + len(sizes)))
        start += len(sizes)
    return spans


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its tables and the ratio; optionally write them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="timed jobs on each side")
    parser.add_argument(
        "--rounds", type=int, default=0, help="rounds the jobs are split into (default: one each)"
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
        "--epochs",
        type=int,
        default=10,
        help="fresh worker and bare loops this many times (processes differ by a few percent)",
    )
    parser.add_argument(
        "--poll", type=float, default=0.5, help="seconds between reads of the jobs' states"
    )
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the file --write updates")
    args = parser.parse_args(argv)
    if args.all_cores:
        args.threads = cpus()
    pinned = args.threads < cpus()
    rounds = max(1, min(args.rounds or args.jobs, args.jobs))
    sizes = [args.jobs // rounds + (1 if r < args.jobs % rounds else 0) for r in range(rounds)]
    count = max(1, min(args.epochs, rounds))
    epochs = [sizes[e * rounds // count : (e + 1) * rounds // count] for e in range(count)]
    params = JobParams(frames=args.frames, steps=args.steps, size=args.size)
    image = png_bytes(args.size, args.size)

    data_dir = Path(tempfile.mkdtemp(prefix="svdfarm-bench-"))
    image_path = data_dir / "input.png"
    image_path.write_bytes(image)
    rows = []
    wall = dict.fromkeys(SIDES, 0.0)
    cpu = dict.fromkeys(SIDES, 0.0)
    ratios: list[float] = []
    controls: list[float] = []
    farm_rounds: list[list[JobRecord]] = []
    loops: dict[str, BareLoop] = {}
    first_s: list[float] = []
    rss: dict[str, int | None] = {}
    try:
        with (
            scratch_database(args.database, data_dir) as database_url,
            scratch_broker(args.broker) as broker_url,
            Farm(database_url, broker_url, data_dir / "farm", threads=args.threads) as farm,
        ):
            number = 0
            for epoch, epoch_sizes in enumerate(epochs):
                if epoch:
                    farm.restart_worker()
                # Warm the worker: its first job imports torch and loads the model.
                warm_s, _ = farm_round(farm, params, image, 1)
                first_s.append(warm_s)
                for side in ("bare", "bare2"):
                    loops[side] = BareLoop(
                        farm.data_dir / "models" / "tiny",
                        image_path,
                        data_dir / f"{side}-{epoch}",
                        params,
                        args.threads,
                    )
                if pinned:
                    # Every side's model on the same cores, the farm's own processes beside.
                    farm.pin()
                    for loop in loops.values():
                        pin(loop.process.pid, model_cpus())
                try:
                    for size in epoch_sizes:
                        number += 1
                        order = order_of(number)
                        times: dict[str, float] = {}
                        for side in order:
                            if side in loops:
                                loop = loops[side]
                                cpu_before = cpu_seconds(loop.process.pid)
                                times[side] = loop.run(size)
                                cpu[side] += cpu_seconds(loop.process.pid) - cpu_before
                            else:
                                cpu_before = farm.cpu_seconds()
                                times["farm"], records = farm_round(
                                    farm, params, image, size, args.poll
                                )
                                cpu["farm"] += farm.cpu_seconds() - cpu_before
                                farm_rounds.append(records)
                        for side in SIDES:
                            wall[side] += times[side]
                        bare_mean = (times["bare"] + times["bare2"]) / 2
                        ratios.append(times["farm"] / bare_mean)
                        controls.append(times["bare2"] / times["bare"])
                        rows.append(
                            [
                                number,
                                epoch + 1,
                                size,
                                ", ".join(order),
                                f"{times['bare']:.2f} s",
                                f"{times['bare2']:.2f} s",
                                f"{times['farm']:.2f} s",
                                f"{ratios[-1]:.3f}",
                                f"{controls[-1]:.3f}",
                            ]
                        )
                        print(f"round {' | '.join(str(c) for c in rows[-1])}", flush=True)
                    rss = farm.peak_rss()
                    rss["bare loop"] = loops["bare"].peak_rss()
                finally:
                    for loop in loops.values():
                        loop.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    ratio = statistics.median(ratios)
    control = statistics.median(controls)
    bare_wall = (wall["bare"] + wall["bare2"]) / 2
    bare_cpu = (cpu["bare"] + cpu["bare2"]) / 2
    summary = markdown_table(
        ["figure", "bare loop (mean of the two)", "farm", "farm/bare"],
        [
            ["median of the per-round ratios", "", "", f"**{ratio:.3f}**"],
            [
                f"wall time, all {args.jobs} jobs",
                f"{bare_wall:.2f} s",
                f"{wall['farm']:.2f} s",
                f"{wall['farm'] / bare_wall:.3f}",
            ],
            [
                "CPU time, all jobs (web, worker, pool, ffmpeg; not PostgreSQL or Redis)",
                f"{bare_cpu:.2f} s",
                f"{cpu['farm']:.2f} s",
                f"{cpu['farm'] / bare_cpu:.3f}" if bare_cpu else "-",
            ],
            [
                "wall time per job",
                f"{bare_wall / args.jobs:.3f} s",
                f"{wall['farm'] / args.jobs:.3f} s",
                f"{(wall['farm'] - bare_wall) / args.jobs * 1000:+.0f} ms",
            ],
            [
                "A/A control: second bare loop / first, median (min-max) of the rounds",
                "",
                "",
                f"{control:.3f} ({min(controls):.3f}-{max(controls):.3f})",
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
    sets_table = markdown_table(
        ["set of processes", "rounds", "farm/bare, median", "A/A, median"],
        [
            [
                number + 1,
                len(members),
                f"{statistics.median(ratios[i] for i in members):.3f}",
                f"{statistics.median(controls[i] for i in members):.3f}",
            ]
            for number, members in enumerate(epoch_rounds(epochs))
        ],
    )
    rounds_table = markdown_table(
        [
            "round",
            "processes",
            "jobs",
            "order",
            "bare loop",
            "bare loop 2",
            "farm",
            "farm/bare",
            "A/A",
        ],
        rows,
    )
    setup = setup_name(args.database, args.broker)
    verdict = "at or under" if ratio <= TARGET else "above"
    if pinned:
        threads_note = (
            f"torch threads {args.threads} on every side, pinned to the same "
            f"{len(model_cpus())} of the {cpus()} cores (the bare loops and the worker's pool "
            "process), the web and the worker's main process pinned to the core left (on a "
            "GPU farm the model does not run on the CPU at all)"
        )
    else:
        threads_note = (
            f"torch threads {args.threads} on every side: every core, so the farm's own "
            "processes (web, worker main process, PostgreSQL, Redis), the idle bare loop and "
            "anything else on the machine preempt one of torch's threads whenever they wake, "
            "and the whole thread team waits for it"
        )
    notes = (
        f"{args.jobs} jobs of {params.describe()} (tiny model, seed {params.seed}, "
        f"{threads_note}) on {setup}, the web served by gunicorn (`svdfarm web`), one "
        "`svdfarm worker`. Each round runs one job on the farm and one on each of two "
        "identical bare loops, in an order that cycles through all six; a farm round is timed "
        "from just before its HTTP submit to its `jobs.finished_at`, a bare loop from its image "
        "read to its MP4 written. Two processes running the same code differ by a few percent "
        "for as long as they live, so the rounds are split over "
        f"{len(epochs)} sets of processes: before each set the worker is restarted and runs "
        "one job (imports and model load: median "
        f"{statistics.median(first_s):.1f} s, {min(first_s):.1f}-{max(first_s):.1f} s, from "
        "submit to finished) and two fresh bare loops render once. farm/bare is the farm's "
        "time over the mean of the two loops'; the headline is its median over the rounds, "
        "which a burst of load from elsewhere on the machine moves least. The A/A row is the "
        "noise floor: the two identical loops differ by this much on their own. "
        f"farm/bare = **{ratio:.3f}**: {verdict} the target of {TARGET}."
    )
    print(rounds_table, sets_table, summary, detail, notes, sep="\n\n")
    if args.write:
        body = "\n\n".join(
            [summary, detail, "By set of processes:", sets_table, "Rounds:", rounds_table]
        )
        if args.threads == torch_threads():
            name, title = "farm-overhead", "1. Farm overhead"
        elif args.threads == cpus():
            name, title = "farm-overhead-all-cores", "1b. Farm overhead, torch on every core"
        else:
            name, title = f"farm-overhead-{args.threads}-threads", "Farm overhead"
            title += f", {args.threads} torch threads"
        write_section(name, section(title, body, notes), args.doc)
        if name == "farm-overhead":
            memory = markdown_table(
                ["process", "peak RSS"], [[proc, fmt_mb(value)] for proc, value in rss.items()]
            )
            memory_notes = (
                f"Peak resident set size (`VmHWM`) of each process after the {args.jobs + 1} "
                "jobs of the farm-overhead run; the worker's pool process loads the model and "
                "renders, as the bare loop does. The web's peak under load is in the web section."
            )
            write_section("memory", section("5. Memory", memory, memory_notes), args.doc)
    for proc, value in rss.items():
        print(f"peak RSS {proc}: {fmt_mb(value)}")
    print(f"A/A control: {control:.3f}")
    print(f"farm/bare ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
