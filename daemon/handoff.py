"""The scheduler's bounded hand-off to the poll workers.

It behaves as :class:`asyncio.Queue` does for what the poller uses (``put``, ``get``,
``task_done``, ``join``; FIFO; ``put`` waits while ``maxsize`` items wait), for one event
loop. It exists because the poll path calls it twice per poll: ``asyncio.Queue`` looks the
running loop up on every wait, which on Python 3.11 is a ``getpid()`` system call; this one
looks it up once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self._unfinished = 0
        self._idle: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _future(self) -> asyncio.Future[None]:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.create_future()

    @staticmethod
    def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _full(self) -> bool:
        return len(self._items) >= self.maxsize

    def _empty(self) -> bool:
        return not self._items

    async def _wait(self, waiters: deque[asyncio.Future[None]], blocked: Callable[[], bool]) -> None:
        """Wait in ``waiters`` until woken. Cancelled after being woken, while no longer
        ``blocked``: pass the wake-up on (a free place or an item must not go unclaimed)."""
        waiter = self._future()
        waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            waiter.cancel()
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            if not blocked() and not waiter.cancelled():
                self._wake_one(waiters)
            raise

    async def put(self, item: T) -> None:
        while self._full():
            await self._wait(self._putters, self._full)
        self._items.append(item)
        self._unfinished += 1
        self._wake_one(self._getters)

    async def get(self) -> T:
        while not self._items:
            await self._wait(self._getters, self._empty)
        item = self._items.popleft()
        self._wake_one(self._putters)
        return item

    def task_done(self) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0 and self._idle is not None:
            if not self._idle.done():
                self._idle.set_result(None)
            self._idle = None

    async def join(self) -> None:
        """Wait until every item put has been marked done (as asyncio's: once the count
        reached zero, a put before this wakes up does not make it wait again)."""
        if self._unfinished:
            if self._idle is None:
                self._idle = self._future()
            await asyncio.shield(self._idle)
