"""No secret in Celery's remote control: a real worker on PostgreSQL and Redis or RabbitMQ, both
reached with a password, and the farm's secret key and admin password set, asked by the
standard ``celery -A svdfarm inspect`` commands (what Flower's worker pages show too)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from svdfarm.db import Database, upgrade
from tests.conftest import BROKERS, fresh_database, make_settings, needs_postgres, private_broker
from tests.processes import rabbitmqctl, start_worker, worker_env
from tests.rows import wait_for_worker

pytestmark = [pytest.mark.slow, pytest.mark.postgres, needs_postgres]

#: One marker per secret. Local PostgreSQL trusts any password and Redis without one accepts
#: any, so the worker runs with these as it would with real ones; on RabbitMQ the test's
#: broker user is given this password for the test (and its own back afterwards).
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


@pytest.mark.parametrize("kind", BROKERS)
def test_no_inspect_answer_holds_a_secret(kind: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """Every answer the worker gives to ``inspect`` (config, report, stats, queues, tasks,
    capabilities) names its broker but holds none of the four secrets."""
    with (
        fresh_database("postgresql", tmp_path) as url,
        private_broker(kind) as private,
        _with_broker_password(private, BROKER_PASSWORD) as broker,
    ):
        settings = make_settings(
            tmp_path / "var",
            with_password(url, DB_PASSWORD),
            tiny_model_dir,
            SVDFARM_BROKER_URL=broker,
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
            # Every command at once (each is a process of its own that mostly imports): the
            # worker answers them one by one all the same.
            running = [
                (
                    command,
                    subprocess.Popen(
                        [sys.executable, "-m", "celery", "-A", "svdfarm", "inspect", *command]
                        + ["--json", "--timeout", "20", "-d", worker.hostname],
                        env=env,
                        cwd=tmp_path,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
                for command in COMMANDS
            ]
            outputs = []
            try:
                for command, process in running:
                    stdout, stderr = process.communicate(timeout=120)
                    outputs.append((command, process.returncode, stdout, stderr))
            finally:
                for _, process in running:
                    if process.poll() is None:
                        process.kill()
                        process.communicate()
            answers = {}
            for command, returncode, stdout, stderr in outputs:
                assert returncode == 0, (command, stdout, stderr)
                found = [m for m in MARKERS if m in stdout + stderr]
                assert not found, f"inspect {' '.join(command)} shows {found}:\n{stdout}"
                answers[" ".join(command)] = json.loads(stdout)[worker.hostname]
        finally:
            worker.stop(60)
            db.dispose()
        assert "svdfarm_settings" not in answers["conf"]
        assert "worker_pool" in answers["conf true"] and "worker_pool" not in answers["conf"]
        assert answers["conf"]["broker_url"].endswith(broker.rsplit("@", 1)[-1])
        assert "svd.cpu.fp32.8g" in json.dumps(answers["conf"]["task_queues"])
        assert "password" not in answers["stats"]["broker"]
        assert "svdfarm.render" in answers["registered"]


@contextmanager
def _with_broker_password(url: str, password: str) -> Iterator[str]:
    """``url`` with ``password``. Redis without one accepts any; on RabbitMQ a user of the
    test's own is given it (so the node's other users keep theirs) while the block runs."""
    if not url.startswith("amqp"):
        yield with_password(url, password)
        return
    scheme, rest = url.split("://", 1)
    where = rest.rsplit("@", 1)[-1]
    vhost = where.rsplit("/", 1)[-1]
    user = f"svdfarm-test-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_user", user, password)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield f"{scheme}://{user}:{password}@{where}"
    finally:
        rabbitmqctl("delete_user", user)
