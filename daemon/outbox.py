"""Outbox workers: one per sink, feeding it the deliveries the store holds for it.

Each sink has its own worker, so a failing sink never delays another; a delivery leaves
``pending`` only when the sink took it (at-least-once). The sink decides the retry policy
(:meth:`~daemon.sinks.base.BaseSink.retry_delay`); failures are logged once per incident.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

from daemon.errors import SinkDisabledError, SinkError
from daemon.logs import get_logger, scrub
from daemon.metrics import Metrics
from daemon.sinks import Sink
from daemon.store import STORE_ERRORS, Delivery, StoreRunner

BATCH = 100
#: how often an idle worker looks at the store anyway (deliveries replayed by another process)
RECHECK_S = 5.0
#: the shortest wait a receiver's Retry-After can ask for
MIN_RETRY_AFTER_S = 1.0
#: how long a worker waits after the state store failed (disk full, locked)
STORE_RETRY_S = 2.0


class SinkWorker:
    def __init__(
        self,
        sink: Sink,
        runner: StoreRunner,
        *,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.sink = sink
        self.metrics = metrics or Metrics()
        self.runner = runner
        self.wall = wall
        self.rng = rng or random.Random()
        self.wake = asyncio.Event()
        self.delivered = 0
        self.failing = False
        #: why the last attempt failed, while ``failing``
        self.last_error: str | None = None
        self.disabled = False
        self.store_failing = False
        self._stopping = False
        self._retry_at = 0.0
        #: delivered, not yet marked so in the store (see :meth:`_mark`)
        self._marks: list[int] = []
        self._marker: asyncio.Task[None] | None = None
        self.log = get_logger(sink=sink.name)

    def stop(self) -> None:
        self._stopping = True
        self.wake.set()

    async def run(self) -> None:
        """Deliver until :meth:`stop`; then one last pass over what is due, and return.

        After a failed attempt the whole sink waits for that delivery's retry time, so a
        broken receiver is not hammered and the events behind it keep their order.
        """
        try:
            await self._run()
        finally:
            if self._marker is not None and not self._marker.done():
                # cancelled past the grace period: unmarked deliveries are sent again next time
                self._marker.cancel()

    async def _run(self) -> None:
        store = self.runner.store
        chunk = max(1, self.sink.max_concurrency)
        while not self.disabled:
            self.wake.clear()
            try:
                due = await self.runner.run(store.due_deliveries, self.sink.name, self.wall(), BATCH)
                all_taken = True
                for start in range(0, len(due), chunk):
                    results = await asyncio.gather(*(self._deliver(d) for d in due[start : start + chunk]))
                    if not all(results):
                        all_taken = False
                        break
                await self._settle_marks()  # before the store is asked what is due again
                self.store_failing = False
            except STORE_ERRORS as exc:
                # what was sent but not marked stays pending and is sent again (at-least-once)
                if not self.store_failing:
                    self.log.error("cannot use the state store; will retry", error=str(exc))
                self.store_failing = True
                if self._stopping:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait_for_stop(), STORE_RETRY_S)
                continue
            more = all_taken and len(due) == BATCH
            if self._stopping and not more:
                return
            if not more and not self.disabled:
                await self._wait_for_work()
        await self._wait_for_stop()

    async def _wait_for_stop(self) -> None:
        """Until :meth:`stop`: a disabled sink keeps its events pending and does nothing."""
        while not self._stopping:
            self.wake.clear()
            await self.wake.wait()

    async def _wait_for_work(self) -> None:
        """Sleep until a delivery is due, new events arrive (``wake``) or :meth:`stop`.

        While the sink is failing, new events do not cut the wait short: the sink rests
        until the failed delivery's retry time.
        """
        store = self.runner.store
        resting = self.failing and self._retry_at > self.wall()
        if resting:
            # rest until the retry time, even if other deliveries are due meanwhile
            next_at = self._retry_at
        else:
            due = await self.runner.run(store.next_delivery_at, self.sink.name)
            recheck = self.wall() + RECHECK_S  # replays by `qawatch dead-letters` land here
            next_at = recheck if due is None else min(due, recheck)
        while not self._stopping:
            timeout = next_at - self.wall()
            if timeout <= 0:
                return
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                return
            if not resting:
                return
            self.wake.clear()  # resting: new events wait for the retry time too

    async def _send(self, delivery: Delivery) -> None:
        """The sink's send; an unexpected exception (a bug, a value aiohttp refuses) becomes a
        retryable :class:`SinkError` so one bad delivery cannot stop the daemon."""
        try:
            await self.sink.send(delivery.event_id, delivery.body)
        except SinkError:
            raise
        except Exception as exc:  # see the docstring; logged with its traceback
            self.log.exception("sink raised unexpectedly", event_id=delivery.event_id)
            raise SinkError(f"{self.sink.name}: {type(exc).__name__}: {exc}") from None

    async def _deliver(self, delivery: Delivery) -> bool:
        """One attempt; True when the delivery is settled (delivered or dead-lettered)."""
        store = self.runner.store
        name = self.sink.name
        max_age = self.sink.max_age_s
        if max_age is not None and self.wall() - delivery.created_at > max_age:
            await self._dead(delivery, f"not delivered within max_age_s={max_age:g}")
            return True
        try:
            await self._send(delivery)
        except SinkDisabledError as exc:
            if not self.disabled:
                self.log.error(
                    "receiver answered 410 Gone: sink disabled, events kept pending until qawatch "
                    "is restarted",
                    error=str(exc),
                )
            self.disabled = True
            self.metrics.deliveries.labels(name, "disabled").inc()
            self.metrics.sink_disabled.labels(name).set(1)
            return False
        except SinkError as exc:
            now = self.wall()
            attempts = delivery.attempts + 1
            if not exc.retryable:
                await self._dead(delivery, str(exc))
                return True
            # the schedule bounds the attempts; a Retry-After only replaces the next delay
            delay = self.sink.retry_delay(attempts, self.rng)
            if delay is None:
                await self._dead(delivery, f"gave up after {attempts} attempts: {exc}")
                return True
            if exc.retry_after is not None:  # "Retry-After: 0" must not burn the schedule at once
                delay = max(MIN_RETRY_AFTER_S, exc.retry_after)
            self._retry_at = max(self._retry_at, now + delay)
            self.last_error = str(exc)
            if not self.failing:
                self.log.error("sink failing; will retry", error=str(exc), retry_in_s=round(delay, 1))
                self.failing = True
            else:
                self.log.debug("sink still failing", error=str(exc), retry_in_s=round(delay, 1))
            # what is stored is shown by `dead-letters list`: no secret in it
            await self.runner.run(store.mark_retry, delivery.seq, name, now + delay, scrub(str(exc)), now)
            self.metrics.deliveries.labels(name, "retry").inc()
            return False
        self._mark(delivery.seq)
        self.metrics.deliveries.labels(name, "delivered").inc()
        self.delivered += 1
        if self.failing:
            self.log.info("sink recovered")
            self.failing = False
            self.last_error = None
        return True

    def _mark(self, seq: int) -> None:
        """Mark ``seq`` delivered. The marks of the deliveries sent while one commit runs go in
        the next, together: a sink is not held to one fsync per event. A crash before the
        commit sends those few again, with the same ids (at-least-once)."""
        self._marks.append(seq)
        marker = self._marker
        if marker is not None and marker.done():
            if not marker.cancelled():
                marker.exception()  # seen here; its marks are back in the list and go next
            marker = None
        if marker is None:
            self._marker = asyncio.create_task(self._commit_marks(), name=f"marks:{self.sink.name}")

    async def _commit_marks(self) -> None:
        while self._marks:
            seqs, self._marks = self._marks, []
            try:
                await self.runner.run(
                    self.runner.store.mark_delivered_many, seqs, self.sink.name, self.wall()
                )
            except BaseException:
                self._marks[:0] = seqs
                raise

    async def _settle_marks(self) -> None:
        """Wait until every mark made so far is committed; raises the store's error."""
        marker, self._marker = self._marker, None
        if marker is not None:
            await marker
        if self._marks:  # left by a commit that failed
            await self._commit_marks()

    async def _dead(self, delivery: Delivery, error: str) -> None:
        self.log.error("event dead-lettered", event_id=delivery.event_id, error=error)
        await self.runner.run(
            self.runner.store.mark_dead, delivery.seq, self.sink.name, scrub(error), self.wall()
        )
        self.metrics.deliveries.labels(self.sink.name, "dead").inc()
