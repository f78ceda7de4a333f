"""Model cache: a worker's second job against its first (which imports torch and loads the
model), and, in one process, re-casting the cached pipeline in place for a ladder step against
reloading it from disk.

    .venv/bin/python -m bench.model_cache [--jobs 3 --repeat 7] [--write]

The first part runs a fresh ``svdfarm worker`` on PostgreSQL and Redis and times each job from
submit to finished and by its attempt's duration. The second calls
``worker.pipeline.load_pipeline`` as the worker does, with the tiny model: a ladder step
(bf16 everywhere -> the UNet in fp32, what a dtype error in the UNet leads to), the same plan
again (what every job after the first pays), and a reload from disk of the step's plan.
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
    png_bytes,
    scratch_broker,
    scratch_database,
    section,
    submit,
    wait_jobs,
    write_section,
)


def worker_jobs(jobs: int, params: JobParams) -> list[tuple[float, float]]:
    """(submit -> finished, attempt duration) of each of a fresh worker's first ``jobs`` jobs."""
    image = png_bytes(params.size, params.size)
    data_dir = Path(tempfile.mkdtemp(prefix="svdfarm-bench-"))
    found = []
    try:
        with (
            scratch_database("postgresql", data_dir) as database_url,
            scratch_broker("redis") as broker_url,
            Farm(database_url, broker_url, data_dir / "farm") as farm,
        ):
            engine = farm.engine()
            try:
                for _ in range(jobs):
                    (record,) = wait_jobs(engine, [submit(farm.base, params, image)], 300, 0.02)
                    check_succeeded([record], farm.data_dir)
                    assert record.finished_at and record.attempt_duration_s
                    total = (record.finished_at - record.created_at).total_seconds()
                    found.append((total, record.attempt_duration_s))
            finally:
                engine.dispose()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return found


def recast_vs_reload(repeat: int) -> dict[str, list[float]]:
    """Seconds of each in-place re-cast, same-plan apply and reload from disk (``repeat`` each)."""
    import torch  # noqa: F401 - imported before timing anything

    from worker.pipeline import clear_cache, load_pipeline
    from worker.plans import Plan

    models_dir = Path(tempfile.mkdtemp(prefix="svdfarm-bench-models-"))
    first = Plan.uniform("bf16", "cpu")
    step = first.with_changes(unet="fp32")
    found: dict[str, list[float]] = {"recast": [], "same": [], "back": [], "reload": []}
    try:
        load_pipeline("tiny", models_dir, first)  # writes the tiny model, imports diffusers
        for _ in range(repeat):
            clear_cache()
            load_pipeline("tiny", models_dir, first)
            started = time.perf_counter()
            load_pipeline("tiny", models_dir, step)
            found["recast"].append(time.perf_counter() - started)
            started = time.perf_counter()
            load_pipeline("tiny", models_dir, step)
            found["same"].append(time.perf_counter() - started)
            started = time.perf_counter()
            load_pipeline("tiny", models_dir, first)
            found["back"].append(time.perf_counter() - started)
            clear_cache()
            started = time.perf_counter()
            load_pipeline("tiny", models_dir, step)
            found["reload"].append(time.perf_counter() - started)
        clear_cache()
    finally:
        shutil.rmtree(models_dir, ignore_errors=True)
    return found


def main(argv: list[str] | None = None) -> int:
    """Run both parts, print the tables; optionally write them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3, help="jobs on the fresh worker (>= 2)")
    parser.add_argument("--repeat", type=int, default=7, help="re-casts and reloads timed")
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the file --write updates")
    args = parser.parse_args(argv)
    params = JobParams()
    jobs = worker_jobs(max(2, args.jobs), params)
    first_total, first_attempt = jobs[0]
    rows = [
        [
            f"job {n}",
            f"{total:.2f} s",
            f"{attempt:.2f} s",
            f"{total / first_total:.3f}",
        ]
        for n, (total, attempt) in enumerate(jobs, start=1)
    ]
    table = markdown_table(
        ["one worker", "submit -> finished", "attempt", "vs job 1 (submit -> finished)"], rows
    )
    casts = recast_vs_reload(args.repeat)
    reload_s = statistics.median(casts["reload"])
    labels = {
        "reload": "reload from disk (`from_pretrained`, then placed)",
        "recast": "in-place re-cast, ladder step: bf16 -> UNet fp32",
        "back": "in-place re-cast back: UNet fp32 -> bf16 (from the kept bf16 weights)",
        "same": "same plan again (every job after the first)",
    }
    cast_table = markdown_table(
        ["tiny pipeline, CPU", "median", "min", "vs reload"],
        [
            [
                labels[name],
                fmt_ms(statistics.median(values)),
                fmt_ms(min(values)),
                f"{statistics.median(values) / reload_s:.3f}",
            ]
            for name in ("reload", "recast", "back", "same")
            for values in [casts[name]]
        ],
    )
    second = jobs[1][0] / first_total
    recast = statistics.median(casts["recast"]) / reload_s
    notes = (
        f"Jobs of {params.describe()} on a fresh `svdfarm worker` (PostgreSQL + Redis): the "
        "first pays importing torch and diffusers in the pool process and loading the model; "
        f"the second reuses the cached pipeline: second/first = **{second:.3f}**. Re-casts and "
        f"reloads are timed {args.repeat} times each in one process through "
        "`worker.pipeline.load_pipeline`: in-place re-cast/reload = "
        f"**{recast:.3f}**. The tiny model's weights are 10 MB, so a reload costs little "
        "here; SVD-XT's are several GB, where a reload from disk takes seconds to minutes."
    )
    print(table, cast_table, notes, sep="\n\n")
    if args.write:
        body = table + "\n\n" + cast_table
        write_section("model-cache", section("4. Model cache", body, notes), args.doc)
    print(f"second/first job: {second:.3f}")
    print(f"re-cast/reload: {recast:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
