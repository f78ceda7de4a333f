"""The live-watchers benchmark (bench.watchers): the watchers' stream parsing, the delivery
count, and a smoke run of 20 watchers over 3 rounds against a real ``svdfarm web`` on
PostgreSQL (LISTEN/NOTIFY) that must deliver every step to every watcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import parse_tables
from bench.watch_client import Stream, progress_step
from bench.watchers import deliveries
from tests.conftest import PG_URL, needs_postgres

ROOT = Path(__file__).resolve().parents[2]


def test_events_are_split_and_progress_steps_read() -> None:
    """Events split at blank lines across reads; only ``progress`` events give a step."""
    stream = Stream(reader=None, chunked=False)  # type: ignore[arg-type]
    first = stream.events(b'retry: 3000\n\nid: 7\nevent: event\ndata: {"type": "claimed"}\n\nev')
    rest = stream.events(b'ent: progress\ndata: {"job": "j", "step": 4}\n\n: keep-alive\n\n')
    assert [progress_step(block) for block in first + rest] == [None, None, 4, None]
    assert stream.buffer == b""


def test_deliveries_time_each_arrival_against_its_commit() -> None:
    """Arrivals of written steps count, each with its latency; the step at connect does not."""
    received = {"a": {"0": [9.0], "1": [10.5, 10.7]}, "b": {"1": [10.2]}}
    count, latencies = deliveries(received, {("a", 1): 10.0, ("b", 1): 10.1})
    assert count == 3
    assert sorted(latencies) == pytest.approx([0.1, 0.5, 0.7])


@pytest.mark.slow
@pytest.mark.postgres
@needs_postgres
def test_watchers_smoke(tmp_path: Path) -> None:
    """20 watchers of 2 running jobs, 3 rounds (a scratch database on the test server, the
    embedded broker, into a scratch file): every step reaches every watcher, and the section
    written reads back."""
    doc = tmp_path / "BENCHMARKS.md"
    url = PG_URL
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.watchers",
            "--watchers=20",
            "--jobs=2",
            "--rounds=3",
            "--interval=0.5",
            "--idle=0.5",
            "--broker=embedded",
            "--write",
            f"--doc={doc}",
        ],
        cwd=ROOT,
        env={**os.environ, "SVDFARM_BENCH_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "steps delivered: 60 of 60" in done.stdout
    body = doc.read_text().split("<!-- bench:watchers -->")[1].split("<!-- /bench:watchers -->")[0]
    (rows,) = parse_tables(body)
    figures = {row["figure"]: row for row in rows}
    assert figures["watchers connected"]["measured"] == "20 of 20 (0 failed)"
    assert figures["steps delivered"]["met"] == "yes"
    assert figures["latency: p99"]["target"] == "<= 1000 ms"
