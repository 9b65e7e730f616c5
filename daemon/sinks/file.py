"""The file sink: NDJSON appended, fsync per event by default, reopened on SIGHUP."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from daemon.errors import ConfigError, SinkError
from daemon.sinks.base import BaseSink


class FileSink(BaseSink):
    """Appends one JSON line per event to ``path`` (created with mode 0600).

    Writes go through one file descriptor opened with ``O_APPEND``; ``reopen`` closes it and
    opens the path again, so logrotate's rename-then-HUP works.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        fsync: bool = True,
        events: frozenset[str] | None = None,
        key: str = "path",
    ) -> None:
        super().__init__(name, events)
        self.path = Path(path)
        self.fsync = fsync
        self._key = key
        self._fd: int | None = None

    def _open_fd(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    async def open(self) -> None:
        if not self.path.parent.is_dir():
            raise ConfigError(f"config error: {self._key}: folder {self.path.parent} does not exist")
        try:
            self._fd = self._open_fd()
        except OSError as exc:
            raise ConfigError(f"config error: {self._key}: cannot open {self.path}: {exc.strerror}") from None

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = self._open_fd()
        written = 0
        while written < len(data):
            written += os.write(self._fd, data[written:])
        if self.fsync:
            os.fsync(self._fd)

    async def send(self, event_id: str, body: str) -> None:
        try:
            await asyncio.to_thread(self._write, (body + "\n").encode())
        except OSError as exc:
            self._close_fd()  # try a fresh descriptor next time (the folder may come back)
            raise SinkError(f"{self.name}: cannot write {self.path}: {exc.strerror}") from None

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None

    async def reopen(self) -> None:
        self._close_fd()
        try:
            self._fd = self._open_fd()
        except OSError as exc:
            raise SinkError(f"{self.name}: cannot reopen {self.path}: {exc.strerror}") from None

    async def close(self) -> None:
        self._close_fd()
