"""An in-memory sink for tests and the demo: keeps what it was sent, can be told to fail."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from daemon.errors import SinkError
from daemon.sinks.base import BaseSink


class MemorySink(BaseSink):
    def __init__(
        self,
        name: str = "memory",
        *,
        events: frozenset[str] | None = None,
        on_event: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None,
    ) -> None:
        super().__init__(name, events)
        self.received: list[dict[str, Any]] = []
        self.fail_next = 0
        self.opened = False
        self.reopened = 0
        self._on_event = on_event

    async def open(self) -> None:
        self.opened = True

    async def send(self, event_id: str, body: str) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise SinkError(f"{self.name}: told to fail")
        event = json.loads(body)
        self.received.append(event)
        if self._on_event is not None:
            result = self._on_event(event)
            if result is not None:
                await result

    async def reopen(self) -> None:
        self.reopened += 1

    async def close(self) -> None:
        self.opened = False
