"""Make sure the PostgreSQL and Redis the benchmarks use are up: start local ones that are down
(as the CI script does), then fail, never skip, if either cannot be reached.

    .venv/bin/python -m bench.services

The servers are the ones ``SVDFARM_BENCH_DATABASE_URL`` and ``SVDFARM_BENCH_REDIS_URL`` name
(default: PostgreSQL and Redis on 127.0.0.1). Only a server on this machine is started.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

from bench.common import pg_server_url, redis_url

LOCAL = {"127.0.0.1", "localhost", "::1"}


def _address(url: str, default_port: int) -> tuple[str, int]:
    """The host and port a URL names."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def pg_up(host: str, port: int) -> bool:
    """True when something accepts connections on PostgreSQL's address."""
    try:
        socket.create_connection((host, port), 2).close()
        return True
    except OSError:
        return False


def redis_up(host: str, port: int) -> bool:
    """True when Redis answers PING."""
    try:
        with socket.create_connection((host, port), 2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_postgres() -> None:
    """Start the local PostgreSQL cluster (Debian's pg_ctlcluster)."""
    versions = sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*"))
    if versions:
        command = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"]
        subprocess.run(command, check=False)


def start_redis(port: int) -> None:
    """Start a local Redis without persistence."""
    os.makedirs("/var/lib/redis", exist_ok=True)
    os.makedirs("/var/log/redis", exist_ok=True)
    command = [
        "redis-server",
        "--daemonize",
        "yes",
        "--bind",
        "127.0.0.1",
        "-::1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        "/var/lib/redis",
        "--logfile",
        "/var/log/redis/bench.log",
    ]
    try:
        subprocess.run(command, check=False)
    except FileNotFoundError:
        pass


def main() -> int:
    """Start what is down and local; exit non-zero unless both servers answer."""
    pg = _address(pg_server_url(), 5432)
    redis = _address(redis_url(), 6379)
    if not pg_up(*pg) and pg[0] in LOCAL:
        print("PostgreSQL is down; starting it", flush=True)
        start_postgres()
    if not redis_up(*redis) and redis[0] in LOCAL:
        print("Redis is down; starting it", flush=True)
        start_redis(redis[1])
    for _ in range(30):
        if pg_up(*pg) and redis_up(*redis):
            return 0
        time.sleep(1)
    if not pg_up(*pg):
        print(f"PostgreSQL is not reachable on {pg[0]}:{pg[1]}", file=sys.stderr)
    if not redis_up(*redis):
        print(f"Redis is not reachable on {redis[0]}:{redis[1]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
