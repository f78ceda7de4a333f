"""One load run and its figures: wrk (with ``bench/load_runs.lua``) or :mod:`bench.loadgen` run
in a process of its own, what they print read into a :class:`Run`, and the CPU the server and
the database spent on it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.common import child_pids, cpu_seconds

#: The wrk script: POST bodies, the count of answers that are not 2xx, the JSON line.
WRK_SCRIPT = Path(__file__).with_name("load_runs.lua")
#: How the script's JSON line starts.
WRK_MARK = "wrk-json: "


@dataclass(frozen=True)
class Run:
    """One load run: answers counted, those that failed (not 2xx, or a socket error), the
    rate of good answers, and the latency percentiles in seconds."""

    requests: int
    errors: int
    rps: float
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    #: CPU the server's processes and the database's backends spent per answer, in seconds
    #: (None where not measured): what a request costs, whatever else the machine runs.
    server_cpu_s: float | None = None
    database_cpu_s: float | None = None


def parse_wrk(output: str) -> Run:
    """The :class:`Run` in wrk's output: the last line the script's ``done()`` printed.

    Errors are the answers that were not 2xx plus wrk's socket errors (connect, read, write,
    timeout); its own status count leaves out 1xx and 3xx, so the script counts them itself.
    """
    lines = [line for line in output.splitlines() if line.startswith(WRK_MARK)]
    if not lines:
        raise ValueError(f"no {WRK_MARK!r} line in wrk's output:\n{output[-2000:]}")
    found = json.loads(lines[-1][len(WRK_MARK) :])
    sockets = found["errors"]
    errors = found["non2xx"] + sum(sockets[k] for k in ("connect", "read", "write", "timeout"))
    latency = found["latency_us"]
    seconds = found["duration_us"] / 1e6
    return Run(
        requests=found["requests"],
        errors=errors,
        rps=(found["requests"] - found["non2xx"]) / seconds if seconds > 0 else 0.0,
        p50_s=latency["p50"] / 1e6,
        p90_s=latency["p90"] / 1e6,
        p99_s=latency["p99"] / 1e6,
        max_s=latency["max"] / 1e6,
    )


def from_loadgen(result: dict[str, Any]) -> Run:
    """The :class:`Run` in :mod:`bench.loadgen`'s JSON: its socket errors are the codes that
    are names of exceptions, not numbers."""
    codes: dict[str, int] = result["codes"]
    not_2xx = sum(n for code, n in codes.items() if code.isdigit() and not 200 <= int(code) < 300)
    sockets = sum(n for code, n in codes.items() if not code.isdigit())
    ok = result["requests"] - not_2xx
    return Run(
        requests=result["requests"],
        errors=not_2xx + sockets,
        rps=ok / result["elapsed_s"],
        p50_s=result["p50_s"] or 0.0,
        p90_s=result["p90_s"] or 0.0,
        p99_s=result["p99_s"] or 0.0,
        max_s=result["max_s"] or 0.0,
    )


def load(
    url: str,
    *,
    concurrency: int,
    duration_s: float,
    body: Path | None = None,
    content_type: str = "",
    tool: str = "wrk",
) -> Run:
    """Load ``url`` with ``tool`` (``wrk`` or ``loadgen``) in its own process."""
    if tool == "wrk":
        command = [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(duration_s))}s",
            "--timeout=10s",
            f"--script={WRK_SCRIPT}",
            url,
        ]
        if body is not None:
            command += ["--", str(body), content_type]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return parse_wrk(done.stdout)
    command = [
        sys.executable,
        "-m",
        "bench.loadgen",
        url,
        f"--concurrency={concurrency}",
        f"--duration={duration_s}",
    ]
    if body is not None:
        command += ["--method=POST", f"--body-file={body}", f"--content-type={content_type}"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return from_loadgen(json.loads(done.stdout.strip().splitlines()[-1]))


def server_cpu_s(pid: int) -> float:
    """CPU seconds a server (gunicorn's master) and its worker processes have used."""
    return sum(cpu_seconds(p) for p in [pid, *child_pids(pid)])


def database_cpu_s(database_url: str) -> float | None:
    """CPU seconds the database's PostgreSQL backends have used so far; None when they are not
    processes on this machine."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            pids = conn.scalars(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"
                )
            ).all()
    finally:
        engine.dispose()
    if not pids or not all(Path(f"/proc/{pid}").exists() for pid in pids):
        return None
    return sum(cpu_seconds(pid) for pid in pids)


def costed(
    run: Run, server: tuple[float, float], database: tuple[float | None, float | None]
) -> Run:
    """``run`` with the CPU per answer of the server and of the database, from their CPU
    seconds (before, after) the run."""
    answers = max(1, run.requests)
    db_before, db_after = database
    return replace(
        run,
        server_cpu_s=(server[1] - server[0]) / answers,
        database_cpu_s=(
            (db_after - db_before) / answers
            if db_before is not None and db_after is not None
            else None
        ),
    )
