"""systemd's notify protocol (``sd_notify``) with the standard library.

:meth:`Notifier.from_env` reads ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace), ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. Without ``NOTIFY_SOCKET`` every method is
a no-op, so the daemon calls them unconditionally. A notify call never raises: when the socket
is gone, the first failure is logged at debug level and the rest are ignored.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

from daemon.logs import get_logger

#: systemd drains its socket promptly; the bound keeps a wedged manager from stalling the loop
SEND_TIMEOUT_S = 0.25


class Notifier:
    """Sends ``KEY=value`` datagrams to systemd: ``ready()``, ``status()``, ``watchdog()``, ..."""

    def __init__(
        self, address: str | None, *, watchdog_usec: str | None = None, watchdog_pid: str | None = None
    ) -> None:
        self.address = address or None
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._failed = False
        self.log = get_logger()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(
            environ.get("NOTIFY_SOCKET"),
            watchdog_usec=environ.get("WATCHDOG_USEC"),
            watchdog_pid=environ.get("WATCHDOG_PID"),
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half of ``WATCHDOG_USEC``, in seconds. None when there is no socket,
        no (valid, positive) ``WATCHDOG_USEC``, or ``WATCHDOG_PID`` names another process."""
        if self.address is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid.strip() != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 2_000_000 if usec > 0 else None

    def send(self, text: str) -> None:
        """Send ``text`` as one datagram; never raises."""
        if self.address is None:
            return
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]  # Linux abstract namespace
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT_S)
                sock.sendto(text.encode("utf-8"), os.fsencode(address))
        except (OSError, ValueError) as exc:  # ValueError: a name that cannot be encoded
            if not self._failed:
                self._failed = True
                self.log.debug("systemd notify failed", socket=self.address, error=str(exc))

    def notify(self, **fields: object) -> None:
        """``notify(READY=1, STATUS="...")``: one datagram of ``KEY=value`` lines (newlines in a
        value become spaces, since the protocol is line based)."""
        lines = (f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        self.send("\n".join(lines))

    def ready(self, status: str | None = None) -> None:
        if status is None:
            self.notify(READY=1)
        else:
            self.notify(READY=1, STATUS=status)

    def reloading(self) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC``, as ``Type=notify-reload`` (systemd 253+) requires;
        follow it with :meth:`ready` once the reload is done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING=1, MONOTONIC_USEC=now_usec)

    def stopping(self) -> None:
        self.notify(STOPPING=1)

    def status(self, text: str) -> None:
        self.notify(STATUS=text)

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    async def run_watchdog(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping every :attr:`watchdog_interval_s` until cancelled; return at once if there is no
        watchdog. While ``healthy()`` is False no ping is sent, so systemd restarts a wedged daemon."""
        interval = self.watchdog_interval_s
        if interval is None:
            return
        while True:
            if healthy is None or healthy():
                self.watchdog()
            await asyncio.sleep(interval)
