"""``svdfarm users``, ``svdfarm keys`` (:mod:`cli.users`) and ``svdfarm jobs priority``
(:mod:`cli.jobs`) through ``cli.main``, on real rows in SQLite and PostgreSQL.

Each command's effect is read back from the database: the users and keys rows, what
:func:`svdfarm.users.authenticate_key` accepts, a job's priority and its events.
"""

from __future__ import annotations

import io
import sys
import uuid

import pytest
from sqlalchemy import func, select, update

from cli import main
from svdfarm.db import Database
from svdfarm.lifecycle import events_of
from svdfarm.models import ApiKey, Job, User, utcnow
from svdfarm.settings import Settings
from svdfarm.states import Actor, EventType, JobState
from svdfarm.users import authenticate_key, check_login, find_user
from tests.cli.conftest import OPERATOR, svdfarm
from tests.conftest import DATABASES
from tests.rows import add_job, read_job


def stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """Give the command ``text`` on a standard input that is not a terminal."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def user(db: Database, name: str) -> User | None:
    """The user row named ``name``, read in a fresh session."""
    with db.session() as session:
        return find_user(session, name)


def count(db: Database, model: type[User] | type[ApiKey]) -> int:
    """How many rows ``model``'s table holds."""
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def authenticate(db: Database, key: str) -> str | None:
    """The name of the user ``key`` authenticates, or None; committed."""
    with db.begin() as session:
        found = authenticate_key(session, key)
        return found.name if found is not None else None


