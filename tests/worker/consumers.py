"""Stand-ins for Celery's worker consumer, as the worker's intake uses it (tests only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeTaskConsumer:
    """kombu's Consumer as the intake uses it: subscriptions by consumer tag."""

    _active_tags: dict[str, str] = field(default_factory=lambda: {"svd.cpu.fp32.8g": "tag"})
    calls: list[str] = field(default_factory=list)

    def cancel(self) -> None:
        self.calls.append("cancel")
        self._active_tags.clear()

    def consume(self) -> None:
        self.calls.append("consume")
        self._active_tags["svd.cpu.fp32.8g"] = "tag"


@dataclass
class FakeConsumer:
    """Celery's worker consumer: its task consumer (replaced on reconnection) and timer."""

    task_consumer: FakeTaskConsumer = field(default_factory=FakeTaskConsumer)
    timer: Any = None
