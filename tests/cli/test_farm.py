"""``svdfarm db``, ``svdfarm queues`` and ``svdfarm admin`` (:mod:`cli.farm`), run as real
subprocesses."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, update

from svdfarm.actions import cancel_job
from svdfarm.catalog import catalog_keys
from svdfarm.celery_app import create_celery, enqueue_render
from svdfarm.db import Database, upgrade
from svdfarm.depths import queue_depths
from svdfarm.lifecycle import By, events_of
from svdfarm.models import Job
from svdfarm.queues import all_queues
from svdfarm.settings import Settings, is_password_hash, load_settings
from svdfarm.states import Actor, EventType, JobState
from tests.conftest import REDIS_URL, needs_redis
from tests.processes import SVDFARM, private_redis_db
from tests.rows import QUEUE, add_job, read_job

#: A second queue, of another class than :data:`tests.rows.QUEUE`.
OTHER_QUEUE = "svd.cuda.bf16.80g"


def test_db_upgrade_creates_tables(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """``svdfarm db upgrade`` migrates the default SQLite database in the data folder."""
    done = subprocess.run([*SVDFARM, "db", "upgrade"], env=cli_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'svdfarm.db'}")
    assert {"jobs", "attempts", "workers"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_db_says_where_without_the_password() -> None:
    """What ``svdfarm db`` and ``up`` print of a URL keeps everything but the password."""
    from cli import redact

    assert redact("postgresql+psycopg://svd:s3cret@db:5432/farm") == (
        "postgresql+psycopg://svd:***@db:5432/farm"
    )
    assert redact("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"


def test_admin_hash_password_reads_stdin(cli_env: dict[str, str]) -> None:
    """Piped in, a password comes back as a hash production accepts; an empty one is refused
    with status 1."""
    done = subprocess.run(
        [*SVDFARM, "admin", "hash-password"],
        input="correct horse\n",
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert is_password_hash(done.stdout.strip())
    empty = subprocess.run(
        [*SVDFARM, "admin", "hash-password"],
        input="\n",
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert empty.returncode == 1
    assert empty.stderr == "error: the password must not be empty\n"


@contextmanager
def farm_on(cli_env: dict[str, str], broker: str) -> Iterator[tuple[Settings, Database]]:
    """The settings and migrated database of ``cli_env``, on the embedded broker or on a Redis
    database of the test's own (``cli_env`` is pointed at it)."""
    with private_redis_db(REDIS_URL) if broker == "redis" else _nothing() as url:
        cli_env["SVDFARM_BROKER_URL"] = url or ""
        settings = load_settings(cli_env)
        upgrade(settings.database_url)
        db = Database(settings.database_url)
        try:
            yield settings, db
        finally:
            db.dispose()


@contextmanager
def _nothing() -> Iterator[str]:
    """No broker URL: the embedded broker of the data folder."""
    yield ""


BROKERS = [
    pytest.param("embedded", id="embedded"),
    pytest.param("redis", id="redis", marks=[pytest.mark.redis, needs_redis]),
]


def send(settings: Settings, *jobs: tuple[uuid.UUID, str]) -> None:
    """Put each ``(job id, queue)`` on the broker, as a submit does after its commit."""
    celery = create_celery(settings)
    try:
        for job_id, queue in jobs:
            enqueue_render(celery, str(job_id), queue)
    finally:
        celery.close()


def held(settings: Settings) -> dict[str, int]:
    """Messages the broker holds, by queue, for the queues that hold any."""
    names = ["svd.default", *all_queues(), *all_queues(catalog_keys(settings.catalog))]
    return {q: n for q, n in queue_depths(settings, names).items() if n}


