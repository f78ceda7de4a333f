"""Fixtures: a fresh database per test (SQLite, and PostgreSQL when configured), settings in a
temporary data folder, the app and its client, the tiny model saved once per session.

``SVDFARM_TEST_DATABASE_URL``, ``SVDFARM_TEST_REDIS_URL`` and ``SVDFARM_TEST_AMQP_URL`` turn on
the PostgreSQL, Redis and RabbitMQ variants; when they are set, an unreachable server fails those
tests instead of skipping them. Live tests that run on either broker take :data:`BROKERS` and
:func:`private_broker`.
S3 tests use moto's server on a free local port, or the endpoint ``SVDFARM_TEST_S3_URL`` names
(``http://user:password@127.0.0.1:9000`` for a MinIO).
"""

from __future__ import annotations

import os

# Under pytest-xdist several test processes share the cores. torch's thread team in each (a
# thread per core by default) then competes with the others', and a render in process took
# up to 7 times as long as alone (docs/BENCHMARKS.md: oversubscribed CPU threads). One thread
# each, set before torch is imported; the processes the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from svdfarm.db import Database, upgrade
from svdfarm.settings import Settings, load_settings
from tests.webhook_receiver import Receiver, listening

PG_URL = os.environ.get("SVDFARM_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("SVDFARM_TEST_REDIS_URL", "")
AMQP_URL = os.environ.get("SVDFARM_TEST_AMQP_URL", "")
S3_URL = os.environ.get("SVDFARM_TEST_S3_URL", "")

needs_postgres = pytest.mark.skipif(
    not PG_URL, reason="SVDFARM_TEST_DATABASE_URL is not set (no PostgreSQL configured)"
)
needs_redis = pytest.mark.skipif(
    not REDIS_URL, reason="SVDFARM_TEST_REDIS_URL is not set (no Redis configured)"
)

needs_amqp = pytest.mark.skipif(
    not AMQP_URL, reason="SVDFARM_TEST_AMQP_URL is not set (no RabbitMQ configured)"
)

#: The brokers a live test runs on, by name (``private_broker`` gives each test its own).
BROKERS = [
    pytest.param("redis", id="redis", marks=[pytest.mark.redis, needs_redis]),
    pytest.param("rabbitmq", id="rabbitmq", marks=[pytest.mark.amqp, needs_amqp]),
]


@contextmanager
def private_broker(kind: str) -> Iterator[str]:
    """A broker URL of this test's own: a Redis database (``redis``) or a RabbitMQ virtual
    host (``rabbitmq``), emptied or deleted afterwards."""
    from tests.processes import private_amqp_vhost, private_redis_db

    if kind == "redis":
        with private_redis_db(REDIS_URL) as url:
            yield url
    elif kind == "rabbitmq":
        with private_amqp_vhost(AMQP_URL) as url:
            yield url
    else:
        raise ValueError(f"no broker named {kind!r}")


DATABASES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=[pytest.mark.postgres, needs_postgres]),
]


def _pg_base_url() -> str:
    """The PostgreSQL URL from the environment, with the psycopg 3 driver."""
    url = PG_URL
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


@contextmanager
def fresh_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a new PostgreSQL schema dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    base = _pg_base_url()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database for one test (``sqlite`` unless parametrized with ``postgresql``)."""
    with fresh_database(getattr(request, "param", "sqlite"), tmp_path) as url:
        yield url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny model, built and saved once for the whole session."""
    from worker.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("models") / "tiny")


def make_settings(data_dir: Path, database_url: str, tiny_model_dir: Path, **env: str) -> Settings:
    """Settings for a test: its own data folder, its database, the shared tiny model."""
    models = data_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    link = models / "tiny"
    if not link.exists():
        link.symlink_to(tiny_model_dir, target_is_directory=True)
    base = {
        "SVDFARM_DATA_DIR": str(data_dir),
        "SVDFARM_DATABASE_URL": database_url,
        "SVDFARM_MODEL": "tiny",
        "SVDFARM_SECRET_KEY": "test-secret",
        "SVDFARM_PROGRESS_INTERVAL": "0.2",
        # In-process tests hand every submitted job to the broker at once (the dispatcher
        # with room for all): they test other things. The dispatcher's own tests, and the
        # worker and web processes the end-to-end tests start, use the real margin (0).
        "SVDFARM_DISPATCH_MARGIN": "1000",
    }
    base.update(env)
    return load_settings(base)


@pytest.fixture
def settings(tmp_path: Path, database_url: str, tiny_model_dir: Path) -> Settings:
    """Settings in a temporary data folder, on a migrated database."""
    result = make_settings(tmp_path / "var", database_url, tiny_model_dir)
    upgrade(result.database_url)
    return result


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    """The test's migrated database, for reading and writing rows directly."""
    database = Database(settings.database_url)
    yield database
    database.dispose()


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    """The web app on the test's settings."""
    from web import create_app

    flask_app = create_app({"SVDFARM_SETTINGS": settings, "TESTING": True})
    yield flask_app
    flask_app.extensions["svdfarm.feed"].stop()
    flask_app.extensions["svdfarm.db"].dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the app."""
    return app.test_client()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on a free port of 127.0.0.1, listening (tests.webhook_receiver)."""
    with listening() as found:
        yield found


@dataclass(frozen=True)
class S3Bucket:
    """An empty bucket for one test: ``env`` reaches it (the AWS variables), ``url`` is the
    ``SVDFARM_STORAGE_URL`` of a prefix in it."""

    name: str
    url: str
    env: dict[str, str]

    def client(self) -> object:
        """A boto3 client of the bucket's endpoint, to look at what is stored."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, str]]:
    """The AWS variables of an S3 endpoint: ``SVDFARM_TEST_S3_URL``'s, or moto's server."""
    if S3_URL:
        parts = urlsplit(S3_URL)
        yield {
            "AWS_ENDPOINT_URL": f"{parts.scheme}://{parts.hostname}"
            + (f":{parts.port}" if parts.port else ""),
            "AWS_ACCESS_KEY_ID": parts.username or os.environ.get("AWS_ACCESS_KEY_ID", ""),
            "AWS_SECRET_ACCESS_KEY": parts.password or os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        }
        return
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new bucket for this test, its AWS variables set in this process."""
    for name, value in s3_endpoint.items():
        monkeypatch.setenv(name, value)
    bucket = S3Bucket(f"svdfarm-test-{uuid.uuid4().hex[:12]}", "", dict(s3_endpoint))
    bucket.client().create_bucket(Bucket=bucket.name)  # type: ignore[attr-defined]
    return S3Bucket(bucket.name, f"s3://{bucket.name}/farm", bucket.env)
