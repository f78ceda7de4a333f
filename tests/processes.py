"""Real farm processes in tests: ``svdfarm worker`` and ``svdfarm web`` started in a process
group of their own (so a kill reaches a worker's pool too), their output in a log file, and a
Redis database of the test's own for their queues.

One copy for every live test (faults, graceful stop, restarts, two live workers, load).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from svdfarm.settings import Settings

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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
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
