"""The stdout sink: one JSON line per event, flushed at once (logs go to stderr)."""

from __future__ import annotations

import sys
from typing import TextIO

from daemon.errors import SinkError
from daemon.sinks.base import BaseSink


class StdoutSink(BaseSink):
    def __init__(
        self,
        name: str = "stdout",
        *,
        events: frozenset[str] | None = None,
        stream: TextIO | None = None,
    ) -> None:
        super().__init__(name, events)
        self._stream = stream

    async def send(self, event_id: str, body: str) -> None:
        stream = self._stream or sys.stdout
        try:
            stream.write(body + "\n")
            stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: write to a closed file
            raise SinkError(f"stdout: cannot write: {exc}") from None
