"""Real farm processes in tests: ``svdfarm worker`` and ``svdfarm web`` started in a process
group of their own (so a kill reaches a worker's pool too), their output in a log file, and a
Redis database or a RabbitMQ virtual host of the test's own for their queues.

One copy for every live test (faults, graceful stop, restarts, two live workers, load).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from svdfarm.db import Database, upgrade
from svdfarm.settings import Settings
from tests.http import free_port

#: The ``svdfarm`` command as tests start it: this interpreter, ``python -m cli``.
SVDFARM = [sys.executable, "-m", "cli"]

#: Marks a Redis database as taken by a running test (expires) and as a test's own (stays, so
#: what a killed run left behind may be cleared by the next one).
LEASE_KEY = "svdfarm:test-lease"
OWNER_KEY = "svdfarm:test-db"


@contextmanager
def private_redis_db(base_url: str, lease_s: int = 1800) -> Iterator[str]:
    """A Redis URL on a database number no one else uses, emptied when the block ends.

    Live tests that share one Redis database and the farm's fixed queue names take each
    other's jobs; this claims a database (15 down to 1) that is empty, or was a test's and is
    no longer leased, so runs in parallel with other tests keep to their own queues. Raises
    when Redis cannot be reached.
    """
    import redis

    base = redis.Redis.from_url(base_url)
    try:
        base.ping()  # unreachable: fail here, with Redis's own error
    finally:
        base.close()
    token = uuid.uuid4().hex
    prefix = base_url.rsplit("/", 1)[0] if base_url.count("/") > 2 else base_url.rstrip("/")
    for number in range(15, 0, -1):
        url = f"{prefix}/{number}"
        client = redis.Redis.from_url(url)
        try:
            free = client.dbsize() == 0 or bool(client.exists(OWNER_KEY))
            if not free or not client.set(LEASE_KEY, token, nx=True, ex=lease_s):
                client.close()
                continue
        except redis.ResponseError:  # a server configured with fewer databases
            client.close()
            continue
        client.set(OWNER_KEY, "1")
        for key in client.scan_iter():  # what an earlier, killed run left
            if key not in (LEASE_KEY.encode(), OWNER_KEY.encode()):
                client.delete(key)
        try:
            yield url
        finally:
            client.flushdb()
            client.close()
        return
    raise AssertionError(f"no free Redis database (1-15) at {base_url} for this test")


#: Virtual hosts the tests create start with this; one a killed run left is deleted by the next.
VHOST_PREFIX = "svdfarm-test-"


def rabbitmqctl(*args: str, timeout_s: float = 60) -> str:
    """Run ``rabbitmqctl`` (the local node; as root or the rabbitmq user) and return its
    output; raises AssertionError with its message when it fails or is missing."""
    program = shutil.which("rabbitmqctl")
    assert program, "rabbitmqctl is not installed: the RabbitMQ tests need it for their vhosts"
    done = subprocess.run(
        [program, *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


@contextmanager
def private_amqp_vhost(base_url: str, lease_s: int = 1800) -> Iterator[str]:
    """An AMQP URL on a new virtual host of the RabbitMQ at ``base_url``, deleted (with its
    queues and messages) when the block ends.

    As with :func:`private_redis_db`, live tests that run in parallel keep to their own
    queues. The vhost is made with ``rabbitmqctl``, so the node must be local; vhosts that
    runs killed more than ``lease_s`` ago left behind are deleted first. Raises when the
    broker cannot be reached.
    """
    from kombu import Connection

    with Connection(base_url, connect_timeout=5) as probe:
        probe.ensure_connection(max_retries=1)  # unreachable: fail here, with the reason
    scheme, rest = base_url.split("://", 1)
    authority = rest.split("/", 1)[0]
    user = authority.rsplit("@", 1)[0].split(":", 1)[0] if "@" in authority else "guest"
    now = int(time.time())
    for name in rabbitmqctl("list_vhosts", "--quiet", "--no-table-headers").split():
        stamp = name[len(VHOST_PREFIX) :].split("-", 1)[0]
        if name.startswith(VHOST_PREFIX) and stamp.isdigit() and now - int(stamp) > lease_s:
            rabbitmqctl("delete_vhost", name)
    vhost = f"{VHOST_PREFIX}{now}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield f"{scheme}://{authority}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


@dataclass
class LiveProcess:
    """A process of the farm (``svdfarm web`` or ``svdfarm worker``) and its log file.

    A worker's ``name`` is its Celery hostname (``<name>-<6 hex>@localhost``).
    """

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def hostname(self) -> str:
        """The worker's hostname, as it registers and as attempts name it (its ``name``)."""
        return self.name

    def text(self, tail: int | None = 6000) -> str:
        """The last ``tail`` characters the process printed (everything for None)."""
        printed = self.log.read_text(errors="replace")
        return printed if tail is None else printed[-tail:]

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM, then SIGKILL to whatever is left of its process group."""
        self.terminate()
        self.wait_stopped(timeout_s)

    def terminate(self) -> None:
        """SIGTERM the process (a worker's warm shutdown), if it is still running."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float = 60) -> None:
        """Wait up to ``timeout_s`` for the process to exit (SIGKILL past it), then SIGKILL
        whatever is left of its process group."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._kill_group()

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a worker and its pool) and reap it."""
        self._kill_group()
        self.process.wait()

    def _kill_group(self) -> None:
        """SIGKILL every process left in the group; nothing when none is."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_all(processes: Sequence[LiveProcess], timeout_s: float = 60) -> None:
    """:meth:`LiveProcess.stop` for several processes at once: SIGTERM to each of them first,
    so that they shut down side by side, then each waited for (SIGKILL past ``timeout_s``)."""
    for live in processes:
        live.terminate()
    for live in processes:
        live.wait_stopped(timeout_s)


def start_svdfarm(
    name: str,
    args: Sequence[str],
    env: dict[str, str],
    folder: Path,
    cwd: Path | None = None,
) -> LiveProcess:
    """Start ``svdfarm <args>`` in its own process group, its output in ``folder/<name>.log``;
    in ``cwd`` (default: this process's working directory)."""
    log = folder / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*SVDFARM, *args],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a kill reaches its pool too
        )
    return LiveProcess(name, process, log)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a farm process on ``settings``: this process's, the data folder,
    database and broker of the settings, the tiny model, one OpenMP thread (test machines are
    small and shared; oversubscribed threads make each step many times slower), then
    ``extra``."""
    return {
        **os.environ,
        "SVDFARM_DATA_DIR": str(settings.data_dir),
        "SVDFARM_DATABASE_URL": settings.database_url,
        "SVDFARM_BROKER_URL": settings.broker_url,
        "SVDFARM_MODEL": "tiny",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def start_web(
    settings: Settings, folder: Path, port: int, *, cwd: Path | None = None, **extra_env: str
) -> LiveProcess:
    """Start ``svdfarm web`` on 127.0.0.1:``port`` with :func:`worker_env` plus
    ``extra_env``, its log ``folder/web.log``; does not wait for it to serve
    (:func:`tests.load.wait_until_serving` does)."""
    args = ["web", "--host", "127.0.0.1", "--port", str(port)]
    return start_svdfarm("web", args, worker_env(settings, **extra_env), folder, cwd)


def start_worker(
    settings: Settings, folder: Path, name: str, *, cwd: Path | None = None, **extra_env: str
) -> LiveProcess:
    """Start ``svdfarm worker`` on ``settings`` (:func:`worker_env` plus ``extra_env``) with
    a unique hostname ``<name>-<6 hex>@localhost``, which is the returned process's name;
    its log is ``folder/<hostname>.log``. Does not wait for it to register
    (:func:`tests.rows.wait_for_worker` does)."""
    hostname = f"{name}-{uuid.uuid4().hex[:6]}@localhost"
    env = worker_env(settings, **extra_env)
    return start_svdfarm(hostname, ["worker", "--hostname", hostname], env, folder, cwd)


@dataclass
class WebAndWorker:
    """``svdfarm web`` and one ``svdfarm worker`` on a fresh PostgreSQL schema and a Redis
    database of their own (:func:`web_and_worker`)."""

    settings: Settings
    db: Database
    port: int
    web: LiveProcess
    worker: LiveProcess

    @property
    def url(self) -> str:
        """The web's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        """The end of both processes' logs, for failure messages."""
        return "\n".join(f"--- {p.name} ---\n{p.text(4000)}" for p in (self.web, self.worker))


@contextmanager
def web_and_worker(
    folder: Path, tiny_model_dir: Path, *, name: str, env: dict[str, str]
) -> Iterator[WebAndWorker]:
    """Start a web server and a worker (named ``name``) with ``env`` on a fresh PostgreSQL
    schema and a private Redis database, once the web serves and the worker is registered;
    both stopped, and the schema dropped, afterwards."""
    from tests.conftest import REDIS_URL, fresh_database, make_settings
    from tests.load import wait_until_serving
    from tests.rows import wait_for_worker

    with fresh_database("postgresql", folder) as url, private_redis_db(REDIS_URL) as broker:
        settings = make_settings(folder / "var", url, tiny_model_dir, SVDFARM_BROKER_URL=broker)
        upgrade(settings.database_url)
        port = free_port()
        db = Database(settings.database_url)
        processes: list[LiveProcess] = []
        try:
            web = start_web(settings, folder, port, cwd=folder, **env)
            processes.append(web)
            worker = start_worker(settings, folder, name, cwd=folder, **env)
            processes.append(worker)
            wait_until_serving(web, port)
            wait_for_worker(db, worker.hostname, worker.process, worker.text)
            yield WebAndWorker(settings, db, port, web, worker)
        finally:
            stop_all(processes)
            db.dispose()
