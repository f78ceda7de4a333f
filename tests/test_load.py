"""Load: 500 API submissions from 50 concurrent clients against ``svdfarm web`` (gunicorn, in
its own process) and two ``svdfarm worker`` processes with the tiny model, on PostgreSQL and
Redis, then RabbitMQ, while other clients poll job status.

Every answer is 201, 429 or 503 (the refusals with Retry-After and a JSON error); every
accepted job ends; the 201s, the job rows and the terminal jobs are the same jobs; each
succeeded job has its video and there are no other videos. Prints the counts and the status
endpoint's latency (run pytest with ``-s``).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select

from svdfarm.db import Database, upgrade
from svdfarm.models import Job
from svdfarm.settings import Settings
from svdfarm.states import JobState
from svdfarm.storage import FileStore
from tests.conftest import BROKERS, fresh_database, make_settings, needs_postgres, private_broker
from tests.factories import png_bytes
from tests.http import free_port, multipart
from tests.load import Answer, percentile, request, wait_until_serving
from tests.processes import LiveProcess, start_web, start_worker, stop_all
from tests.rows import wait_for_worker

pytestmark = [pytest.mark.slow, pytest.mark.postgres, needs_postgres]

CLIENTS = 50
SUBMISSIONS = 500
POLLERS = 4
#: Seconds between one client's submissions (with jitter): the 500 arrive over about 25 s.
PACE_S = 2.0
#: Accepted submissions per client per minute, and queued jobs farm-wide. The first wave (50
#: clients at once) is more than MAX_QUEUED, so some may get 503 (the farm-wide limit can be
#: passed by the submits in flight at once); a client with a job accepted is over its rate for
#: the rest of the run (about 25 s), so its later tries get 429 (the rate is checked before the
#: queue). So 20-50 jobs run and the test takes about a minute.
SUBMIT_RATE = 1
MAX_QUEUED = 20
#: How long the clients may take, and the accepted jobs to end once the submissions are over.
SUBMIT_TIMEOUT_S = 120
DRAIN_TIMEOUT_S = 180
#: Two tiny frames of 64 x 64, one step: a fraction of a second on a CPU.
FIELDS = {"num_frames": "2", "num_inference_steps": "1", "width": "64", "height": "64"}
ANSWERS = (201, 429, 503)


@dataclass
class LoadFarm:
    """The web server and two workers on one fresh schema and a broker of its own."""

    settings: Settings
    db: Database
    port: int
    web: LiveProcess
    workers: list[LiveProcess]

    def logs(self) -> str:
        """The end of every process's log, for failure messages."""
        parts = [f"--- {p.name} ---\n{p.text(3000)}" for p in (self.web, *self.workers)]
        return "\n".join(parts)


@pytest.fixture(params=BROKERS)
def load_farm(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_model_dir: Path
) -> Iterator[LoadFarm]:
    """``svdfarm web`` and two ``svdfarm worker`` processes with the tiny model, on a broker of
    the test's own (each kind in turn)."""
    with fresh_database("postgresql", tmp_path) as url, private_broker(request.param) as broker:
        limits = {
            "SVDFARM_SUBMIT_RATE": str(SUBMIT_RATE),
            "SVDFARM_MAX_QUEUED": str(MAX_QUEUED),
            "SVDFARM_TRUSTED_PROXIES": "1",
        }
        settings = make_settings(
            tmp_path / "var", url, tiny_model_dir, SVDFARM_BROKER_URL=broker, **limits
        )
        upgrade(settings.database_url)
        # One torch thread per process (worker_env): two CPU workers share a small machine,
        # and with torch's default (a thread per core each) a tiny job costs about four
        # times the CPU.
        extra = {
            **limits,
            "SVDFARM_SECRET_KEY": "test-secret",
            "SVDFARM_PROGRESS_INTERVAL": "0.2",
            "SVDFARM_HEARTBEAT_INTERVAL": "2",
            "SVDFARM_STOP_TIMEOUT": "30",
            # Both workers serve the 12 and 16 GB tiers, whatever this machine has.
            "SVDFARM_CAPABILITIES": '{"total_memory_bytes": 17000000000}',
        }
        port = free_port()
        db = Database(settings.database_url)
        processes: list[LiveProcess] = []
        try:
            web = start_web(settings, tmp_path, port, cwd=tmp_path, **extra)
            processes.append(web)
            workers = []
            for name in ("worker-a", "worker-b"):
                worker = start_worker(settings, tmp_path, f"load-{name}", cwd=tmp_path, **extra)
                processes.append(worker)
                workers.append(worker)
            wait_until_serving(web, port)
            for worker in workers:
                wait_for_worker(db, worker.hostname, worker.process, worker.text)
            yield LoadFarm(settings, db, port, web, workers)
        finally:
            stop_all(processes)  # side by side
            db.dispose()


