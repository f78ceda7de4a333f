"""The benchmarks' own machinery: tables and their parsing, the ratio line, the writer of
docs/BENCHMARKS.md, the profile reader, the load generator, and a smoke run of the farm
overhead benchmark (two jobs each side, the embedded setup, into a scratch file).
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from bench.common import (
    JobRecord,
    markdown_table,
    parse_ratio,
    parse_table,
    parse_tables,
    percentile,
    section,
    write_section,
)
from bench.farm_overhead import SIDES, breakdown, epoch_rounds, order_of
from bench.loadgen import run as load_run
from bench.profile_farm import PIPELINE, TASK, Stacks

ROOT = Path(__file__).resolve().parents[2]


def test_table_round_trip() -> None:
    """A table made by markdown_table reads back as the same rows."""
    table = markdown_table(["round", "farm/bare"], [[1, "1.020"], ["all", "**1.010**"]])
    assert parse_tables(f"text\n\n{table}\n\nmore\n\n{table}\n")[1] == parse_table(table)
    assert parse_table(table) == [
        {"round": "1", "farm/bare": "1.020"},
        {"round": "all", "farm/bare": "**1.010**"},
    ]


def test_parse_ratio_takes_the_last_line() -> None:
    """The ratio is read from the last ``farm/bare ratio: X`` line."""
    output = "farm/bare ratio: 2.000\nround 1\nfarm/bare ratio: 1.043\n"
    assert parse_ratio(output) == pytest.approx(1.043)
    with pytest.raises(ValueError):
        parse_ratio("no ratio here")


def test_percentile_nearest_rank() -> None:
    """p50 and p99 by the nearest-rank method."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([3.0], 99) == 3.0


def test_rounds_cycle_through_every_order() -> None:
    """Six rounds run the three sides in all six orders: each is first, second and last
    twice, and each follows each of the others equally often."""
    orders = [order_of(n) for n in range(1, 7)]
    assert len(set(orders)) == 6
    for position in range(3):
        assert sorted(o[position] for o in orders) == sorted(SIDES * 2)
    assert order_of(7) == order_of(1)


def test_breakdown_splits_a_round() -> None:
    """Queue time for a round's first job, the wait between jobs for the others."""
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def record(created: float, start: float, duration: float, finished: float) -> JobRecord:
        return JobRecord(
            id=str(created),
            state="succeeded",
            error=None,
            created_at=t0 + timedelta(seconds=created),
            started_at=t0 + timedelta(seconds=start),
            finished_at=t0 + timedelta(seconds=finished),
            attempt_started_at=t0 + timedelta(seconds=start),
            attempt_duration_s=duration,
            video_key="x",
        )

    parts = breakdown([[record(0, 0.01, 1.0, 1.02), record(0, 1.05, 1.0, 2.06)]])
    assert parts["queue"] == [pytest.approx(0.01)]
    assert parts["between"] == [pytest.approx(0.03)]
    assert parts["attempt"] == [1.0, 1.0]
    assert parts["close"] == [pytest.approx(0.01), pytest.approx(0.01)]


