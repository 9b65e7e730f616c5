"""The poller: one scheduler loop over a due-time heap feeding a bounded pool of workers.

Each worker polls one conversation, runs the pure detector, and saves the new detector state
together with any new events in one store transaction before waking the sink workers.
Timing decisions come from :mod:`daemon.scheduler`; this module only applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from daemon.detect import WINDOW_MAX, Backfill, Detection, WatchState, detect, expired
from daemon.errors import (
    AuthError,
    BadResponseError,
    NotFoundError,
    RateLimitedError,
    RejectedError,
    TransientError,
)
from daemon.events import Event, watch_ended_event
from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.outage import Outage
from daemon.qatech import Conversation, QATechClient
from daemon.scheduler import (
    DueHeap,
    Pacing,
    TokenBucket,
    auth_pause,
    error_backoff,
    initial_offsets,
    jittered,
    next_interval,
    rate_limit_pause,
)
from daemon.sinks import Sink, accepts
from daemon.store import PollRecord, StoreRunner, WatchRow


@dataclass
class Watch:
    """A watched conversation as the poller holds it in memory."""

    short_id: str
    backfill: Backfill
    started_at: float
    state: WatchState = field(default_factory=WatchState)
    interval_s: float | None = None
    errors: int = 0
    last_status: str | None = None
    #: its errors fell in an upstream-wide outage, logged once for all conversations
    quiet_errors: bool = False

    @classmethod
    def from_row(cls, row: WatchRow) -> Watch:
        backfill: Backfill = "none" if row.backfill == "none" else "latest"
        return cls(
            short_id=row.short_id,
            backfill=backfill,
            started_at=row.started_at,
            state=WatchState.from_json(row.detector),
            interval_s=row.interval_s,
            errors=row.errors,
            last_status=row.last_status,
        )


class Poller:
    """Polls every active watch at its pace and records what the detector finds."""

    def __init__(
        self,
        client: QATechClient,
        runner: StoreRunner,
        sinks: Sequence[Sink],
        *,
        pacing: Pacing,
        max_concurrency: int,
        rate_limit_per_s: float,
        message_limit: int,
        expire_after_s: float | None,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_events: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.client = client
        self.runner = runner
        self.sinks = list(sinks)
        self.pacing = pacing
        self.message_limit = message_limit
        self.expire_after_s = expire_after_s
        self._clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.on_events = on_events or (lambda: None)
        self.watches: dict[str, Watch] = {}
        self.heap = DueHeap()
        self.bucket = TokenBucket(rate_limit_per_s, now=0.0)
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=max_concurrency)
        self.max_concurrency = max_concurrency
        self.in_flight: set[str] = set()
        self.paused_until = 0.0
        self.auth_refusals = 0
        self.rate_limited = 0
        self.outage = Outage()
        self.store_failing = False
        self.metrics = metrics or Metrics()
        self._wake = asyncio.Event()
        self._stopping = False
        self.log = get_logger()

    # -- clock ---------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    @property
    def token_refused(self) -> bool:
        return self.auth_refusals > 0

    # -- watch set ---------------------------------------------------------------------

    def start_watches(self, rows: Sequence[WatchRow], spread: bool = True) -> None:
        """Schedule ``rows``; first polls spread evenly over the first active interval."""
        fresh = [row for row in rows if row.short_id not in self.watches]
        offsets = initial_offsets(len(fresh), self.pacing.active_interval_s if spread else 0.0)
        now = self.now()
        for row, offset in zip(fresh, offsets, strict=True):
            self.watches[row.short_id] = Watch.from_row(row)
            self.heap.schedule(row.short_id, now + offset)
        if fresh:
            self._wake.set()

    def forget(self, short_id: str) -> None:
        self.watches.pop(short_id, None)
        self.heap.discard(short_id)

    def sinks_for(self, event_type: str) -> list[str]:
        return [sink.name for sink in self.sinks if accepts(sink, event_type)]

    async def end_watch(self, short_id: str, reason: str, started_at: float | None = None) -> bool:
        """End a watch: record ``chat.watch.ended`` and stop polling it."""
        watch = self.watches.get(short_id)
        began = started_at if started_at is not None else (watch.started_at if watch else self.wall())
        event = watch_ended_event(short_id, reason, began, datetime.fromtimestamp(self.wall(), UTC))
        ended = await self.runner.run(
            self.runner.store.end_watch,
            short_id,
            reason,
            self.wall(),
            (event, self.sinks_for(event.type)),
        )
        self.forget(short_id)
        if ended:
            self.log.info("watch ended", conversation=short_id, reason=reason)
            self.metrics.events.labels(event.type).inc()
            self.on_events()
        return ended

    # -- loops ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; new watches or :meth:`stop` cut it short."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(0.0, seconds))

    async def take_turn(self) -> None:
        """Wait for the rate limit (api.rate_limit_per_s) before a request; counted."""
        wait = self.bucket.reserve(self.now())
        if wait > 0:
            self.metrics.rate_limit_waits.inc()
            self.metrics.rate_limit_wait_seconds.inc(wait)
            await asyncio.sleep(wait)

    async def schedule_loop(self) -> None:
        """Hand due conversations to the workers, within the global pause and rate limit."""
        while not self._stopping:
            now = self.now()
            if now < self.paused_until:
                await self._sleep(self.paused_until - now)
                continue
            key = self.heap.pop_due(now)
            if key is None:
                due = self.heap.next_due()
                await self._sleep(1.0 if due is None else min(1.0, due - now))
                continue
            if key not in self.watches or key in self.in_flight:
                continue
            if self.auth_refusals and self.in_flight:
                # while the token is refused, one probe at a time: no burst of 401s
                self.heap.schedule(key, now)
                await self._sleep(1.0)
                continue
            await self.take_turn()
            if self._stopping:
                break
            if self.now() < self.paused_until:
                # a 429 or refused token came in while waiting for the rate limit: honour it
                self.heap.schedule(key, self.paused_until)
                continue
            self.in_flight.add(key)
            await self.queue.put(key)

    async def worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self.poll(key)
                self.store_failing = False
            except sqlite3.Error as exc:  # disk full, locked: nothing was recorded; poll again later
                if not self.store_failing:
                    self.log.error("cannot save to the state store; will retry", error=str(exc))
                self.store_failing = True
                self._retry_later(key)
            except Exception:  # a bug must not kill the worker; log it and try again later
                self.log.exception("poll failed unexpectedly", conversation=key)
                self._retry_later(key)
            finally:
                self.in_flight.discard(key)
                self.queue.task_done()
                if self.auth_refusals:
                    self._wake.set()

    def _retry_later(self, key: str) -> None:
        if key in self.watches:
            self.heap.schedule(key, self.now() + self.pacing.error_backoff_max_s)

    # -- one poll ------------------------------------------------------------------------

    def _reschedule(self, watch: Watch, delay: float) -> None:
        if watch.short_id in self.watches and not self._stopping:
            self.heap.schedule(watch.short_id, self.now() + delay)
            self._wake.set()

    async def _record(
        self, watch: Watch, delay: float, events: Sequence[Event] = (), state: WatchState | None = None
    ) -> list[str]:
        """Save the poll's outcome; ``state`` (new detector state) goes with its events atomically."""
        wall = self.wall()
        record = PollRecord(
            short_id=watch.short_id,
            detector=state.to_json() if state is not None else None,
            interval_s=watch.interval_s,
            errors=watch.errors,
            last_poll_at=wall,
            last_status=watch.last_status or "",
            next_poll_at=wall + delay,
        )
        pairs = [(event, self.sinks_for(event.type)) for event in events]
        new = await self.runner.run(self.runner.store.save_poll, record, pairs)
        if new:
            self.on_events()
        return new

    async def poll(self, short_id: str) -> None:
        watch = self.watches.get(short_id)
        if watch is None:
            return
        log = self.log.bind(conversation=short_id)
        started = self.now()
        try:
            conversation = await self.client.get_conversation(short_id, self.message_limit)
            self.metrics.poll_latency.observe(self.now() - started)
            detection = self._detect(watch, conversation, self.message_limit)
            if detection.window_gap and self.message_limit < WINDOW_MAX:
                # newer messages may have pushed unseen ones out of the window: read again at
                # once with the largest limit (this request counts against the rate limit too)
                self.metrics.window_rereads.inc()
                await self.take_turn()
                conversation = await self.client.get_conversation(short_id, WINDOW_MAX)
                detection = self._detect(watch, conversation, WINDOW_MAX)
        except RateLimitedError as exc:
            await self._on_rate_limited(watch, exc, log)
        except AuthError as exc:
            await self._on_auth_refused(watch, exc, log)
        except NotFoundError:
            self.metrics.polls.labels("not_found").inc()
            await self.end_watch(short_id, "not_found")
        except RejectedError as exc:
            self.metrics.polls.labels("rejected").inc()
            log.warning("the API rejected the conversation id", error=str(exc))
            await self.end_watch(short_id, "rejected")
        except TransientError as exc:
            await self._on_transient(watch, exc, log)
        else:
            if detection.window_gap:
                self.metrics.window_overflows.inc()
                log.warning(
                    "more messages arrived than the API returns at once (limit 100); replies older "
                    "than those may have been missed",
                    limit=WINDOW_MAX,
                )
            await self._on_conversation(watch, conversation, detection, log)

    def _detect(self, watch: Watch, conversation: Conversation, limit: int) -> Detection:
        return detect(
            watch.state,
            conversation,
            now=datetime.fromtimestamp(self.wall(), UTC),
            backfill=watch.backfill,
            limit=limit,
        )

    async def _on_transient(self, watch: Watch, exc: TransientError, log: Any) -> None:
        outcome = "bad_response" if isinstance(exc, BadResponseError) else "error"
        self.metrics.polls.labels(outcome).inc()
        watch.errors += 1
        watch.last_status = outcome
        delay = error_backoff(watch.errors, self.pacing.error_backoff_max_s, self.rng)
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.pacing.error_backoff_max_s))
        outage = self.outage.failed(watch.short_id, self.now())
        if outage is not None:
            self._log_outage(outage, exc)
        if self.outage.active:  # one incident for all: no line per conversation
            watch.quiet_errors = True
            log.debug("still failing", error=str(exc), errors=watch.errors, retry_in_s=round(delay, 2))
        elif watch.errors == 1:  # once per incident; the recovery is logged too
            if isinstance(exc, BadResponseError):
                log.warning("unexpected response body; backing off", error=str(exc), excerpt=exc.excerpt)
            else:
                log.warning("transient API error; backing off", error=str(exc))
        else:
            log.debug("still failing", error=str(exc), errors=watch.errors, retry_in_s=round(delay, 2))
        await self._record(watch, delay)
        self._reschedule(watch, delay)

    def _log_outage(self, what: str, exc: TransientError) -> None:
        figures = {"conversations": len(self.outage.conversations), "failed_polls": self.outage.failed_polls}
        if what == "start":
            self.log.warning(
                "the API keeps failing, for several conversations in a row; backing off",
                error=str(exc),
                **figures,
            )
        else:
            since = self.now() - (self.outage.since or self.now())
            self.log.warning("the API is still failing", error=str(exc), for_s=round(since), **figures)

    async def _on_rate_limited(self, watch: Watch, exc: RateLimitedError, log: Any) -> None:
        self.metrics.polls.labels("rate_limited").inc()
        self.rate_limited += 1
        pause = rate_limit_pause(exc.retry_after, self.rate_limited, self.pacing.error_backoff_max_s)
        until = self.now() + pause
        if self.rate_limited == 1:  # once per incident: until a poll succeeds again
            log.warning("rate limited: pausing all polling", pause_s=round(pause, 2))
        else:
            log.debug("still rate limited", pause_s=round(pause, 2), answers=self.rate_limited)
        self.paused_until = max(self.paused_until, until)
        watch.last_status = "rate_limited"
        await self._record(watch, pause)
        self._reschedule(watch, pause)

    async def _on_auth_refused(self, watch: Watch, exc: AuthError, log: Any) -> None:
        self.metrics.polls.labels("auth_refused").inc()
        now = self.now()
        if now >= self.paused_until or self.auth_refusals == 0:
            self.auth_refusals += 1
            self.metrics.token_refused.set(1)
            pause = auth_pause(self.auth_refusals)
            self.paused_until = max(self.paused_until, now + pause)
            if self.auth_refusals == 1:
                log.error("the API refused the token; all polling paused", error=str(exc), pause_s=pause)
            else:
                log.debug("token still refused", pause_s=pause, refusals=self.auth_refusals)
        watch.last_status = "auth_refused"
        delay = max(0.0, self.paused_until - now)
        await self._record(watch, delay)
        self._reschedule(watch, delay)

    async def _on_conversation(
        self, watch: Watch, conversation: Conversation, detection: Detection, log: Any
    ) -> None:
        self.metrics.polls.labels("ok").inc()
        if self.auth_refusals:
            log.info("the API accepts the token again; polling resumed")
            self.auth_refusals = 0
            self.metrics.token_refused.set(0)
        if self.rate_limited:
            log.info("no longer rate limited; polling resumed")
            self.rate_limited = 0
        end = self.outage.succeeded(self.now())
        if end is not None:
            self.log.info(
                "the API answers again",
                outage_s=round(end.duration_s, 1),
                failed_polls=end.failed_polls,
                conversations=end.conversations,
            )
        if watch.errors and not watch.quiet_errors:
            log.info("conversation reachable again", errors=watch.errors)
        watch.quiet_errors = False
        wall = self.wall()
        for status in detection.new_unknown_statuses:
            self.metrics.unknown_statuses.inc()
            log.warning("unknown message status; treated as not finished", status=status)
        watch.errors = 0
        watch.last_status = "pending" if detection.pending else "settled"
        watch.interval_s = next_interval(watch.interval_s, detection.pending, self.pacing)
        delay = jittered(watch.interval_s, self.pacing.jitter, self.rng)
        # the cursor moves only once the events are stored: if saving fails, the next poll
        # detects the same replies again
        new = set(await self._record(watch, delay, detection.events, state=detection.state))
        watch.state = detection.state
        # count and log what was new to the store, not what the detector found
        for event in detection.events:
            if event.id not in new:
                continue
            self.metrics.events.labels(event.type).inc()
            self.metrics.detection_delay.observe(max(0.0, wall - conversation.updated_at.timestamp()))
            log.info("reply finished", event_type=event.type, event_id=event.id)
        if not detection.events and expired(watch.state, wall, self.expire_after_s):
            await self.end_watch(watch.short_id, "expired")
            return
        self._reschedule(watch, delay)
