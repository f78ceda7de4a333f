"""Helpers of the load test: waiting for the live web server, HTTP clients that record every
answer, and latency percentiles (the processes themselves: :mod:`tests.processes`)."""

from __future__ import annotations

import http.client
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tests.processes import LiveProcess


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
