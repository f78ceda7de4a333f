"""The Celery app (:mod:`svdfarm.celery_app`): what its config shows to remote control, and the
queues Celery's own tools know."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

from celery.platforms import SecurityWarning
from celery.utils.saferepr import saferepr
from celery.utils.serialization import jsonify

from svdfarm.catalog import DEFAULT_MODELS, catalog_keys, parse_models
from svdfarm.celery_app import create_celery, enqueue_render, settings_of
from svdfarm.queues import all_queues
from svdfarm.settings import Settings
from tests.processes import worker_env
from tests.rows import QUEUE, broker_messages

#: Settings holding a marked secret each; no marker may reach what remote control answers.
MARKED = {
    "secret_key": "secret-key-marker-7f3a9c",
    "admin_password": "admin-password-marker-51be",
    "database_url": "postgresql+psycopg://svd:db-password-marker-e0d4@db:5432/farm",
    "broker_url": "redis://:broker-password-marker-2c81@cache:6379/3",
}
#: The default queue and every worker class's, bare and for each model of the catalog.
FARM_QUEUES = {
    "svd.default",
    *all_queues(),
    *all_queues(catalog_keys(parse_models(DEFAULT_MODELS))),
}
SECRETS = ["secret-key-marker", "admin-password-marker", "db-password-marker", "broker-password"]


def test_inspect_conf_shows_no_secret(settings: Settings) -> None:
    """What ``celery inspect conf`` answers (with and without the defaults) and ``inspect
    report`` prints hold none of the settings' secrets, and the settings still reach the
    worker's task through :func:`settings_of`."""
    marked = settings.with_overrides(**MARKED)
    celery = create_celery(marked)
    try:
        assert settings_of(celery) is marked
        for with_defaults in (False, True):
            # What the worker's `conf` command sends back (celery.worker.control.conf).
            table = jsonify(
                celery.conf.table(with_defaults=with_defaults), unknown_type_filter=saferepr
            )
            shown = json.dumps(table, default=str)
            assert "broker_url" in shown and "cache:6379" in shown
            assert not [s for s in SECRETS if s in shown], shown
        report = celery.conf.humanize(with_defaults=False, censored=True)
        assert not [s for s in SECRETS if s in report], report
    finally:
        celery.close()


def test_every_farm_queue_is_declared_and_a_bare_worker_takes_none(settings: Settings) -> None:
    """Celery knows the default queue and every worker class's (so ``celery purge`` and Flower
    see them), each routed as Celery would make it on first use; a worker started without
    ``-Q`` still consumes the default queue only, one with ``-Q`` what it names."""
    from celery.apps.worker import Worker

    celery = create_celery(settings)
    try:
        declared = celery.amqp.queues
        assert set(declared) == FARM_QUEUES
        for name, queue in declared.items():
            assert (queue.exchange.name, queue.exchange.type, queue.routing_key) == (
                name,
                "direct",
                name,
            )
    finally:
        celery.close()
    # Each worker also consumes its own queue (worker_direct), whatever -Q says.
    own = "bare@test.dq2"
    for given, consumed in (([], {"svd.default", own}), ([QUEUE], {QUEUE, own})):
        celery = create_celery(settings)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SecurityWarning)  # tests may run as root
                Worker(app=celery, hostname="bare@test", queues=given)
            assert set(celery.amqp.queues.consume_from) == consumed
        finally:
            celery.close()


def test_celery_purge_empties_the_farm_queues(settings: Settings, tmp_path: Path) -> None:
    """``celery -A svdfarm purge -f`` removes the messages of a worker class's queue, not
    only the default queue's."""
    celery = create_celery(settings)
    try:
        enqueue_render(celery, "3f2c0a4e-0000-4000-8000-000000000001", QUEUE)
    finally:
        celery.close()
    assert len(broker_messages(settings)) == 1
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "svdfarm", "purge", "-f"],
        env=worker_env(settings),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"Purged 1 message from {len(FARM_QUEUES)} known task queues." in done.stdout
    assert broker_messages(settings) == []


def test_a_render_is_acknowledged_when_it_starts_so_no_broker_cuts_it_short(
    settings: Settings,
) -> None:
    """The render task acknowledges its message when it starts (not after the render), so
    neither Redis's visibility timeout nor RabbitMQ's consumer timeout applies and the worker
    has nothing to warn about; with late acknowledgement it would warn, naming the limit."""
    import worker.tasks  # noqa: F401 - registers the render task
    from svdfarm.celery_app import RENDER_TASK, render_cut_short

    for broker in ("redis://cache:6379/0", "amqp://guest:guest@rabbit:5672//"):
        celery = create_celery(settings.with_overrides(broker_url=broker))
        try:
            task = celery.tasks[RENDER_TASK]
            assert task.acks_late is False and task.reject_on_worker_lost is False
            assert celery.conf.worker_prefetch_multiplier == 1
            assert render_cut_short(celery) is None
            task.acks_late = True  # as it was before: acknowledged after the render
            try:
                warning = render_cut_short(celery)
            finally:
                task.acks_late = False
        finally:
            celery.close()
        if broker.startswith("redis"):
            assert warning is None  # the visibility timeout outlasts the hard time limit
        else:
            assert warning and "consumer_timeout" in warning
            assert "SVDFARM_TASK_TIME_LIMIT" in warning


def test_the_embedded_broker_writes_each_message_whole(settings: Settings) -> None:
    """A message appears in the queue folder only once written (renamed into place), so a
    worker listing the folder never takes an empty file (kombu's own transport creates the
    file before it writes it)."""
    from svdfarm.embedded_broker import Transport

    settings.ensure_dirs()
    app = create_celery(settings)
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)
    app.send_task("svdfarm.render", args=["a-job"], queue="svd.cpu.fp32.8g.tiny")
    files = sorted((settings.broker_dir / "queue").iterdir())
    assert [f.name.endswith(".svd.cpu.fp32.8g.tiny.msg") for f in files] == [True]
    assert json.loads(files[0].read_bytes())["headers"]["task"] == "svdfarm.render"
