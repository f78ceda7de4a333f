"""An HTTP load generator: C concurrent keep-alive clients on asyncio, each sending one request
after another for a fixed time; prints one JSON object with the counts, the requests per second
and the latency percentiles.

    .venv/bin/python -m bench.loadgen http://127.0.0.1:8000/api/v1/jobs/ID --concurrency 64
    .venv/bin/python -m bench.loadgen URL --method POST --body-file BODY --content-type TYPE

It runs in its own process so that its work is not counted in the server's, and sends raw
HTTP/1.1 over asyncio streams, which costs far less per request than a full client library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import percentile


def build_request(method: str, url: str, body: bytes, content_type: str) -> tuple[str, int, bytes]:
    """The host, the port and the bytes of one keep-alive request."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = [f"{method} {target or '/'} HTTP/1.1", f"Host: {host}:{port}", "Accept: */*"]
    if body or method in ("POST", "PUT"):
        head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return host, port, ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; returns its status and whether the server keeps the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    keep = headers.get("connection", "").lower() != "close"
    return status, keep


async def client(
    host: str, port: int, request: bytes, deadline: float, latencies: list[float], codes: Counter
) -> None:
    """One client: send the request, read the answer, again, until the deadline."""
    reader = writer = None
    while time.perf_counter() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            sent = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status, keep = await read_response(reader)
            latencies.append(time.perf_counter() - sent)
            codes[status] += 1
            if not keep:
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            codes[type(error).__name__] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def run(
    method: str, url: str, body: bytes, content_type: str, concurrency: int, duration_s: float
) -> dict[str, object]:
    """Load ``url`` with ``concurrency`` clients for ``duration_s`` seconds."""
    host, port, request = build_request(method, url, body, content_type)
    latencies: list[float] = []
    codes: Counter = Counter()
    started = time.perf_counter()
    deadline = started + duration_s
    await asyncio.gather(
        *(client(host, port, request, deadline, latencies, codes) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - started

    def pct(q: float) -> float | None:
        return percentile(latencies, q) if latencies else None

    ok = sum(n for code, n in codes.items() if isinstance(code, int) and code < 400)
    return {
        "requests": len(latencies),
        "ok": ok,
        "codes": {str(code): n for code, n in codes.items()},
        "elapsed_s": elapsed,
        "rps": ok / elapsed,
        "p50_s": pct(50),
        "p90_s": pct(90),
        "p99_s": pct(99),
        "max_s": max(latencies, default=None),
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the load, print the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body-file", type=Path, default=None)
    parser.add_argument("--content-type", default="application/octet-stream")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    args = parser.parse_args(argv)
    body = args.body_file.read_bytes() if args.body_file else b""
    result = asyncio.run(
        run(args.method, args.url, body, args.content_type, args.concurrency, args.duration)
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
