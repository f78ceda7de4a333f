"""Profile the farm path with py-spy: the worker's pool process while it runs jobs, and the web
while it serves submits and status reads, with tables of where the time goes.

    .venv/bin/python -m bench.profile_farm [--jobs 5 --web-seconds 5] [--write]

py-spy samples the running processes from outside (``pip install py-spy``; it needs ptrace,
which root in a container has). The worker is sampled idle threads included, so time spent
waiting on the database counts; its samples are shown as milliseconds per job. The web is
sampled while :mod:`bench.loadgen` loads one endpoint with 64 clients; its samples are shown
as shares of the time spent handling requests. Sampling slows the processes a little: the
figures of the other benchmarks are measured without it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    BENCHMARKS_MD,
    Farm,
    JobParams,
    check_succeeded,
    markdown_table,
    png_bytes,
    scratch_broker,
    scratch_database,
    section,
    submit,
    wait_jobs,
    write_section,
)
from bench.web_load import load, web_targets

RATE = 100  # samples per second
OURS = re.compile(r"\((?:worker|svdfarm|web)/")
TASK = "render (worker/tasks.py)"
PIPELINE = "StableVideoDiffusionPipeline.__call__"
REQUEST = "WSGITask.execute (waitress/task.py)"


def py_spy() -> str:
    """The py-spy executable: next to this Python, else on the PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: pip install py-spy (the bench extra)")
    return found


@dataclass
class Stacks:
    """Collapsed stacks as py-spy's raw format writes them: frames outermost first."""

    stacks: list[tuple[list[str], int]]

    @classmethod
    def read(cls, path: Path) -> Stacks:
        """Read a raw profile, dropping line numbers so a function is one frame."""
        stacks = []
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
                stacks.append((frames, int(count)))
        return cls(stacks)

    def under(self, root: str) -> list[tuple[list[str], int]]:
        """Each stack that passes through ``root``, cut to start there."""
        found = []
        for frames, count in self.stacks:
            index = next((i for i, frame in enumerate(frames) if frame.startswith(root)), None)
            if index is not None:
                found.append((frames[index:], count))
        return found

    def hot_spots(self, root: str, fold: tuple[str, ...] = ()) -> tuple[Counter[str], int]:
        """Samples under ``root`` by the call our code made last (``ours -> callee``); a stack
        through a frame named in ``fold`` counts for that frame. Also returns the total."""
        spots: Counter[str] = Counter()
        total = 0
        for frames, count in self.under(root):
            total += count
            folded = next((f for f in frames if f.startswith(fold)), None) if fold else None
            if folded is not None:
                spots[_short(folded)] += count
                continue
            ours = [i for i, frame in enumerate(frames) if OURS.search(frame)]
            at = ours[-1] if ours else 0
            callee = frames[at + 1] if at + 1 < len(frames) else "(itself)"
            spots[f"{_short(frames[at])} -> {_short(callee)}"] += count
        return spots, total


def _short(frame: str) -> str:
    """``func (path/file.py)`` as ``file.func``, ``(itself)`` unchanged."""
    match = re.match(r"(.*) \((?:.*/)?([\w.<>-]+?)(?:\.py)?\)$", frame)
    return f"{match.group(2)}.{match.group(1)}" if match else frame


class Recording:
    """py-spy recording one process until stopped."""

    def __init__(self, pid: int, out: Path, idle: bool) -> None:
        """Start sampling ``pid`` into ``out``."""
        command = [py_spy(), "record", "-p", str(pid), "-f", "raw", "-r", str(RATE), "-o", str(out)]
        if idle:
            command.append("--idle")
        self.out = out
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def stop(self) -> Stacks:
        """Stop sampling and read what it recorded."""
        self.process.send_signal(signal.SIGINT)
        _, errors = self.process.communicate(timeout=120)
        if not self.out.exists():
            raise RuntimeError(f"py-spy recorded nothing: {errors.strip()[-2000:]}")
        return Stacks.read(self.out)


