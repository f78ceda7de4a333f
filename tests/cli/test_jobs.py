"""``svdfarm jobs`` (:mod:`cli.jobs`) through ``cli.main``, on real rows in SQLite and
PostgreSQL, with the filesystem broker's messages read back.

The command reads its settings from the environment, as it does in a terminal: the
``farm_env`` fixture points it at the test's data folder and database.
"""

from __future__ import annotations

import json
import uuid

import pytest

from svdfarm.actions import FP32_DTYPES
from svdfarm.db import Database
from svdfarm.lifecycle import events_of
from svdfarm.settings import Settings
from svdfarm.states import Actor, EventType, JobState
from tests.cli.conftest import OPERATOR, svdfarm
from tests.conftest import DATABASES
from tests.rows import QUEUE, add_job, broker_messages, read_job

STATES = "queued, running, succeeded, failed, cancel_requested, canceled"


# ---- list ------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_list_shows_the_newest_first_filtered_and_limited(
    db: Database, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table lists the newest job first; ``--state`` and ``--limit`` narrow it; ``--json``
    gives each job's columns."""
    failed = add_job(db, farm_env, JobState.FAILED)
    queued = add_job(db, farm_env, JobState.QUEUED)
    done = add_job(db, farm_env, JobState.SUCCEEDED)

    status, out, err = svdfarm(capsys, "jobs", "list")
    assert (status, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split()[:5] == ["id", "state", "progress", "size", "queue"]
    assert [row.split()[0] for row in rows] == [str(done), str(queued), str(failed)]
    assert rows[2].split()[1:5] == ["failed", "50%", "4f", "64x64"]
    assert QUEUE in rows[2]

    status, out, _ = svdfarm(capsys, "jobs", "list", "--state", "failed", "--json")
    assert status == 0
    [job] = json.loads(out)
    assert (job["id"], job["state"], job["queue"]) == (str(failed), "failed", QUEUE)
    assert job["error"].startswith("CUDA out of memory")
    assert job["created_at"].endswith("+00:00")

    status, out, _ = svdfarm(capsys, "jobs", "list", "--limit", "1", "--json")
    assert [j["id"] for j in json.loads(out)] == [str(done)]

    status, out, _ = svdfarm(capsys, "jobs", "list", "--state", "canceled")
    assert status == 0 and out.splitlines()[-1] == "(no canceled jobs)"


def test_list_refuses_an_unknown_state_and_a_limit_below_one(
    farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad arguments exit 2 with one line on stderr; an unknown state lists the real ones."""
    assert svdfarm(capsys, "jobs", "list", "--state", "broken") == (
        2,
        "",
        f"error: unknown state 'broken': use one of {STATES}\n",
    )
    assert svdfarm(capsys, "jobs", "list", "--limit", "0") == (
        2,
        "",
        "error: --limit must be at least 1, got 0\n",
    )


# ---- show ------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_show_prints_the_job_its_attempts_and_events(
    db: Database, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a cancel from the terminal, ``show`` has the job's fields, its attempt and the
    ``canceled`` event by ``cli:<user>``, as a table and as JSON."""
    job_id = add_job(db, farm_env, JobState.QUEUED)
    assert svdfarm(capsys, "jobs", "cancel", str(job_id))[0] == 0

    status, out, err = svdfarm(capsys, "jobs", "show", str(job_id))
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"job {job_id}"
    assert lines[1].split()[:2] == ["state", "canceled"]
    assert any(line.split()[:2] == ["input", "cat.png"] for line in lines)
    assert "attempts: none" in lines
    event = lines[lines.index("events") + 1].split()
    assert event[2:4] == ["canceled", f"cli:{OPERATOR}"]

    status, out, _ = svdfarm(capsys, "jobs", "show", str(job_id), "--json")
    document = json.loads(out)
    assert (document["id"], document["state"], document["attempts"]) == (
        str(job_id),
        "canceled",
        [],
    )
    assert [(e["type"], e["actor"]) for e in document["events"]] == [
        ("canceled", f"cli:{OPERATOR}")
    ]

    failed = add_job(db, farm_env, JobState.FAILED)
    status, out, _ = svdfarm(capsys, "jobs", "show", str(failed), "--json")
    [attempt] = json.loads(out)["attempts"]
    assert (attempt["number"], attempt["worker"], attempt["error_class"]) == (
        1,
        "gpu1@farm",
        "out_of_memory",
    )
    status, out, _ = svdfarm(capsys, "jobs", "show", str(failed))
    assert "#1   gpu1@farm" in out and "failed (out of memory)" in out


@pytest.mark.parametrize("action", ["show", "cancel", "requeue", "delete"])
def test_every_action_refuses_a_bad_or_unknown_id(
    action: str, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed id and an id of no job exit 2 with the reason, changing nothing."""
    assert svdfarm(capsys, "jobs", action, "not-a-job") == (
        2,
        "",
        "error: 'not-a-job' is not a job id (job ids are UUIDs).\n",
    )
    missing = uuid.uuid4()
    assert svdfarm(capsys, "jobs", action, str(missing)) == (
        2,
        "",
        f"error: No job with id {missing}.\n",
    )


# ---- cancel, requeue, delete -----------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_cancel_a_queued_job_then_refuse_a_second_cancel(
    db: Database, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A queued job is canceled at once (exit 0); canceling it again is refused (exit 1)."""
    job_id = add_job(db, farm_env, JobState.QUEUED)
    assert svdfarm(capsys, "jobs", "cancel", str(job_id)) == (0, f"Job {job_id} is canceled.\n", "")
    job = read_job(db, job_id)
    assert job is not None and job.state is JobState.CANCELED
    status, out, err = svdfarm(capsys, "jobs", "cancel", str(job_id))
    assert (status, out) == (1, "")
    assert err == f"error: Job {job_id} is canceled: there is nothing to cancel.\n"


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_requeue_puts_a_failed_job_back_with_the_overrides(
    db: Database, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """``requeue`` queues a failed job again and publishes it; ``--fp32`` routes it to an fp32
    queue with every component in fp32; ``--queue`` and ``--no-casts`` are kept."""
    job_id = add_job(db, farm_env, JobState.FAILED)
    status, out, err = svdfarm(capsys, "jobs", "requeue", str(job_id))
    assert (status, out, err) == (0, f"Job {job_id} requeued on {QUEUE}.\n", "")
    job = read_job(db, job_id)
    assert job is not None and job.state is JobState.QUEUED and job.error is None
    assert broker_messages(farm_env) == [(QUEUE, str(job_id))]
    with db.session() as session:
        requeued = [e for e in events_of(session, job_id) if e.type is EventType.REQUEUED]
    assert [(e.actor_kind, e.actor) for e in requeued] == [(Actor.CLI, OPERATOR)]

    fp32 = add_job(db, farm_env, JobState.FAILED)
    assert svdfarm(capsys, "jobs", "requeue", str(fp32), "--fp32", "--no-casts")[0] == 0
    job = read_job(db, fp32)
    assert job is not None and job.state is JobState.QUEUED
    assert (job.dtypes, job.precision, job.casts) == (FP32_DTYPES, "auto", False)
    assert job.queue.split(".")[2] == "fp32"

    pinned = add_job(db, farm_env, JobState.FAILED)
    queue = "svd.cpu.fp32.8g.tiny"
    status, out, _ = svdfarm(capsys, "jobs", "requeue", str(pinned), "--queue", queue)
    assert status == 0 and queue in out
    assert broker_messages(farm_env)[-1] == (queue, str(pinned))


def test_requeue_refuses_a_bad_queue_and_a_job_that_did_not_end(
    db: Database, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A queue outside the naming scheme exits 2; a queued job is refused with exit 1; neither
    changes the job nor sends a message."""
    failed = add_job(db, farm_env, JobState.FAILED)
    status, out, err = svdfarm(capsys, "jobs", "requeue", str(failed), "--queue", "fast")
    assert (status, out) == (2, "")
    assert err.startswith("error: 'fast' is not an svdfarm queue: expected svd.<device>")
    assert err.count("\n") == 1
    queued = add_job(db, farm_env, JobState.QUEUED)
    status, out, err = svdfarm(capsys, "jobs", "requeue", str(queued))
    assert (status, out) == (1, "")
    assert err == (
        f"error: Job {queued} is queued: only failed or canceled jobs can be requeued.\n"
    )
    job = read_job(db, failed)
    assert job is not None and job.state is JobState.FAILED
    assert broker_messages(farm_env) == []


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_delete_removes_an_ended_job_and_its_files_but_not_a_running_one(
    db: Database, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed job goes with its attempts and input file (exit 0); a running one is refused
    (exit 1) and stays."""
    failed = add_job(db, farm_env, JobState.FAILED)
    folder = farm_env.storage_dir / str(failed)
    assert (folder / "input.png").is_file()
    assert svdfarm(capsys, "jobs", "delete", str(failed)) == (
        0,
        f"Job {failed} deleted with its files.\n",
        "",
    )
    assert read_job(db, failed) is None and not folder.exists()

    running = add_job(db, farm_env, JobState.RUNNING)
    status, out, err = svdfarm(capsys, "jobs", "delete", str(running))
    assert (status, out) == (1, "")
    assert err == (
        f"error: Job {running} is running: cancel it and delete it once it has stopped.\n"
    )
    assert read_job(db, running) is not None
