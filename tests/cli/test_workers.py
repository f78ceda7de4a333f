"""``svdfarm workers list`` and ``svdfarm workers clear NAME`` (:mod:`cli.workers`), run in
this process on the test's database."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from svdfarm.db import Database
from svdfarm.models import Worker, utcnow
from svdfarm.settings import Settings
from svdfarm.states import ErrorClass
from svdfarm.worker_health import check_worker
from tests.cli.conftest import svdfarm
from tests.conftest import DATABASES
from tests.rows import QUEUE, add_job, add_worker


@pytest.mark.parametrize("database_url", DATABASES, indirect=True)
def test_list_shows_the_flag_and_clear_clears_it(
    farm_env: Settings, db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker flagged for three storage failures is listed as FLAGGED with its reason;
    ``clear`` clears it (0), a second clear says it is not flagged (1), an unknown name is
    bad input (2)."""
    add_worker(db, "gpu1@farm", [QUEUE])
    add_worker(db, "gpu2@farm", [QUEUE], loaded_model="tiny")
    jobs = [
        add_job(
            db,
            farm_env,
            error_class=ErrorClass.STORAGE,
            worker="gpu1@farm",
            error="No space left on device",
            finished_at=utcnow() - timedelta(minutes=m),
        )
        for m in (3, 2, 1)
    ]
    with db.begin() as session:
        assert check_worker(session, "gpu1@farm") is not None
    status, out, _ = svdfarm(capsys, "workers", "list")
    assert status == 0
    table = out.split("\n\n")[0].splitlines()
    lines = {line.split()[0]: line.split() for line in table}
    assert lines["gpu1@farm"][1:4] == ["idle", "FLAGGED", "-"]
    assert lines["gpu2@farm"][1:4] == ["idle", "-", "tiny"]  # the model it holds loaded
    assert "svdfarm workers clear gpu1@farm" in out
    assert all(str(job_id) in out for job_id in jobs)
    status, out, _ = svdfarm(capsys, "workers", "list", "--json")
    listed = {row["name"]: row for row in json.loads(out)}
    assert listed["gpu1@farm"]["flagged_at"] and listed["gpu2@farm"]["flagged_at"] is None
    assert [listed[n]["loaded_model"] for n in ("gpu1@farm", "gpu2@farm")] == [None, "tiny"]
    assert "storage" in listed["gpu1@farm"]["flagged_reason"]

    assert svdfarm(capsys, "workers", "clear", "gpu1@farm")[:2] == (
        0,
        "worker gpu1@farm: flag cleared; it takes jobs again at its next heartbeat\n",
    )
    with db.session() as session:
        row = session.get(Worker, "gpu1@farm")
        assert row is not None and row.flagged_at is None
    assert "FLAGGED" not in svdfarm(capsys, "workers", "list")[1]
    status, _, err = svdfarm(capsys, "workers", "clear", "gpu1@farm")
    assert status == 1 and "not flagged" in err
    status, _, err = svdfarm(capsys, "workers", "clear", "nobody@farm")
    assert status == 2 and "no worker is named 'nobody@farm'" in err