@dataclass
class Record:
    """Everything the clients saw, shared between their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    answers: list[tuple[int, Answer]] = field(default_factory=list)  # (client, answer)
    errors: list[str] = field(default_factory=list)  # connection errors and bad answers
    accepted: list[str] = field(default_factory=list)  # job ids from the 201s
    address_of: dict[str, str] = field(default_factory=dict)  # job id -> X-Forwarded-For
    status_ms: list[tuple[float, float]] = field(default_factory=list)  # (when, latency ms)
    max_queued: int = 0  # the most queued jobs the database held at one sample

    def problem(self, text: str) -> None:
        """Note something that fails the test."""
        with self.lock:
            self.errors.append(text)


def _check_answer(client: int, address: str, answer: Answer, record: Record) -> None:
    """File one submission's answer; note it when it is not what the API promises."""
    body = answer.json()
    with record.lock:
        record.answers.append((client, answer))
    where = f"client {client}: {answer.status}"
    if answer.status not in ANSWERS:
        record.problem(f"{where} is not one of {ANSWERS}: {answer.body[:500]!r}")
        return
    if answer.status == 201:
        if not isinstance(body, dict) or not body.get("id") or body.get("state") != "queued":
            record.problem(f"{where} without a queued job id: {answer.body[:500]!r}")
            return
        with record.lock:
            record.accepted.append(str(body["id"]))
            record.address_of[str(body["id"])] = address
        return
    retry_after = answer.headers.get("retry-after", "")
    if not retry_after.isdigit() or int(retry_after) < 1:
        record.problem(f"{where} without a Retry-After in seconds ({retry_after!r})")
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not body["error"]:
        record.problem(f"{where} without a JSON error message: {answer.body[:500]!r}")


def _submitter(
    client: int, count: int, port: int, start: threading.Barrier, record: Record
) -> None:
    """One client (its own X-Forwarded-For address) sending ``count`` submissions."""
    rng = random.Random(client)
    image = png_bytes(64, 64, color=(client * 5 % 256, 80, 40))
    address = f"10.0.0.{client + 1}"
    start.wait()
    for n in range(count):
        body, content_type = multipart({**FIELDS, "seed": str(client * 1000 + n)}, image)
        headers = {"Content-Type": content_type, "X-Forwarded-For": address}
        try:
            answer = request(port, "POST", "/api/v1/jobs", body, headers)
        except Exception as exc:  # any connection error fails the test
            record.problem(f"client {client}: submission {n}: {exc!r}")
        else:
            _check_answer(client, address, answer, record)
        if n < count - 1:  # no pause after the last: the client is done
            time.sleep(PACE_S * rng.uniform(0.5, 1.5))


def _poller(port: int, seed: int, stop: threading.Event, record: Record) -> None:
    """Read the status of accepted jobs, picked at random, until told to stop; each as the
    client that submitted it (its address is its owner: another's job answers 404)."""
    rng = random.Random(seed)
    while not stop.is_set():
        with record.lock:
            job_id = rng.choice(record.accepted) if record.accepted else None
            address = record.address_of.get(job_id or "", "")
        if job_id is None:
            time.sleep(0.05)
            continue
        try:
            headers = {"X-Forwarded-For": address}
            answer = request(port, "GET", f"/api/v1/jobs/{job_id}", headers=headers)
        except Exception as exc:
            record.problem(f"status of {job_id}: {exc!r}")
        else:
            if answer.status != 200:
                record.problem(f"status of {job_id}: {answer.status} {answer.body[:500]!r}")
            with record.lock:
                record.status_ms.append((time.monotonic(), answer.elapsed_s * 1000))
        time.sleep(0.25)


def _sampler(db: Database, stop: threading.Event, record: Record) -> None:
    """Note the most jobs queued at once (the queue limit is checked before each insert)."""
    while not stop.is_set():
        with db.session() as session:
            queued = session.scalar(
                select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED)
            )
        record.max_queued = max(record.max_queued, queued or 0)
        time.sleep(0.1)


def _unfinished(db: Database) -> list[Job]:
    """The jobs that have not reached a terminal state."""
    with db.session() as session:
        jobs = session.scalars(select(Job)).all()
        return [job for job in jobs if not job.state.terminal]


def _describe(jobs: list[Job]) -> str:
    """One line per job: id, state, phase, progress, queue, last update."""
    return "\n".join(
        f"{job.id} {job.state.value} phase={job.phase} progress={job.progress:.2f} "
        f"queue={job.queue} updated={job.updated_at:%H:%M:%S}"
        for job in jobs[:40]
    )


def _figures(values: list[float]) -> str:
    """p50, p95, p99 and max of latencies in ms."""
    marks = ", ".join(f"p{q}={percentile(values, q):.0f}" for q in (50, 95, 99))
    return f"{marks}, max={max(values, default=float('nan')):.0f} ms ({len(values)} requests)"