# ---- users -----------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_add_list_disable_enable(
    db: Database,
    farm_env: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``add`` records the user with their limits (and a piped password); ``list`` shows them;
    ``disable`` and ``enable`` set and clear ``disabled_at``."""
    assert svdfarm(
        capsys,
        "users",
        "add",
        "alice",
        "--max-queued",
        "5",
        "--max-running",
        "2",
        "--max-priority",
        "3",
        "--share",
        "2.5",
    ) == (0, "User 'alice' added.\n", "")
    alice = user(db, "alice")
    assert alice is not None and not alice.is_admin and alice.password_hash is None
    assert (alice.max_queued, alice.max_running, alice.max_priority, alice.share) == (5, 2, 3, 2.5)

    stdin(monkeypatch, "s3cret pass\n")
    assert svdfarm(capsys, "users", "add", "bob@ops", "--admin", "--password") == (
        0,
        "User 'bob@ops' added (admin).\n",
        "",
    )
    bob = user(db, "bob@ops")
    assert bob is not None and bob.is_admin and bob.max_queued is None and bob.max_priority == 0
    assert "s3cret" not in (bob.password_hash or "")
    with db.session() as session:
        assert check_login(session, "bob@ops", "s3cret pass") is not None
        assert check_login(session, "bob@ops", "s3cret") is None

    status, out, err = svdfarm(capsys, "users", "list")
    assert (status, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split()[:8] == [
        "name",
        "admin",
        "disabled",
        "max_queued",
        "max_running",
        "max_priority",
        "share",
        "keys",
    ]
    assert [r.split()[:8] for r in rows] == [
        ["alice", "no", "-", "5", "2", "3", "2.5", "0"],
        ["bob@ops", "yes", "-", "-", "-", "0", "1", "0"],
    ]

    assert svdfarm(capsys, "users", "disable", "alice")[0] == 0
    disabled = user(db, "alice")
    assert disabled is not None and disabled.disabled_at is not None
    status, out, _ = svdfarm(capsys, "users", "list")
    assert out.splitlines()[1].split()[2] == disabled.disabled_at.strftime("%Y-%m-%d")
    assert svdfarm(capsys, "users", "enable", "alice") == (0, "User 'alice' is enabled.\n", "")
    enabled = user(db, "alice")
    assert enabled is not None and enabled.disabled_at is None


def test_list_without_users(farm_env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty farm lists its header and says there is no user."""
    status, out, _ = svdfarm(capsys, "users", "list")
    assert status == 0 and out.splitlines()[-1] == "(no users)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-bad"], "arguments are required: NAME"),  # argparse: an option, not a name
        (["bad name"], "User name 'bad name' is not usable"),
        (["x" * 65], "is not usable: 1 to 64 letters"),
        (["ok", "--max-queued", "0"], "The max queued limit must be at least 1"),
        (["ok", "--max-running", "-1"], "The max running limit must be at least 1"),
        (["ok", "--max-priority", "11"], "The max priority must be -10 to 10."),
        (["ok", "--max-priority", "-11"], "The max priority must be -10 to 10."),
        (["ok", "--share", "0"], "The share must be between 0.01 and 1000."),
        (["ok", "--share", "1001"], "The share must be between 0.01 and 1000."),
    ],
)
def test_add_refuses_bad_names_and_limits(
    args: list[str],
    message: str,
    db: Database,
    farm_env: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bad name or a limit out of range exits 2 with one line on stderr, writing nothing."""
    if args == ["-bad"]:
        with pytest.raises(SystemExit) as done:
            main(["users", "add", *args])
        assert done.value.code == 2 and message in capsys.readouterr().err
    else:
        status, out, err = svdfarm(capsys, "users", "add", *args)
        assert (status, out) == (2, "")
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert count(db, User) == 0


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_add_refuses_a_taken_name_and_a_bad_password(
    db: Database,
    farm_env: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second user of the same name, an empty password and two passwords that differ exit 2,
    writing nothing."""
    assert svdfarm(capsys, "users", "add", "carol", "--share", "3")[0] == 0
    assert svdfarm(capsys, "users", "add", "carol", "--admin") == (
        2,
        "",
        "error: A user named 'carol' already exists.\n",
    )
    carol = user(db, "carol")
    assert carol is not None and not carol.is_admin and carol.share == 3

    stdin(monkeypatch, "\n")
    assert svdfarm(capsys, "users", "add", "dave", "--password") == (
        2,
        "",
        "error: The password must not be empty.\n",
    )
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert svdfarm(capsys, "users", "add", "dave", "--password") == (
        2,
        "",
        "error: The two passwords differ.\n",
    )
    assert user(db, "dave") is None and count(db, User) == 1


def test_disable_and_enable_refuse_an_unknown_user(
    farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Naming no user exits 2 and says how to list them."""
    for action in ("disable", "enable"):
        status, out, err = svdfarm(capsys, "users", action, "nobody")
        assert (status, out) == (2, "")
        assert err == "error: No user named 'nobody' (svdfarm users list shows them).\n"


def test_unknown_arguments_are_refused(
    farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse refuses arguments no command takes, with exit status 2."""
    for argv in (
        ["users", "list", "--all"],
        ["users", "add", "erin", "--quota", "3"],
        ["keys", "create", "erin", "extra"],
        ["keys", "revoke"],
        ["jobs", "priority", str(uuid.uuid4()), "1", "--back"],
    ):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2, argv
        assert "error:" in capsys.readouterr().err


# ---- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_keys_create_list_revoke(
    db: Database, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """``create`` prints the key alone on its last line and it authenticates its user;
    ``list`` never shows a secret or its hash; ``revoke`` makes the key fail at once."""
    assert svdfarm(capsys, "users", "add", "frank")[0] == 0
    assert svdfarm(capsys, "users", "add", "grace")[0] == 0
    status, out, err = svdfarm(capsys, "keys", "create", "frank", "--label", "render box")
    assert (status, err) == (0, "")
    *said, key = out.splitlines()
    assert len(said) == 1 and "shown once" in said[0]
    assert key.startswith("svdf_") and " " not in key
    assert authenticate(db, key) == "frank"
    status, out, _ = svdfarm(capsys, "keys", "create", "grace")
    other = out.splitlines()[-1]
    assert authenticate(db, other) == "grace"

    with db.session() as session:
        rows = {k.id: k for k in session.scalars(select(ApiKey))}
    assert len(rows) == 2
    frank_id = key.split("_")[1]
    secret = key.split("_", 2)[2]
    status, out, err = svdfarm(capsys, "keys", "list")
    assert (status, err) == (0, "")
    header, *lines = out.splitlines()
    assert header.split()[:4] == ["id", "user", "label", "created"]
    assert sorted(line.split()[:2][1] for line in lines) == ["frank", "grace"]
    for row in rows.values():
        assert row.secret_hash not in out
    assert secret not in out and key not in out and other not in out
    status, out, _ = svdfarm(capsys, "keys", "list", "frank")
    [line] = out.splitlines()[1:]
    assert line.split()[:4] == [frank_id, "frank", "render", "box"]
    assert line.split()[-1] == "-"  # not revoked
    status, out, _ = svdfarm(capsys, "users", "list")
    assert [r.split()[7] for r in out.splitlines()[1:]] == ["1", "1"]

    assert svdfarm(capsys, "keys", "revoke", frank_id) == (
        0,
        f"API key {frank_id} of 'frank' is revoked.\n",
        "",
    )
    assert authenticate(db, key) is None
    assert authenticate(db, other) == "grace"
    with db.session() as session:
        revoked = session.get(ApiKey, frank_id)
        assert revoked is not None and revoked.revoked_at is not None
    status, out, _ = svdfarm(capsys, "keys", "list", "frank")
    assert out.splitlines()[1].split()[-2] == revoked.revoked_at.strftime("%Y-%m-%d")
    status, out, _ = svdfarm(capsys, "users", "list")
    assert [r.split()[7] for r in out.splitlines()[1:]] == ["0", "1"]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_keys_refuse_unknown_or_disabled_users_and_unknown_keys(
    db: Database, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key for no user or a disabled one, a list of no user, and revoking no key exit 2
    with one line on stderr; no key is written. A disabled user's key stops working."""
    assert svdfarm(capsys, "users", "add", "heidi")[0] == 0
    key = svdfarm(capsys, "keys", "create", "heidi")[1].splitlines()[-1]
    assert svdfarm(capsys, "users", "disable", "heidi")[0] == 0
    assert authenticate(db, key) is None
    for argv, message in (
        (["keys", "create", "nobody"], "No user named 'nobody'"),
        (["keys", "create", "heidi"], "User 'heidi' is disabled"),
        (["keys", "list", "nobody"], "No user named 'nobody'"),
        (["keys", "revoke", "deadbeef"], "No API key 'deadbeef'"),
    ):
        status, out, err = svdfarm(capsys, *argv)
        assert (status, out) == (2, ""), argv
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert count(db, ApiKey) == 1
    assert svdfarm(capsys, "users", "enable", "heidi")[0] == 0
    assert authenticate(db, key) == "heidi"


# ---- jobs priority ---------------------------------------------------------------------------


def priority_events(db: Database, job_id: uuid.UUID) -> list[tuple[Actor, str, dict[str, object]]]:
    """The job's priority changes: who made them and their details."""
    with db.session() as session:
        return [
            (e.actor_kind, e.actor, e.details)
            for e in events_of(session, job_id)
            if e.type is EventType.PRIORITY_CHANGED
        ]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_jobs_priority_changes_a_queued_job(
    db: Database, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A number sets the priority (negative ones too), ``--front`` the highest; each change is
    committed with an event by ``cli:<user>``."""
    job_id = add_job(db, farm_env, JobState.QUEUED, sent=False)
    assert svdfarm(capsys, "jobs", "priority", str(job_id), "5") == (
        0,
        f"Job {job_id} priority is now 5.\n",
        "",
    )
    job = read_job(db, job_id)
    assert job is not None and job.priority == 5
    assert svdfarm(capsys, "jobs", "priority", str(job_id), "-3")[0] == 0
    job = read_job(db, job_id)
    assert job is not None and job.priority == -3
    assert svdfarm(capsys, "jobs", "priority", str(job_id), "--front") == (
        0,
        f"Job {job_id} moved to the front: priority 10.\n",
        "",
    )
    job = read_job(db, job_id)
    assert job is not None and job.priority == 10 and job.state is JobState.QUEUED
    assert priority_events(db, job_id) == [
        (Actor.CLI, OPERATOR, {"from": 0, "to": 5, "front": False}),
        (Actor.CLI, OPERATOR, {"from": 5, "to": -3, "front": False}),
        (Actor.CLI, OPERATOR, {"from": -3, "to": 10, "front": True}),
    ]


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_jobs_priority_refuses_bad_input_and_jobs_not_waiting(
    db: Database, farm_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out of range, neither or both of N and ``--front``, a bad id, an ended job and a job
    already sent to a worker exit 2 with the reason; no priority changes."""
    queued = add_job(db, farm_env, JobState.QUEUED, sent=False)
    failed = add_job(db, farm_env, JobState.FAILED)
    sent = add_job(db, farm_env, JobState.QUEUED, sent=False)
    with db.begin() as session:
        session.execute(update(Job).where(Job.id == sent).values(published_at=utcnow()))
    missing = uuid.uuid4()
    for argv, message in (
        ([str(queued), "11"], "A priority is an integer from -10 to 10."),
        ([str(queued), "-11"], "A priority is an integer from -10 to 10."),
        ([str(queued)], "give either a priority N (-10 to 10) or --front, not both"),
        ([str(queued), "3", "--front"], "give either a priority N (-10 to 10) or --front"),
        (["not-a-job", "1"], "'not-a-job' is not a job id (job ids are UUIDs)."),
        ([str(missing), "1"], f"No job with id {missing}."),
        ([str(failed), "1"], f"Job {failed} is failed: reprioritize is allowed only from"),
        ([str(sent), "--front"], "it was already sent to a worker"),
    ):
        status, out, err = svdfarm(capsys, "jobs", "priority", *argv)
        assert (status, out) == (2, ""), argv
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    for job_id in (queued, failed, sent):
        job = read_job(db, job_id)
        assert job is not None and job.priority == 0
        assert priority_events(db, job_id) == []
