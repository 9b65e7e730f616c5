"""The stdout sink: one JSON line per event, flushed at once (logs go to stderr).

Writes happen on a dedicated daemon thread: when stdout is a pipe whose reader is slow or
stuck, only this sink waits (its events stay pending); the event loop, the other sinks and
the control API carry on, and the process can still stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sys
import threading
from typing import TextIO

from daemon.errors import SinkError
from daemon.sinks.base import BaseSink

_Job = tuple[str, "concurrent.futures.Future[None]"]


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
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _writer(self) -> None:
        while (job := self._jobs.get()) is not None:
            text, done = job
            stream = self._stream or sys.stdout
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError) as exc:  # ValueError: write to a closed file
                done.set_exception(SinkError(f"stdout: cannot write: {exc}"))
            else:
                done.set_result(None)

    async def open(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="qawatch-stdout", daemon=True)
            self._thread.start()

    async def send(self, event_id: str, body: str) -> None:
        await self.open()
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._jobs.put((body + "\n", done))
        await asyncio.wrap_future(done)

    async def close(self) -> None:
        # a writer stuck on a full pipe is a daemon thread: it does not hold up the exit
        self._jobs.put(None)
        self._thread = None
