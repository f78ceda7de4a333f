"""Fair share: two owners with equal shares keep a backlog each on ONE worker; each owner's
share of the worker's time, and submit -> attempt start on an idle farm.

    .venv/bin/python -m bench.fair_share [--jobs 40] [--backlog 20] [--latency-jobs 30] [--write]

A farm of real processes (``svdfarm web`` and one ``svdfarm worker``, the product's dispatch
margin 0) on PostgreSQL and Redis (``--database sqlite --broker embedded`` for a quick run);
two users with an equal share each keep ``--backlog`` jobs waiting (topped up as their jobs
start) until ``--jobs`` of their jobs have ended. Jobs are submitted in this process with
``svdfarm.jobs.submit_job`` as the web does for a user's API key (a dispatch pass follows each
submit). One warm-up job of a third user pays the worker's model load first and is not
counted. Each owner's share is the sum of their attempts' durations over both owners' sum;
target: within 10% of half each (0.45 to 0.55).

The latency half is :mod:`bench.queue_latency`'s measure (one job at a time, each meeting an
idle worker) on ``--latency-setup`` (default Redis + PostgreSQL); target p50 <= 20 ms.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from bench import queue_latency
from bench.common import (
    BENCHMARKS_MD,
    Farm,
    JobParams,
    fmt_ms,
    markdown_table,
    percentile,
    png_bytes,
    scratch_broker,
    scratch_database,
    section,
    setup_name,
    write_section,
)

#: An owner's share of the worker's time must be within this of half.
TARGET_SHARE = (0.45, 0.55)
#: Submit -> attempt start on an idle farm (Redis), as bench.queue_latency's target.
TARGET_LATENCY_P50_S = queue_latency.TARGET_P50_S
OWNERS = ("alice", "bob")


@dataclass
class Share:
    """One owner's part of the worker's time."""

    name: str
    jobs: int
    seconds: float
    share: float

    def on_target(self) -> bool:
        """True when the share is within :data:`TARGET_SHARE`."""
        return TARGET_SHARE[0] <= self.share <= TARGET_SHARE[1]


@dataclass
class Contention:
    """What a contention run measured: each owner's share, and the order jobs started in."""

    shares: list[Share]
    order: str
    wall_s: float


def measure_shares(
    database: str, broker: str, jobs: int, backlog: int, params: JobParams
) -> Contention:
    """Run two owners against one worker until ``jobs`` of their jobs have ended; their
    shares of the worker's time."""
    data_dir = Path(tempfile.mkdtemp(prefix="svdfarm-bench-"))
    try:
        with (
            scratch_database(database, data_dir) as database_url,
            scratch_broker(broker) as broker_url,
            Farm(
                database_url,
                broker_url,
                data_dir / "farm",
                extra_env={"SVDFARM_DISPATCH_MARGIN": "0"},
            ) as farm,
        ):
            return _contend(farm, jobs, backlog, params)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _contend(farm: Farm, jobs: int, backlog: int, params: JobParams) -> Contention:
    """The contention run on a started farm (see :func:`measure_shares`)."""
    from svdfarm.actions import cancel_job
    from svdfarm.celery_app import create_celery
    from svdfarm.db import Database
    from svdfarm.jobs import submit_job, validate_submission
    from svdfarm.lifecycle import By
    from svdfarm.models import Attempt, Job, JobEvent
    from svdfarm.settings import load_settings
    from svdfarm.states import Actor, EventType, JobState
    from svdfarm.users import add_user

    settings = load_settings(farm.env())
    assert settings.dispatch_margin == 0
    db = Database(settings.database_url)
    celery = create_celery(settings)
    image = png_bytes(params.size, params.size)
    submission = validate_submission(settings, params.fields(), image, "in.png")
    ended_states = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)

    def submit(owner: str) -> uuid.UUID:
        """One job of ``owner``, as the web submits it."""
        with db.session() as session:
            job = submit_job(session, celery, settings, submission, by=By(Actor.API), owner=owner)
            return job.id

    def wait_ended(ids: Sequence[uuid.UUID], timeout_s: float) -> None:
        """Until every job of ``ids`` has ended; raises unless each succeeded."""
        deadline = time.monotonic() + timeout_s
        while True:
            with db.session() as session:
                rows = session.execute(select(Job.state, Job.error).where(Job.id.in_(ids))).all()
            if len(rows) == len(ids) and all(state in ended_states for state, _ in rows):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ids)} job(s) did not end in {timeout_s:g} s")
            time.sleep(0.2)
        failed = [(state.value, error) for state, error in rows if state is not JobState.SUCCEEDED]
        if failed:
            raise RuntimeError(f"jobs did not succeed: {failed[:3]}\n{farm.log('worker')[-3000:]}")

    try:
        with db.begin() as session:
            owners = {name: add_user(session, name).owner for name in OWNERS}
            warmup_owner = add_user(session, "warmup").owner
        wait_ended([submit(warmup_owner)], 300)  # the worker's model load
        names = {owner: name for name, owner in owners.items()}
        submitted: dict[str, list[uuid.UUID]] = {owner: [] for owner in names}
        started = time.monotonic()
        while True:
            with db.session() as session:
                counts = dict(
                    session.execute(
                        select(Job.owner, func.count())
                        .where(Job.owner.in_(list(names)), Job.state.in_(ended_states))
                        .group_by(Job.owner)
                    ).all()
                )
                waiting = dict(
                    session.execute(
                        select(Job.owner, func.count())
                        .where(Job.owner.in_(list(names)), Job.state == JobState.QUEUED)
                        .group_by(Job.owner)
                    ).all()
                )
            if sum(counts.values()) >= jobs:
                break
            if time.monotonic() - started > 60 + jobs * 30:
                raise TimeoutError(f"{jobs} jobs did not end:\n{farm.log('worker')[-3000:]}")
            # Top the backlogs up in turn, so neither owner is always the older one.
            for _ in range(backlog):
                for owner in names:
                    if waiting.get(owner, 0) < backlog:
                        submitted[owner].append(submit(owner))
                        waiting[owner] = waiting.get(owner, 0) + 1
            time.sleep(0.2)
        # Stop the contention: the waiting jobs are canceled, the running one ends.
        every = [job_id for ids in submitted.values() for job_id in ids]
        with db.session() as session:
            left = session.scalars(
                select(Job.id).where(Job.id.in_(every), Job.state == JobState.QUEUED)
            ).all()
            for job_id in left:
                cancel_job(session, job_id, by=By(Actor.ADMIN))
        wall_s = time.monotonic() - started
        kept = [i for i in every if i not in set(left)]
        deadline = time.monotonic() + 120
        while True:
            with db.session() as session:
                active = session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.id.in_(kept), Job.state.not_in(ended_states))
                )
            if not active or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        with db.session() as session:
            runs = session.execute(
                select(Job.owner, Attempt.duration_s, Attempt.started_at, Attempt.finished_at)
                .join(Attempt, Attempt.job_id == Job.id)
                .where(Job.owner.in_(list(names)), Job.state == JobState.SUCCEEDED)
            ).all()
            claims = session.scalars(
                select(Job.owner)
                .join(JobEvent, JobEvent.job_id == Job.id)
                .where(Job.owner.in_(list(names)), JobEvent.type == EventType.CLAIMED)
                .order_by(JobEvent.id)
            ).all()
    finally:
        celery.close()
        db.dispose()
    seconds: dict[str, float] = {owner: 0.0 for owner in names}
    done: dict[str, int] = {owner: 0 for owner in names}
    for owner, duration, began, ended in runs:
        if duration is None and ended is not None:
            duration = (ended - began).total_seconds()
        seconds[owner] += duration or 0.0
        done[owner] += 1
    total = sum(seconds.values()) or 1.0
    shares = [
        Share(names[owner], done[owner], seconds[owner], seconds[owner] / total) for owner in names
    ]
    order = "".join(names[owner][0].upper() for owner in claims)
    return Contention(shares, order, wall_s)


