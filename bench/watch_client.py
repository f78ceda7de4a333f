"""The watchers of :mod:`bench.watchers`: many server-sent event streams held open from one
process, the time each progress step arrives on each of them.

    python -m bench.watch_client --base http://127.0.0.1:8000 --jobs ID,ID --watchers 1000

Plain asyncio on raw sockets (HTTP/1.1, chunked transfer decoding, the stream split into
events by hand), so the watchers take as little CPU as they can beside the web they load.
Connection ``n`` follows job ``n mod len(jobs)``; connections open in batches
(``--batch``, ``--batch-pause``). A connection counts as connected once its first
``progress`` message (the job's progress at connect) has arrived: the server registered its
watch before it sent that.

It talks to the benchmark through its standard streams, one JSON object a line on stdout:
``{"ready": {"connected": N, "errors": [...]}}`` once every connection is connected or has
failed, then, when stdin closes, ``{"result": {"connected": N, "errors": [...],
"received": {job: {step: [receive times]}}}}`` (``time.time()`` at each read that brought a
``progress`` message of that step) and it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: Errors kept in the report at most (the count is always whole).
MAX_ERRORS = 20


@dataclass
class Tally:
    """What the watchers saw: receive times by job and step, connections and failures."""

    received: dict[str, dict[int, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    connected: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        """Count a failure, keeping its text while few."""
        self.failed += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)

    def report(self) -> dict[str, object]:
        """The tally as JSON-ready data."""
        return {
            "connected": self.connected,
            "failed": self.failed,
            "errors": self.errors,
            "received": {
                job: {str(step): times for step, times in steps.items()}
                for job, steps in self.received.items()
            },
        }


class Stream:
    """One event stream's body: chunked transfer decoding and the split into events."""

    def __init__(self, reader: asyncio.StreamReader, chunked: bool) -> None:
        """Read the body from ``reader`` (HTTP chunked when ``chunked``)."""
        self.reader, self.chunked = reader, chunked
        self.buffer = b""

    async def read(self) -> bytes:
        """The next piece of the body; empty at its end."""
        if not self.chunked:
            return await self.reader.read(65536)
        size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            return b""
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    def events(self, data: bytes) -> list[bytes]:
        """The whole events ``data`` completes (each without its blank line)."""
        self.buffer += data
        *done, self.buffer = self.buffer.split(b"\n\n")
        return done


def progress_step(block: bytes) -> int | None:
    """The ``step`` of a ``progress`` event, None for any other block."""
    if not (block.startswith(b"event: progress\n") or b"\nevent: progress\n" in block):
        return None
    for line in block.split(b"\n"):
        if line.startswith(b"data: "):
            step = json.loads(line[6:]).get("step")
            return int(step) if step is not None else None
    return None


async def watch(host: str, port: int, job: str, tally: Tally, connected: asyncio.Event) -> None:
    """Follow ``job``'s stream until it ends or is cancelled, recording each progress step."""
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"GET /api/v1/jobs/{job}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n".encode()
        )
        status = await reader.readuntil(b"\r\n")
        headers = (await reader.readuntil(b"\r\n\r\n")).lower()
        if status.split(b" ", 2)[1] != b"200":
            raise ConnectionError(f"answered {status.decode().strip()!r}")
        stream = Stream(reader, b"transfer-encoding: chunked" in headers)
        mine = tally.received[job]
        while data := await stream.read():
            now = time.time()
            for block in stream.events(data):
                step = progress_step(block)
                if step is None:
                    continue
                mine[step].append(now)
                if not connected.is_set():
                    tally.connected += 1
                    connected.set()
        raise ConnectionError("the server ended the stream")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # each watcher's failure is a figure, not the run's end
        tally.error(f"{job}: {type(exc).__name__}: {exc}")
        connected.set()
    finally:
        if writer is not None:
            writer.close()


def emit(key: str, value: object) -> None:
    """Write one JSON line to stdout for the benchmark."""
    sys.stdout.write(json.dumps({key: value}) + "\n")
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> None:
    """Open the watchers in batches, say when they are ready, follow until stdin closes."""
    url = urlsplit(args.base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    jobs = [job for job in args.jobs.split(",") if job]
    tally = Tally()
    tasks: list[asyncio.Task[None]] = []
    deadline = time.monotonic() + args.connect_timeout
    for start in range(0, args.watchers, args.batch):
        batch = []
        for n in range(start, min(start + args.batch, args.watchers)):
            connected = asyncio.Event()
            task = asyncio.create_task(watch(host, port, jobs[n % len(jobs)], tally, connected))
            tasks.append(task)
            batch.append(connected.wait())
        left = max(0.1, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.gather(*batch), left)
        except asyncio.TimeoutError:
            tally.error(f"not all connected within {args.connect_timeout:g} s")
            break
        await asyncio.sleep(args.batch_pause)
    emit("ready", {"connected": tally.connected, "failed": tally.failed, "errors": tally.errors})
    # Until the benchmark closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    emit("result", tally.report())


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the watchers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the web's base URL")
    parser.add_argument("--jobs", required=True, help="comma-separated job ids")
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100, help="connections opened at once")
    parser.add_argument("--batch-pause", type=float, default=0.1, help="seconds between")
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.watchers + 100
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