@pytest.mark.timeout(360)
def test_500_submissions_from_50_clients(load_farm: LoadFarm) -> None:
    """Every answer is 201, 429 or 503; every accepted job ends, with its video when it
    succeeded; and the 201s are exactly the job rows."""
    farm = load_farm
    record = Record()
    start = threading.Barrier(CLIENTS + 1)
    per_client = [SUBMISSIONS // CLIENTS + (c < SUBMISSIONS % CLIENTS) for c in range(CLIENTS)]
    submitters = [
        threading.Thread(
            target=_submitter, args=(c, per_client[c], farm.port, start, record), daemon=True
        )
        for c in range(CLIENTS)
    ]
    stop = threading.Event()
    pollers = [
        threading.Thread(target=_poller, args=(farm.port, p, stop, record), daemon=True)
        for p in range(POLLERS)
    ]
    pollers.append(threading.Thread(target=_sampler, args=(farm.db, stop, record), daemon=True))
    for thread in (*submitters, *pollers):
        thread.start()
    start.wait()
    began = time.monotonic()
    try:
        for thread in submitters:
            thread.join(timeout=max(1.0, began + SUBMIT_TIMEOUT_S - time.monotonic()))
        busy = sum(t.is_alive() for t in submitters)
        assert not busy, f"{busy} clients still submitting after {SUBMIT_TIMEOUT_S} s"
        submitted = time.monotonic()

        # Every accepted job ends, within a bound; the pollers keep reading meanwhile.
        deadline = submitted + DRAIN_TIMEOUT_S
        while (left := _unfinished(farm.db)) and time.monotonic() < deadline:
            time.sleep(0.5)
        drained = time.monotonic()
    finally:
        stop.set()
        for thread in pollers:
            thread.join(timeout=70)
    assert not left, (
        f"{len(left)} accepted job(s) did not end within {DRAIN_TIMEOUT_S} s of the last "
        f"submission:\n{_describe(left)}\n{farm.logs()}"
    )

    statuses = Counter(answer.status for _, answer in record.answers)
    with farm.db.session() as session:
        jobs = session.scalars(select(Job)).all()
    states = Counter(job.state.value for job in jobs)
    storage = FileStore(farm.settings.storage_dir)
    videos = sorted(storage.root.rglob("video.*.mp4"))
    under_load = [ms for when, ms in record.status_ms if when <= submitted]
    everything = [ms for _, ms in record.status_ms]
    submit_ms = [a.elapsed_s * 1000 for _, a in record.answers]
    print(
        f"\nload ({farm.settings.broker_url.split(':', 1)[0]}): "
        f"{len(record.answers)} submissions from {CLIENTS} clients, "
        f"201={statuses[201]}, 429={statuses[429]}, 503={statuses[503]}, "
        f"other={sum(n for s, n in statuses.items() if s not in ANSWERS)}, "
        f"errors={len(record.errors)}; jobs={len(jobs)} {dict(states)}, videos={len(videos)}, "
        f"most queued at once={record.max_queued} (limit {MAX_QUEUED}); "
        f"wall {drained - began:.0f} s (submissions {submitted - began:.0f} s)"
        f"\nload: status while submitting: {_figures(under_load)}"
        f"\nload: status until drained:    {_figures(everything)}"
        f"\nload: submissions:             {_figures(submit_ms)}"
    )

    assert not record.errors, "\n".join(record.errors[:50])
    assert len(record.answers) == SUBMISSIONS
    assert set(statuses) <= set(ANSWERS), statuses
    # The web trusts one proxy hop: each job is on the address its client sent as
    # X-Forwarded-For, which the per-client limit counts by.
    seen = {str(j.id): (j.client, record.address_of.get(str(j.id))) for j in jobs}
    wrong = {job_id: pair for job_id, pair in seen.items() if pair[0] != pair[1]}
    assert not wrong, (
        f"{len(wrong)} job(s) recorded for another client than their X-Forwarded-For "
        f"(recorded, sent): {list(wrong.values())[:10]}"
    )
    # A client whose job was accepted is over its rate for the rest of the run (the
    # per-client limit is exact: one client's submits are serialised). The farm-wide queue
    # limit is not (svdfarm.jobs.check_limits): the first wave's 50 submits in flight at once
    # may all pass it, so whether it answers 503 here depends on how many overlap
    # (tests/web/test_submit_limits.py holds the limit itself); a 503 must be one of ours.
    assert statuses[429] > 0, statuses

    accepted = set(record.accepted)
    assert len(accepted) == statuses[201] == len(record.accepted)
    assert {str(job.id) for job in jobs} == accepted, "the job rows are not the accepted jobs"
    terminal = [job for job in jobs if job.state.terminal]
    assert statuses[201] == len(jobs) == len(terminal)

    failed = [job for job in jobs if job.state.value != "succeeded"]
    assert not failed, "\n".join(f"{job.id} {job.state.value}: {job.error}" for job in failed)
    succeeded = [job for job in jobs if job.state.value == "succeeded"]
    assert len(succeeded) == len(videos)
    missing = [str(job.id) for job in succeeded if not storage.exists(job.video_key)]
    assert not missing, f"succeeded jobs without their video: {missing}"
    assert "Traceback" not in farm.web.text(10**7), farm.web.text()
