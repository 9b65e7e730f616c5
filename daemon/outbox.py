"""Outbox workers: one per sink, feeding it the deliveries the store holds for it.

Each sink has its own worker, so a failing sink never delays another; a delivery leaves
``pending`` only when the sink took it (at-least-once). Failures are retried with a capped
exponential backoff and logged once per incident.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from daemon.errors import SinkError
from daemon.logs import get_logger
from daemon.sinks import Sink
from daemon.store import Delivery, StoreRunner

RETRY_BASE_S = 1.0
RETRY_MAX_S = 60.0
BATCH = 100


def retry_delay(attempts: int, rng: random.Random, cap: float = RETRY_MAX_S) -> float:
    """Delay before the next attempt after ``attempts`` failed ones: doubling, ±10% jitter."""
    base = min(cap, RETRY_BASE_S * 2.0 ** min(max(0, attempts - 1), 32))
    return base * rng.uniform(0.9, 1.1)


class SinkWorker:
    def __init__(
        self,
        sink: Sink,
        runner: StoreRunner,
        *,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.sink = sink
        self.runner = runner
        self.wall = wall
        self.rng = rng or random.Random()
        self.wake = asyncio.Event()
        self.delivered = 0
        self.failing = False
        self._stopping = False
        self._retry_at = 0.0
        self.log = get_logger(sink=sink.name)

    def stop(self) -> None:
        self._stopping = True
        self.wake.set()

    async def run(self) -> None:
        """Deliver until :meth:`stop`; then one last pass over what is due, and return.

        After a failed attempt the whole sink waits for that delivery's retry time, so the
        events behind it keep their order and a broken sink is not hammered.
        """
        store = self.runner.store
        while True:
            self.wake.clear()
            due = await self.runner.run(store.due_deliveries, self.sink.name, self.wall(), BATCH)
            delivered_all = True
            for delivery in due:
                if not await self._deliver(delivery):
                    delivered_all = False
                    break
            more = delivered_all and len(due) == BATCH
            if self._stopping and not more:
                return
            if not more:
                await self._wait_for_work()

    async def _wait_for_work(self) -> None:
        """Sleep until a delivery is due, new events arrive (``wake``) or :meth:`stop`.

        While the sink is failing, new events do not cut the wait short: the sink rests
        until the failed delivery's retry time, so it is not hammered and order is kept.
        """
        store = self.runner.store
        next_at = await self.runner.run(store.next_delivery_at, self.sink.name)
        if self.failing:
            next_at = self._retry_at
        while not self._stopping:
            timeout = None if next_at is None else next_at - self.wall()
            if timeout is not None and timeout <= 0:
                return
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                return
            if not self.failing:
                return
            self.wake.clear()  # failing: new events wait for the retry time too

    async def _deliver(self, delivery: Delivery) -> bool:
        store = self.runner.store
        try:
            await self.sink.send(delivery.event_id, delivery.body)
        except SinkError as exc:
            now = self.wall()
            if not exc.retryable:
                self.log.exception(
                    "sink refused event; dead-lettered", event_id=delivery.event_id, error=str(exc)
                )
                await self.runner.run(store.mark_dead, delivery.seq, self.sink.name, str(exc), now)
                return True
            delay = (
                exc.retry_after
                if exc.retry_after is not None
                else retry_delay(delivery.attempts + 1, self.rng)
            )
            self._retry_at = now + delay
            if not self.failing:
                self.log.exception("sink failing; will retry", error=str(exc), retry_in_s=round(delay, 1))
                self.failing = True
            await self.runner.run(store.mark_retry, delivery.seq, self.sink.name, now + delay, str(exc), now)
            return False
        await self.runner.run(store.mark_delivered, delivery.seq, self.sink.name, self.wall())
        self.delivered += 1
        if self.failing:
            self.log.info("sink recovered")
            self.failing = False
        return True