def test_write_section_keeps_the_others(tmp_path: Path) -> None:
    """Writing one section replaces it, keeps the rest, and keeps the file's order."""
    doc = tmp_path / "BENCHMARKS.md"
    write_section("web", section("3. Web", markdown_table(["a"], [[1]]), "first"), doc)
    write_section("farm-overhead", section("1. Farm overhead", "table one"), doc)
    write_section("web", section("3. Web", markdown_table(["a"], [[2]]), "second"), doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert "GPU: not measured" in text
    assert text.index("1. Farm overhead") < text.index("3. Web")
    assert "second" in text and "first" not in text
    assert text.count("<!-- bench:web -->") == 1
    web = text.split("<!-- bench:web -->")[1].split("<!-- /bench:web -->")[0]
    assert parse_table(web) == [{"a": "2"}]
    assert "Measured " in web and "Command: `" in web
    # What was written by hand before the first section stays.
    doc.write_text(text.replace("# Benchmarks\n", "# Benchmarks\n\nA note by hand.\n", 1))
    write_section("web", section("3. Web", markdown_table(["a"], [[3]]), "third"), doc)
    assert "A note by hand." in doc.read_text() and "third" in doc.read_text()


def test_hot_spots_fold_the_pipeline(tmp_path: Path) -> None:
    """Samples under the task go to the pipeline row or to ``ours -> callee``."""
    raw = tmp_path / "pool.txt"
    raw.write_text(
        f"main (x.py:1);{TASK[:-1]}:40);{PIPELINE} (diffusers/p.py:9);conv (torch/c.py:3) 90\n"
        f"main (x.py:1);{TASK[:-1]}:40);run_job (worker/execute.py:5);"
        "Session.get (sqlalchemy/orm/session.py:7) 10\n"
        "main (x.py:1);idle (celery/x.py:2) 50\n"
    )
    spots, total = Stacks.read(raw).hot_spots(TASK, fold=(PIPELINE,))
    assert total == 100
    assert spots["p.StableVideoDiffusionPipeline.__call__"] == 90
    assert spots["execute.run_job -> session.Session.get"] == 10


@pytest.fixture
def http_server() -> Iterator[str]:
    """A local HTTP server answering every GET and POST with a short JSON body."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            body = b'{"ok": true}'
            self.send_response(201 if self.command == "POST" else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_loadgen_counts_requests(http_server: str) -> None:
    """The load generator keeps connections alive and counts answers and latencies."""
    import asyncio

    got = asyncio.run(load_run("GET", f"{http_server}/x", b"", "", 4, 0.5))
    assert got["requests"] > 0 and got["ok"] == got["requests"]
    assert got["codes"] == {"200": got["requests"]}
    assert got["p50_s"] is not None and got["p99_s"] >= got["p50_s"]
    posted = asyncio.run(load_run("POST", f"{http_server}/y", b"abc", "text/plain", 2, 0.3))
    assert posted["codes"] == {"201": posted["requests"]}


@pytest.mark.slow
def test_farm_overhead_smoke(tmp_path: Path) -> None:
    """Two tiny jobs each side through a real farm (SQLite, embedded broker): the script
    ends with the ratio line and writes its sections, whose tables read back."""
    doc = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.farm_overhead",
            "--jobs=2",
            "--epochs=1",
            "--frames=2",
            "--steps=1",
            "--database=sqlite",
            "--broker=embedded",
            "--write",
            f"--doc={doc}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("farm/bare ratio: ")
    assert parse_ratio(done.stdout) > 0
    text = doc.read_text()
    farm = text.split("<!-- bench:farm-overhead -->")[1].split("<!-- /bench:farm-overhead -->")[0]
    summary, _detail, sets, rounds = parse_tables(farm)
    assert [row["set of processes"] for row in sets] == ["1"]
    ratio = summary[0]["farm/bare"].strip("*")
    assert float(ratio) == pytest.approx(parse_ratio(done.stdout), abs=0.001)
    assert [row["round"] for row in rounds] == ["1", "2"]
    assert "<!-- bench:memory -->" in text


def test_epoch_rounds_index_each_set_of_processes() -> None:
    """Rounds are numbered across the sets of processes that ran them."""
    assert epoch_rounds([[1, 1], [1], [2, 1, 1]]) == [range(0, 2), range(2, 3), range(3, 6)]


@pytest.mark.slow
def test_fair_share_smoke(tmp_path: Path) -> None:
    """Four jobs of two owners on one worker and two idle-farm jobs (SQLite, embedded
    broker, into a scratch file): both owners' shares and the latency line are printed, and
    the section written reads back with a row per owner whose shares add up to 1."""
    doc = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fair_share",
            "--jobs=4",
            "--backlog=2",
            "--database=sqlite",
            "--broker=embedded",
            "--latency-jobs=2",
            "--latency-setup=embedded",
            "--write",
            f"--doc={doc}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "alice share of worker time: " in done.stdout
    assert "bob share of worker time: " in done.stdout
    assert "submit -> attempt start on an idle farm (embedded, 2 jobs): p50 " in done.stdout
    text = doc.read_text()
    body = text.split("<!-- bench:fair-share -->")[1].split("<!-- /bench:fair-share -->")[0]
    (rows,) = parse_tables(body)
    assert [row["owner"] for row in rows] == ["alice", "bob"]
    assert all(int(row["jobs run"]) >= 1 for row in rows)
    assert sum(float(row["share"]) for row in rows) == pytest.approx(1.0, abs=0.002)
