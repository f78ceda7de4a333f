"""Helpers of the load test: a Redis database of its own, live server and worker processes,
HTTP clients that record every answer, and latency percentiles."""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    raise AssertionError(f"no free Redis database (1-15) at {base_url} for the load test")


@dataclass
class LiveProcess:
    """A process of the farm (``svdfarm web`` or ``svdfarm worker``) and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def text(self, tail: int = 6000) -> str:
        """The end of what the process printed."""
        return self.log.read_text(errors="replace")[-tail:]

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM, then SIGKILL to whatever is left of its process group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_svdfarm(name: str, args: Sequence[str], env: dict[str, str], folder: Path) -> LiveProcess:
    """Start ``svdfarm <args>`` in its own process group, its output in ``folder/<name>.log``."""
    log = folder / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "svdfarm.cli", *args],
            env=env,
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return LiveProcess(name, process, log)


def wait_until_serving(server: LiveProcess, port: int, timeout_s: float = 90) -> None:
    """Block until ``GET /healthz`` answers 200; fail with the server's log if it does not."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        assert server.process.poll() is None, f"the web server exited:\n{server.text()}"
        try:
            answer = request(port, "GET", "/healthz", timeout_s=5)
        except OSError as exc:
            last = repr(exc)
        else:
            if answer.status == 200:
                return
            last = f"{answer.status} {answer.body[:200]!r}"
        time.sleep(0.2)
    raise AssertionError(
        f"the web server did not serve in {timeout_s:g} s ({last}):\n{server.text()}"
    )


@dataclass
class Answer:
    """One HTTP answer: status, headers we look at, the body, and how long it took."""

    status: int
    headers: dict[str, str]
    body: bytes
    elapsed_s: float

    def json(self) -> Any:
        """The body parsed as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60,
) -> Answer:
    """One request on a new connection to 127.0.0.1:``port``; raises OSError (and
    http.client's errors) when the connection fails."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
        kept = {k.lower(): v for k, v in response.getheaders()}
        return Answer(response.status, kept, data, elapsed)
    finally:
        connection.close()


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
