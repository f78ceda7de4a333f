"""No secret in Celery's remote control: a real worker on PostgreSQL and Redis, both reached
with a password, and the farm's secret key and admin password set, asked by the standard
``celery -A svdfarm inspect`` commands (what Flower's worker pages show too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from svdfarm.db import Database, upgrade
from tests.conftest import REDIS_URL, fresh_database, make_settings, needs_postgres, needs_redis
from tests.processes import private_redis_db, start_worker, worker_env
from tests.rows import wait_for_worker

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.redis,
    needs_postgres,
    needs_redis,
]

#: One marker per secret. Local PostgreSQL trusts any password and Redis without one accepts
#: any, so the worker runs with these as it would with real ones.
SECRET_KEY = "secret-key-marker-7f3a9c0d2e4b6a8c1f3e5d7b9a0c2e4f"
ADMIN_PASSWORD = "admin-password-marker-51be"
DB_PASSWORD = "db-password-marker-e0d4"
BROKER_PASSWORD = "broker-password-marker-2c81"
MARKERS = ["secret-key-marker", "admin-password-marker", DB_PASSWORD, BROKER_PASSWORD]
#: ``inspect`` commands whose answers come from the worker: its config (without and with
#: Celery's defaults), its bug report, its statistics, its queues, tasks and probe.
COMMANDS = [
    ["conf"],
    ["conf", "true"],
    ["report"],
    ["stats"],
    ["active_queues"],
    ["registered"],
    ["capabilities"],
]


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` as its password (after its user name, if any)."""
    scheme, rest = url.split("://", 1)
    user = rest.split("@", 1)[0] if "@" in rest else ""
    return f"{scheme}://{user}:{password}@{rest.split('@', 1)[-1]}"


def test_no_inspect_answer_holds_a_secret(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Every answer the worker gives to ``inspect`` (config, report, stats, queues, tasks,
    capabilities) names its broker but holds none of the four secrets."""
    with fresh_database("postgresql", tmp_path) as url, private_redis_db(REDIS_URL) as broker:
        settings = make_settings(
            tmp_path / "var",
            with_password(url, DB_PASSWORD),
            tiny_model_dir,
            SVDFARM_BROKER_URL=with_password(broker, BROKER_PASSWORD),
            SVDFARM_SECRET_KEY=SECRET_KEY,
            SVDFARM_ADMIN_PASSWORD=ADMIN_PASSWORD,
        )
        assert DB_PASSWORD in settings.database_url and BROKER_PASSWORD in settings.broker_url
        upgrade(settings.database_url)
        secrets = {"SVDFARM_SECRET_KEY": SECRET_KEY, "SVDFARM_ADMIN_PASSWORD": ADMIN_PASSWORD}
        worker = start_worker(settings, tmp_path, "secrets", cwd=tmp_path, **secrets)
        db = Database(settings.database_url)
        try:
            wait_for_worker(db, worker.hostname, worker.process, worker.text)
            env = worker_env(settings, **secrets)
            answers = {}
            for command in COMMANDS:
                done = subprocess.run(
                    [sys.executable, "-m", "celery", "-A", "svdfarm", "inspect", *command]
                    + ["--json", "--timeout", "20", "-d", worker.hostname],
                    env=env,
                    cwd=tmp_path,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert done.returncode == 0, (command, done.stdout, done.stderr)
                found = [m for m in MARKERS if m in done.stdout + done.stderr]
                assert not found, f"inspect {' '.join(command)} shows {found}:\n{done.stdout}"
                answers[" ".join(command)] = json.loads(done.stdout)[worker.hostname]
        finally:
            worker.stop(60)
            db.dispose()
        assert "svdfarm_settings" not in answers["conf"]
        assert "worker_pool" in answers["conf true"] and "worker_pool" not in answers["conf"]
        assert answers["conf"]["broker_url"].endswith("@127.0.0.1:6379/" + broker.rsplit("/")[-1])
        assert "svd.cpu.fp32.8g" in json.dumps(answers["conf"]["task_queues"])
        assert "password" not in answers["stats"]["broker"]
        assert "svdfarm.render" in answers["registered"]
