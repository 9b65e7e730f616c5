"""The poller's two ways into the store: a group commit for what must be durable at once, and
a write-behind for what may wait.

* :meth:`StoreWriter.durable`: a poll that found events (or moved the detector's cursor)
  waits until they are committed, before any sink sees them. Polls that finish while a
  commit is running are committed together in the next transaction, so one fsync serves many
  polls and the fsync rate does not bound the poll rate.
* :meth:`StoreWriter.later`: a poll that found nothing new changes only times and pacing
  (and the detector's bookkeeping for expiry). The watch is marked dirty and written with the
  others every ``flush_every_s`` seconds, and at shutdown. A crash loses at most that much
  pacing history: never an event, never a cursor.

Both go through the store's single worker thread (:class:`~daemon.store.StoreRunner`), which
runs calls in the order they were submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from daemon.events import Event
from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.store import STORE_ERRORS, PollRecord, StoreRunner

#: how often the pacing of quiet polls is written back
FLUSH_EVERY_S = 5.0
#: the most polls one group commit takes (a bound on one transaction's length)
MAX_GROUP = 1000

Pairs = Sequence[tuple[Event, Sequence[str]]]


class Dirty(Protocol):
    """A watch whose latest poll is not yet in the store."""

    short_id: str

    def poll_record(self, wall_offset: float, next_if_unscheduled: float) -> PollRecord: ...


class StoreWriter:
    def __init__(
        self,
        runner: StoreRunner,
        *,
        flush_every_s: float = FLUSH_EVERY_S,
        metrics: Metrics | None = None,
        wall_offset: Callable[[], float] = lambda: 0.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.runner = runner
        #: Unix time minus the poller's clock (records turn due times into Unix times)
        self.wall_offset = wall_offset
        self.wall = wall
        self.metrics = metrics or Metrics()
        self.flush_every_s = flush_every_s
        self._queue: list[tuple[PollRecord, Pairs, asyncio.Future[list[str]]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._dirty: dict[str, Dirty] = {}
        self._flush_lock = asyncio.Lock()
        self.flush_failing = False
        self.log = get_logger()

    # -- durable: group commit ----------------------------------------------------------

    async def durable(self, record: PollRecord, pairs: Pairs) -> list[str]:
        """Commit ``record`` with its events; returns the ids new to the store. Raises what the
        store raised (one of :data:`~daemon.store.STORE_ERRORS`): then nothing of this poll was
        recorded."""
        self._dirty.pop(record.short_id, None)  # this record is newer and complete
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._queue.append((record, pairs, future))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_all(), name="group-commit")
        return await future

    async def _commit_all(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                await self._commit(group)
        finally:
            self._committer = None

    async def _commit(self, group: list[tuple[PollRecord, Pairs, asyncio.Future[list[str]]]]) -> None:
        store = self.runner.store
        try:
            news = await self.runner.run(store.save_polls, [(record, pairs) for record, pairs, _ in group])
        except STORE_ERRORS as exc:
            if len(group) > 1 and isinstance(exc, sqlite3.Error):
                # one poll's bad row must not fail the others: one by one (not when the store
                # is unreachable, which fails them all alike, and each try waits for a connection)
                for item in group:
                    await self._commit([item])
                return
            if len(group) > 1:
                for _, _, future in group:
                    _settle(future, exc)
                return
            _settle(group[0][2], exc)
            return
        self.metrics.group_commits.inc()
        self.metrics.group_committed_polls.inc(len(group))
        for (_, _, future), new in zip(group, news, strict=True):
            _settle(future, new)

    # -- later: write-behind ------------------------------------------------------------

    def later(self, watch: Dirty) -> None:
        """Write ``watch``'s latest poll with the next flush."""
        self._dirty[watch.short_id] = watch

    def discard(self, short_id: str) -> None:
        """Forget an unwritten poll of a watch that ended or was forgotten."""
        self._dirty.pop(short_id, None)

    @property
    def dirty(self) -> int:
        return len(self._dirty)

    async def flush(self) -> None:
        """Write every dirty watch's latest poll in one transaction."""
        async with self._flush_lock:
            if not self._dirty:
                return
            taken, self._dirty = self._dirty, {}
            # a watch being polled as this runs is not scheduled: its next poll is now
            offset, now = self.wall_offset(), self.wall()
            records = [watch.poll_record(offset, now) for watch in taken.values()]
            try:
                await self.runner.run(self.runner.store.save_poll_times, records)
            except BaseException:
                for key, watch in taken.items():  # newer marks win; the rest are tried again
                    self._dirty.setdefault(key, watch)
                raise

    async def run_flusher(self) -> None:
        """Flush every ``flush_every_s`` until cancelled; a failing store is logged once."""
        while True:
            await asyncio.sleep(self.flush_every_s)
            try:
                await self.flush()
            except STORE_ERRORS as exc:
                if not self.flush_failing:
                    self.log.warning("cannot write poll times to the state store; will retry", error=str(exc))
                self.flush_failing = True
            else:
                self.flush_failing = False

    def abort(self) -> None:
        """Stop committing (shutdown with the store not answering): the polls waiting for it
        get an error, as if the commit failed; nothing they found was recorded."""
        if self._committer is not None:
            self._committer.cancel()
        for _, _, future in self._queue:
            if not future.done():
                future.cancel()
        self._queue.clear()

    async def close(self) -> None:
        """Finish the commits under way and write what is dirty (at shutdown)."""
        if self._committer is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._committer)
        try:
            await self.flush()
        except STORE_ERRORS as exc:
            self.log.warning("cannot write poll times to the state store at shutdown", error=str(exc))


def _settle(future: asyncio.Future[list[str]], outcome: list[str] | BaseException) -> None:
    if future.done():  # its poll was cancelled (shutdown): the commit stands regardless
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