def profile_worker(jobs: int, params: JobParams, work: Path) -> tuple[Stacks, int]:
    """Sample the worker's pool process over ``jobs`` jobs run one after another."""
    image = png_bytes(params.size, params.size)
    with (
        scratch_database("postgresql", work) as database_url,
        scratch_broker("redis") as broker_url,
        Farm(database_url, broker_url, work / "worker-farm") as farm,
    ):
        engine = farm.engine()
        try:
            warm = wait_jobs(engine, [submit(farm.base, params, image)], 300)
            check_succeeded(warm, farm.data_dir)
            pid = farm.pool_pid()
            assert pid is not None
            recording = Recording(pid, work / "pool.txt", idle=True)
            try:
                for _ in range(jobs):
                    done = wait_jobs(engine, [submit(farm.base, params, image)], 300, 0.05)
                    check_succeeded(done, farm.data_dir)
            finally:
                stacks = recording.stop()
        finally:
            engine.dispose()
    return stacks, jobs


def profile_web(seconds: float, work: Path) -> dict[str, tuple[Stacks, int]]:
    """Sample the web while 64 clients load the status read, then the submit."""
    params = JobParams()
    image = png_bytes(params.size, params.size)
    found = {}
    with (
        scratch_database("postgresql", work) as database_url,
        scratch_broker("redis") as broker_url,
        # One waitress process: py-spy follows one pid, and REQUEST names waitress's frame.
        Farm(
            database_url,
            broker_url,
            work / "web-farm",
            worker=False,
            web_server="waitress",
            web_threads=8,
        ) as farm,
    ):
        targets = web_targets(farm, params, image, work)
        for number, (name, (url, body_file, kind)) in enumerate(targets.items()):
            load(url, 64, 1.0, body_file, kind)  # warm-up
            recording = Recording(farm.processes["web"].pid, work / f"web{number}.txt", False)
            try:
                result = load(url, 64, seconds, body_file, kind)
            finally:
                stacks = recording.stop()
            found[name] = (stacks, int(result["ok"]))
    return found


def worker_table(stacks: Stacks, jobs: int, top: int) -> tuple[str, float]:
    """Milliseconds per job in the pool process's task, by hot spot; and the task's total."""
    spots, total = stacks.hot_spots(TASK, fold=(PIPELINE,))
    per_job = 1000 / RATE / jobs
    rows = [
        [name, f"{count * per_job:.1f} ms", f"{100 * count / total:.1f}%"]
        for name, count in spots.most_common(top)
    ]
    rows.append(["the whole task", f"{total * per_job:.1f} ms", "100%"])
    table = markdown_table(["worker pool process, per job", "time", "share"], rows)
    return table, total * per_job


def web_table(name: str, stacks: Stacks, requests: int, top: int) -> str:
    """Shares of the request-handling samples by hot spot."""
    spots, total = stacks.hot_spots(REQUEST)
    per_request = 1000 / RATE / max(1, requests)
    rows = [
        [spot, f"{100 * count / total:.1f}%", f"{count * per_request:.2f} ms"]
        for spot, count in spots.most_common(top)
    ]
    return markdown_table([f"web, {name}", "share", "per request"], rows)


def main(argv: list[str] | None = None) -> int:
    """Profile both sides, print the tables; optionally write them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--web-seconds", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    parser.add_argument("--keep", type=Path, default=None, help="copy the raw profiles here")
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the file --write updates")
    args = parser.parse_args(argv)
    py_spy()
    params = JobParams()
    work = Path(tempfile.mkdtemp(prefix="svdfarm-bench-"))
    try:
        stacks, jobs = profile_worker(args.jobs, params, work)
        worker, task_ms = worker_table(stacks, jobs, args.top)
        web = profile_web(args.web_seconds, work)
        tables = [worker] + [web_table(n, s, r, args.top) for n, (s, r) in web.items()]
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for raw in work.glob("*.txt"):
                shutil.copy(raw, args.keep / raw.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    notes = (
        f"py-spy at {RATE} Hz. Worker: {jobs} jobs of {params.describe()} run one after "
        "another on a warm worker (PostgreSQL + Redis), the pool process sampled with idle "
        "threads, so waits count; each row is where the last call our code made went "
        f"(`ours -> callee`), the pipeline call folded into one row; a job's task took "
        f"{task_ms:.0f} ms here. Web: waitress with 8 threads under 64 clients for "
        f"{args.web_seconds:g} s per request kind, active threads only; shares of the samples "
        "inside request handling, and that time divided by the requests answered."
    )
    print(*tables, notes, sep="\n\n")
    if args.write:
        write_section("profile", section("Profile", "\n\n".join(tables), notes), args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