def main(argv: list[str] | None = None) -> int:
    """Run the contention and the latency measures; print their figures beside the targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40, help="jobs of the two owners to end")
    parser.add_argument("--backlog", type=int, default=20, help="jobs each owner keeps waiting")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--broker", choices=["redis", "embedded"], default="redis")
    parser.add_argument(
        "--latency-jobs", type=int, default=30, help="idle-farm jobs timed (0: skip)"
    )
    parser.add_argument(
        "--latency-setup",
        choices=sorted(queue_latency.SETUPS),
        default="redis",
        help="where submit -> attempt start is timed (bench.queue_latency's setups)",
    )
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the file --write updates")
    args = parser.parse_args(argv)
    if args.jobs < 2 or args.backlog < 1:
        parser.error("--jobs must be at least 2 and --backlog at least 1")
    params = JobParams(frames=args.frames, steps=args.steps, decode_chunk_size=args.frames)

    run = measure_shares(args.database, args.broker, args.jobs, args.backlog, params)
    low, high = TARGET_SHARE
    rows = [
        [
            share.name,
            share.jobs,
            f"{share.seconds:.1f} s",
            f"{share.share:.3f}",
            "met" if share.on_target() else "**missed**",
        ]
        for share in run.shares
    ]
    table = markdown_table(
        ["owner", "jobs run", "worker time", "share", f"target ({low:g} to {high:g})"], rows
    )
    notes = (
        f"{setup_name(args.database, args.broker)}, one worker; two users with equal shares "
        f"each keep {args.backlog} jobs waiting until {args.jobs} of their jobs have ended "
        f"({run.wall_s:.0f} s); jobs of {params.describe()}. Share = the owner's attempts' "
        f"durations over both owners'. Start order: `{run.order}`."
    )
    print(table, notes, sep="\n\n")
    for share in run.shares:
        print(
            f"{share.name} share of worker time: {share.share:.3f} ({share.jobs} jobs, "
            f"{share.seconds:.1f} s); target {low:g}..{high:g}: "
            + ("met" if share.on_target() else "MISSED")
        )
    latency_line = ""
    if args.latency_jobs > 0:
        found = queue_latency.measure(args.latency_setup, args.latency_jobs, 0.1, params)
        p50 = percentile(found["attempt"], 50)
        p99 = percentile(found["attempt"], 99)
        targeted = args.latency_setup in queue_latency.TARGETED
        verdict = ("met" if p50 <= TARGET_LATENCY_P50_S else "MISSED") if targeted else "-"
        latency_line = (
            f"submit -> attempt start on an idle farm ({args.latency_setup}, "
            f"{len(found['attempt'])} jobs): p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)}; "
            f"target p50 <= {fmt_ms(TARGET_LATENCY_P50_S)}: {verdict}"
        )
        print(latency_line)
    if args.write:
        body = section("Fair share", table, f"{notes}\n\n{latency_line}".strip())
        write_section("fair-share", body, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
