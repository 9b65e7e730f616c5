"""The file sink: NDJSON appended, fsync per event by default, reopened on SIGHUP.

The file only ever holds whole lines. A write that fails part-way (a short write, then
ENOSPC or EFBIG when the disk fills up) is cut off again before the error is reported, and
whenever that cut may not have happened (a failed attempt, a crash, a fresh open) the next
write first trims anything after the last newline. The event stays pending and is written
whole once there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path

from daemon.errors import ConfigError, SinkError
from daemon.logs import get_logger
from daemon.sinks.base import BaseSink

#: how much of the file's end is read at a time while looking for the last newline
_TAIL_CHUNK = 64 * 1024


def trim_partial_line(fd: int) -> int:
    """Cut whatever follows the last ``\\n`` of the file open on ``fd``; the bytes removed."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    os.ftruncate(fd, end)
    return size - end


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
        #: the file may end in a partial line (fresh descriptor, or an attempt failed)
        self._check_tail = True
        self.log = get_logger(sink=name)

    def _open_fd(self) -> int:
        flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:  # read access too: finding the last newline reads the file's end
            fd = os.open(self.path, os.O_RDWR | flags, 0o600)
        except PermissionError:  # a write-only file: appended to, never trimmed
            fd = os.open(self.path, os.O_WRONLY | flags, 0o600)
            self._check_tail = False
        else:  # a FIFO or a device has no end to trim
            self._check_tail = stat.S_ISREG(os.fstat(fd).st_mode)
        return fd

    async def open(self) -> None:
        if not self.path.parent.is_dir():
            raise ConfigError(f"config error: {self._key}: folder {self.path.parent} does not exist")
        try:
            self._fd = self._open_fd()
        except OSError as exc:
            raise ConfigError(f"config error: {self._key}: cannot open {self.path}: {exc.strerror}") from None

    def _write(self, data: bytes) -> int:
        """Append ``data`` whole or not at all; the bytes of an earlier partial line removed."""
        if self._fd is None:
            self._fd = self._open_fd()
        fd = self._fd
        trimmed = 0
        if self._check_tail:
            trimmed = trim_partial_line(fd)
            self._check_tail = False
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
            if self.fsync:
                os.fsync(fd)
        except OSError:
            self._check_tail = True  # should the cut below fail too, the next attempt trims
            with contextlib.suppress(OSError):
                if written:  # O_APPEND left the offset at the end of what this call wrote
                    os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) - written)
                self._check_tail = False
            raise
        return trimmed

    async def send(self, event_id: str, body: str) -> None:
        try:
            trimmed = await asyncio.to_thread(self._write, (body + "\n").encode())
        except OSError as exc:
            self._close_fd()  # try a fresh descriptor next time (the folder may come back)
            raise SinkError(f"{self.name}: cannot write {self.path}: {exc.strerror}") from None
        if trimmed:
            self.log.warning("removed a partial line from the file's end", path=str(self.path), bytes=trimmed)

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