def run(cli_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``svdfarm ARGS`` as a subprocess, its stdin not a terminal."""
    return subprocess.run(
        [*SVDFARM, *args], env=cli_env, input="", capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("broker", BROKERS)
def test_queues_count_waiting_jobs_not_the_messages_of_canceled_ones(
    cli_env: dict[str, str], broker: str
) -> None:
    """Two jobs sent to a queue, one canceled while queued: its message stays in the broker
    until a worker drops it, so ``svdfarm queues`` says one job waits, beside two messages."""
    with farm_on(cli_env, broker) as (settings, db):
        kept, canceled = (add_job(db, settings, JobState.QUEUED) for _ in range(2))
        send(settings, (kept, QUEUE), (canceled, QUEUE))
        with db.session() as session:
            assert cancel_job(session, canceled, by=By(Actor.CLI)).done
        done = run(cli_env, "queues", "--json")
        assert done.returncode == 0, done.stderr
        rows = {row["queue"]: row for row in json.loads(done.stdout)}
        assert rows == {QUEUE: {"queue": QUEUE, "waiting": 1, "messages": 2, "workers": []}}
        table = run(cli_env, "queues")
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[1].split() == [QUEUE, "1", "2", "-"]
        assert "canceled while queued" in table.stdout


@pytest.mark.parametrize("broker", BROKERS)
def test_queues_purge_empties_the_broker_and_cancels_the_queued_jobs(
    cli_env: dict[str, str], broker: str
) -> None:
    """Without ``--yes`` (and no terminal to ask) nothing is purged; with it every message of
    the farm's queues goes and the queued jobs are canceled, each with a ``canceled`` event
    saying ``purged``; a running job and a canceled one are left as they are."""
    with farm_on(cli_env, broker) as (settings, db):
        first, other, unsent, stale = (add_job(db, settings, JobState.QUEUED) for _ in range(4))
        with db.begin() as session:
            session.execute(update(Job).where(Job.id == other).values(queue=OTHER_QUEUE))
        running = add_job(db, settings, JobState.RUNNING)
        send(settings, (first, QUEUE), (other, OTHER_QUEUE), (stale, QUEUE))
        with db.session() as session:
            assert cancel_job(session, stale, by=By(Actor.CLI)).done
        assert held(settings) == {QUEUE: 2, OTHER_QUEUE: 1}

        refused = run(cli_env, "queues", "purge")
        assert refused.returncode == 1
        assert "3 message(s)" in refused.stderr and "cancel 3 queued job(s)" in refused.stderr
        assert "--yes" in refused.stderr
        assert held(settings) == {QUEUE: 2, OTHER_QUEUE: 1}

        done = run(cli_env, "queues", "purge", "--yes", "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["messages"] == {QUEUE: 2, OTHER_QUEUE: 1}
        assert sorted(report["canceled"]) == sorted(str(j) for j in (first, other, unsent))
        assert held(settings) == {}
        for job_id in (first, other, unsent):
            job = read_job(db, job_id)
            assert job is not None and job.state is JobState.CANCELED
            with db.session() as session:
                last = events_of(session, job_id)[-1]
            assert last.type is EventType.CANCELED and last.details == {"reason": "purged"}
            assert last.actor_kind is Actor.CLI
        assert (job := read_job(db, running)) is not None and job.state is JobState.RUNNING
        assert (job := read_job(db, stale)) is not None and job.state is JobState.CANCELED

        again = run(cli_env, "queues", "purge", "--yes")
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines()[-1].startswith("purged 0 message(s)")
        assert again.stdout.splitlines()[-1].endswith("canceled 0 queued job(s)")


def test_db_says_the_revision_it_left_the_database_at(cli_env: dict[str, str]) -> None:
    """``svdfarm db upgrade`` and ``downgrade`` name the revision the database is at after
    them (not the word "upgrade"), and whether it is the newest."""
    import re

    up = subprocess.run([*SVDFARM, "db", "upgrade"], env=cli_env, capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    newest = re.search(r" is at revision ([0-9a-f]{12}) \(the newest\)$", up.stdout.strip())
    assert newest, up.stdout
    down = subprocess.run(
        [*SVDFARM, "db", "downgrade"], env=cli_env, capture_output=True, text=True
    )
    assert down.returncode == 0, down.stderr
    older = re.search(r" is at revision ([0-9a-f]{12})$", down.stdout.strip())
    assert older and older[1] != newest[1], down.stdout


def test_db_recount_counts_the_metrics_totals_again(cli_env: dict[str, str]) -> None:
    """``svdfarm db recount`` replaces /metrics' kept totals with a count of the rows: a
    total written wrong (as a bulk load with the triggers off leaves them) is put right."""
    from sqlalchemy import create_engine, text

    subprocess.run([*SVDFARM, "db", "upgrade"], env=cli_env, check=True, capture_output=True)
    engine = create_engine(f"sqlite:///{Path(cli_env['SVDFARM_DATA_DIR']) / 'svdfarm.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO metric_counts VALUES ('jobs', 'failed', 41)"))
        done = subprocess.run(
            [*SVDFARM, "db", "recount"], env=cli_env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("/metrics' totals counted again")
        with engine.connect() as conn:
            kept = conn.execute(text("SELECT name, labels, value FROM metric_counts")).all()
        assert kept == [("duration_sum", "", 0.0)]
    finally:
        engine.dispose()


def test_reap_says_why_it_judged_no_worker_lost(cli_env: dict[str, str]) -> None:
    """With no worker beating, ``svdfarm reap`` says it looked for no lost worker and why,
    instead of a bare "requeued: 0"; ``--json`` carries the same reason."""
    subprocess.run([*SVDFARM, "db", "upgrade"], env=cli_env, check=True, capture_output=True)
    done = subprocess.run([*SVDFARM, "reap"], env=cli_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("lost workers not looked for: no worker has sent a heartbeat"), first
    assert "requeued: 0" in done.stdout
    as_json = subprocess.run(
        [*SVDFARM, "reap", "--json"], env=cli_env, capture_output=True, text=True
    )
    assert json.loads(as_json.stdout)["skipped"].startswith("no worker has sent a heartbeat")
