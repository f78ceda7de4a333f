"""A real webhook receiver for tests: an HTTP server in a thread that answers each POST as
the test says (a status and headers, 204 once told nothing more), keeps every request, and
is stopped and started again on its port (while stopped, connections are refused)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.http import free_port


@dataclass
class Received:
    """One request the receiver got, and the status it answered."""

    headers: dict[str, str]
    body: bytes
    status: int
    path: str = ""

    @property
    def msg_id(self) -> str:
        """Its ``webhook-id``."""
        return self.headers["webhook-id"]

    @property
    def type(self) -> str:
        """Its payload's type."""
        return str(json.loads(self.body)["type"])


@dataclass
class Receiver:
    """An HTTP server in a thread: answers each POST with the next of ``answers`` (status,
    headers), 204 once they run out, and keeps every request."""

    port: int
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    got: list[Received] = field(default_factory=list)
    delay_s: float = 0.0
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        """Where it listens."""
        return f"http://127.0.0.1:{self.port}/hook?x=1"

    def start(self) -> None:
        """Listen on :attr:`port` (again, after :meth:`stop`)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.delay_s:
                    threading.Event().wait(receiver.delay_s)
                with receiver.lock:
                    status, headers = receiver.answers.pop(0) if receiver.answers else (204, {})
                    got = {k.lower(): v for k, v in self.headers.items()}
                    receiver.got.append(Received(got, body, status, self.path))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop listening (connections are refused)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def received(self) -> list[Received]:
        """A copy of the requests so far, in the order they came."""
        with self.lock:
            return list(self.got)

    def delivered(self) -> list[Received]:
        """The requests it answered 2xx, in the order they came."""
        return [r for r in self.received() if 200 <= r.status < 300]


@contextmanager
def listening() -> Iterator[Receiver]:
    """A receiver on a free port, listening until the block ends."""
    found = Receiver(free_port())
    found.start()
    try:
        yield found
    finally:
        found.stop()
