"""Reading server-sent events in tests: from a Flask test response or a socket, in a thread."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sse:
    """One server-sent event as a client sees it."""

    event: str
    data: dict[str, Any]
    id: int | None


class SseReader:
    """Parses an event stream's chunks in a background thread; :meth:`next` waits for one."""

    END = object()

    def __init__(self, chunks: Iterable[bytes]) -> None:
        """Start reading ``chunks`` (a streaming response's body)."""
        self.events: queue.Queue[object] = queue.Queue()
        self.comments = 0
        self.retry_ms: int | None = None
        self._thread = threading.Thread(target=self._read, args=(chunks,), daemon=True)
        self._thread.start()

    def _read(self, chunks: Iterable[bytes]) -> None:
        """Split the stream into events, as EventSource does (one data line each here)."""
        buffer = b""
        try:
            for chunk in chunks:
                buffer += chunk
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self._block(block.decode())
        finally:
            self.events.put(self.END)

    def _block(self, block: str) -> None:
        """One block of lines: an event, a comment or the retry time."""
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "retry" in fields:
            self.retry_ms = int(fields["retry"])
        if "data" in fields:
            raw_id = fields.get("id")
            self.events.put(
                Sse(
                    fields.get("event", "message"),
                    json.loads(fields["data"]),
                    int(raw_id) if raw_id else None,
                )
            )

    def next(self, timeout_s: float = 10.0) -> Sse | None:
        """The next event; None once the stream has ended; AssertionError after ``timeout_s``."""
        try:
            found = self.events.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no server-sent event within {timeout_s} s") from None
        if found is self.END:
            self.events.put(self.END)
            return None
        assert isinstance(found, Sse)
        return found

    def until(self, predicate: Any, timeout_s: float = 10.0) -> list[Sse]:
        """Events up to and with the first one ``predicate`` accepts."""
        seen = []
        while True:
            found = self.next(timeout_s)
            assert found is not None, f"the stream ended before the event looked for: {seen}"
            seen.append(found)
            if predicate(found):
                return seen

    def rest(self, timeout_s: float = 10.0) -> list[Sse]:
        """Every event until the stream ends."""
        seen = []
        while (found := self.next(timeout_s)) is not None:
            seen.append(found)
        return seen
