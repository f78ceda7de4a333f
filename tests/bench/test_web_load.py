"""The web benchmark's reading of its figures: wrk's JSON line (from ``bench/load_runs.lua``),
bench.loadgen's result, the targets, the fraction of the bare endpoint; and, where wrk is
installed, the Lua script against a local server (a second per run).
"""

from __future__ import annotations

import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.load_runs import Run, costed, from_loadgen, load, parse_wrk
from bench.web_load import BARE, PAGE, STATUS, SUBMIT, TARGETS, Target, bare_ratio, table_rows

#: What wrk prints with the script: its own summary, then the script's line.
WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8000/api/v1/jobs/x
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    60.10ms   20.00ms 300.00ms   80.00%
    Req/Sec     1.05k   100.00     1.20k    70.00%
  10500 requests in 10.00s, 12.00MB read
  Non-2xx or 3xx responses: 12
Requests/sec:   1050.00
Transfer/sec:      1.20MB
wrk-json: {"requests": 10500, "duration_us": 10000000, "bytes": 12582912, "non2xx": 12, \
"errors": {"connect": 0, "read": 2, "write": 0, "status": 12, "timeout": 1}, \
"latency_us": {"p50": 55000, "p90": 90000, "p99": 140000, "max": 300000, "mean": 60100.0}}
"""


def run(rps: float, p99_s: float = 0.1, errors: int = 0) -> Run:
    """A run with the given rate, p99 and errors."""
    return Run(
        requests=int(rps * 10), errors=errors, rps=rps, p50_s=0.05, p90_s=0.08, p99_s=p99_s,
        max_s=0.3,
    )  # fmt: skip


def test_parse_wrk_reads_the_json_line() -> None:
    """Rate of 2xx answers, errors (not 2xx plus socket errors), latencies in seconds."""
    got = parse_wrk(WRK_OUTPUT)
    assert got.requests == 10500
    assert got.errors == 12 + 2 + 1  # not 2xx, read errors, timeouts
    assert got.rps == pytest.approx((10500 - 12) / 10.0)
    assert (got.p50_s, got.p90_s, got.p99_s, got.max_s) == pytest.approx((0.055, 0.09, 0.14, 0.3))


def test_parse_wrk_without_the_line_says_so() -> None:
    """wrk run without the script (or failing) is an error that shows its output."""
    with pytest.raises(ValueError, match="no 'wrk-json: ' line"):
        parse_wrk("Running 10s test @ http://x\nunable to connect to x:80 Connection refused\n")


def test_from_loadgen_counts_exceptions_and_statuses_as_errors() -> None:
    """bench.loadgen's codes: numbers are statuses (non-2xx are errors), names are errors."""
    result = {
        "requests": 103,
        "ok": 102,
        "codes": {"200": 100, "302": 2, "503": 1, "ConnectionResetError": 4},
        "elapsed_s": 2.0,
        "p50_s": 0.01,
        "p90_s": 0.02,
        "p99_s": 0.03,
        "max_s": 0.04,
    }
    got = from_loadgen(result)
    assert got.errors == 2 + 1 + 4
    assert got.rps == pytest.approx(100 / 2.0)
    assert got.p99_s == 0.03


def test_targets_and_the_fraction_of_bare() -> None:
    """A target needs the rate, the p99 where set, and no errors; the status endpoint's rate
    is reported as a fraction of the bare endpoint's."""
    status = TARGETS[STATUS]
    assert status.describe() == ">= 1,000 req/s, p99 <= 150 ms"
    assert TARGETS[PAGE].describe() == ">= 600 req/s"
    assert status.met(run(1200, 0.120))
    assert not status.met(run(1200, 0.200))  # too slow at p99
    assert not status.met(run(900, 0.100))
    assert not status.met(run(1200, 0.100, errors=1))
    assert Target(300).met(run(300, p99_s=5.0))
    assert bare_ratio({BARE: run(2000), STATUS: run(1700)}) == pytest.approx(0.85)
    assert bare_ratio({STATUS: run(1700)}) is None
    rows = table_rows({BARE: run(2000), STATUS: run(1700), SUBMIT: run(250)}, 64)
    assert [row[0] for row in rows] == [BARE, STATUS, SUBMIT]
    assert [row[-3:] for row in rows] == [
        ["(the limit)", "", "1.00"],
        [">= 1,000 req/s, p99 <= 150 ms", "yes", "0.85"],
        [">= 300 req/s", "no", "0.12"],
    ]


def test_costed_divides_cpu_by_the_answers() -> None:
    """CPU per answer from the seconds before and after; None where the database's is
    unknown."""
    got = costed(run(100), (1.0, 2.0), (5.0, 5.5))  # 1,000 answers
    assert (got.server_cpu_s, got.database_cpu_s) == pytest.approx((0.001, 0.0005))
    assert costed(run(100), (1.0, 2.0), (None, None)).database_cpu_s is None


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[bytes]]]:
    """A local HTTP server: 200 for GET /ok, 404 for any other GET, 201 for a POST (whose
    body it keeps); yields its URL and the bodies."""
    bodies: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def do_GET(self) -> None:
            self._answer(200 if self.path == "/ok" else 404)

        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self._answer(201 if self.headers["Content-Type"] == "image/x-test" else 415)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_script_counts_answers_and_posts_the_body(
    recording_server: tuple[str, list[bytes]], tmp_path: Path
) -> None:
    """With the script, wrk's JSON line counts 2xx and other answers, and a POST sends the
    file's bytes (binary included) with the content type given."""
    base, bodies = recording_server
    good = load(f"{base}/ok", concurrency=2, duration_s=1, tool="wrk")
    assert good.requests > 0 and good.errors == 0 and good.rps > 0
    assert 0 < good.p50_s <= good.p99_s <= good.max_s
    missing = load(f"{base}/missing", concurrency=2, duration_s=1, tool="wrk")
    assert missing.requests > 0 and missing.errors == missing.requests and missing.rps == 0
    body = tmp_path / "body"
    body.write_bytes(b"\x89PNG\r\n\x00binary")
    posted = load(
        f"{base}/submit",
        concurrency=2,
        duration_s=1,
        body=body,
        content_type="image/x-test",
        tool="wrk",
    )
    assert posted.requests > 0 and posted.errors == 0
    assert set(bodies) == {b"\x89PNG\r\n\x00binary"}
