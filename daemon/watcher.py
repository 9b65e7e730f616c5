"""The poller: one scheduler loop over a due-time heap feeding a bounded pool of workers.

Each worker polls one conversation, runs the pure detector, and saves the new detector state
together with any new events in one store transaction before waking the sink workers.
Timing decisions come from :mod:`daemon.scheduler`; this module only applies them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from daemon.detect import WINDOW_MAX, Backfill, DamagedState, Detection, WatchState, detect, expired
from daemon.errors import (
    AuthError,
    BadResponseError,
    NotFoundError,
    RateLimitedError,
    RejectedError,
    TransientError,
)
from daemon.events import watch_ended_event
from daemon.handoff import Handoff
from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.models import Conversation, conversation_of
from daemon.outage import Outage
from daemon.qatech import QATechClient
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
    spread_offsets,
)
from daemon.sinks import Sink, accepts
from daemon.store import STORE_ERRORS, PollRecord, StoreRunner, WatchRow
from daemon.writer import StoreWriter

#: every value of ``Watch.last_status`` the poller writes, shared when read back from the store
_STATUSES: dict[str | None, str | None] = {
    s: s
    for s in (
        "waiting", "streaming", "settled", "error", "bad_response", "rate_limited", "auth_refused", "", None,
    )
}  # fmt: skip


class Watch:
    """A watched conversation as the poller holds it in memory (slots: 100,000 of them).

    The detector state is read from its stored JSON when first needed, so that start-up with
    100,000 watches does not wait for all of them: :meth:`Poller.check_states` reads the rest
    soon after, and a damaged one surfaces as :class:`DamagedState`."""

    __slots__ = (
        "_state",
        "_state_json",
        "backfill",
        "due",
        "errors",
        "interval_s",
        "last_poll_at",
        "last_status",
        "quiet_answer",
        "quiet_errors",
        "short_id",
        "started_at",
        "state_dirty",
        "waiting",
    )

    def __init__(
        self,
        short_id: str,
        backfill: Backfill,
        started_at: float,
        state: WatchState | None = None,
        *,
        state_json: str | None = None,
        interval_s: float | None = None,
        errors: int = 0,
        last_status: str | None = None,
        last_poll_at: float | None = None,
    ) -> None:
        self.short_id = short_id
        self.backfill: Backfill = backfill
        self.started_at = started_at
        self._state = state if state is not None or state_json else WatchState()
        self._state_json = state_json
        self.interval_s = interval_s
        self.errors = errors
        self.last_status = last_status
        #: its errors fell in an upstream-wide outage, logged once for all conversations
        self.quiet_errors = False
        #: Unix time of the last poll (what ``qawatch list`` shows; the next one is ``due``)
        self.last_poll_at = last_poll_at
        #: ``state`` changed in ways not yet written (bookkeeping only: the cursor is written at once)
        self.state_dirty = False
        #: the last answer's phase: no reply yet or INITIATED (see :func:`next_interval`)
        self.waiting = False
        #: hash of the last answer, when that poll found nothing new (see :meth:`Poller.poll`)
        self.quiet_answer: int | None = None
        #: when it is due, on the poller's clock; None while not scheduled (see WatchHeap)
        self.due: float | None = None

    @property
    def state(self) -> WatchState:
        """The detector's state; :class:`DamagedState` if its stored JSON cannot be read."""
        if self._state is None:
            self._state = WatchState.from_json(self._state_json)
            self._state_json = None
        return self._state

    @state.setter
    def state(self, value: WatchState) -> None:
        self._state = value
        self._state_json = None

    @property
    def pending(self) -> bool:
        """Pending as last seen (True until the stored state is read)."""
        return self._state.pending if self._state is not None else True

    @classmethod
    def from_row(cls, row: WatchRow, floats: dict[float, float] | None = None) -> Watch:
        """The watch a stored row describes. ``floats``: equal values already read (a page's
        rows mostly share when they began and their interval), kept as one object each."""
        started_at, interval_s = row.started_at, row.interval_s
        if floats is not None:
            started_at = floats.setdefault(started_at, started_at)
            if interval_s is not None:
                interval_s = floats.setdefault(interval_s, interval_s)
        return cls(
            row.short_id,
            "none" if row.backfill == "none" else "latest",
            started_at,
            state_json=row.detector,
            interval_s=interval_s,
            errors=row.errors,
            # one shared string per status, not one per stored row (100,000 of them)
            last_status=_STATUSES.get(row.last_status, row.last_status),
            last_poll_at=row.last_poll_at,
        )

    def poll_record(
        self, wall_offset: float, next_if_unscheduled: float, detector: str | None = None
    ) -> PollRecord:
        """What the store keeps of this watch's latest poll; ``detector`` or, if the state
        changed since it was last written, the state's JSON. The next poll's Unix time is
        ``due`` (the poller's clock) plus ``wall_offset``, or ``next_if_unscheduled`` for a watch
        not scheduled, being polled. (Not a slot of its own: 100,000 watches, a float each.)"""
        if detector is None and self.state_dirty:
            detector = self.state.to_json()
        next_poll_at = next_if_unscheduled if self.due is None else self.due + wall_offset
        return PollRecord(
            short_id=self.short_id,
            detector=detector,
            interval_s=self.interval_s,
            errors=self.errors,
            last_poll_at=self.last_poll_at or 0.0,
            last_status=self.last_status or "",
            next_poll_at=next_poll_at,
            started_at=self.started_at,
        )


class WatchHeap(DueHeap):
    """The poller's :class:`DueHeap`: each watch's due time is kept on the watch (a slot), not
    in a dict of its own beside the poller's dict of watches. A key without a watch is never
    due."""

    def __init__(self, watches: dict[str, Watch]) -> None:
        super().__init__()
        self._watches = watches

    def _get(self, key: str) -> float | None:
        watch = self._watches.get(key)
        return None if watch is None else watch.due

    def _set(self, key: str, due: float) -> None:
        watch = self._watches.get(key)
        if watch is not None:  # one forgotten while its caller awaited: its entry is stale
            watch.due = due

    def _clear(self, key: str) -> None:
        watch = self._watches.get(key)
        if watch is not None:
            watch.due = None

    def __len__(self) -> int:  # not on a hot path: counts
        return sum(1 for watch in self._watches.values() if watch.due is not None)


def cursor(state: WatchState) -> tuple[object, ...]:
    """The part of the detector's state that decides what is reported: a change of it is
    written at once (with the events it produced); the rest (fingerprint, last change,
    pending) is bookkeeping, written behind."""
    return (
        state.initialized,
        state.seen,
        state.open,
        state.base,
        state.awaiting_follow_up,
        state.follow_up_text,
        state.follow_up,
        state.unknown_statuses,
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
        on_damaged: Callable[[str, DamagedState], None] | None = None,
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
        #: a watch's stored detector state cannot be read (the default re-raises it)
        self.on_damaged = on_damaged or _raise
        self.watches: dict[str, Watch] = {}
        self.heap = WatchHeap(self.watches)
        self.bucket = rate_bucket(rate_limit_per_s)
        self.queue: Handoff[tuple[str, float]] = Handoff(max_concurrency)
        self.max_concurrency = max_concurrency
        self.in_flight: set[str] = set()
        self.paused_until = 0.0
        self.auth_refusals = 0
        self.rate_limited = 0
        self.outage = Outage()
        self.store_failing = False
        self.metrics = metrics or Metrics()
        self.writer = StoreWriter(runner, metrics=self.metrics, wall_offset=self.wall_offset, wall=wall)
        self._polls_ok = self.metrics.polls.labels("ok")
        self._sinks_by_type: dict[str, list[str]] = {}
        #: the scheduler's sleep: a future that a due time earlier than ``_sleep_until`` ends
        self._waiter: asyncio.Future[None] | None = None
        self._sleep_until = 0.0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.log = get_logger()

    # -- clock ---------------------------------------------------------------------------

    def now(self) -> float:
        if self._clock is not None:
            return self._clock()
        if self._loop is None:
            # once: on Python 3.11 every asyncio.get_running_loop() is a getpid() system call
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    @property
    def token_refused(self) -> bool:
        return self.auth_refusals > 0

    # -- watch set ---------------------------------------------------------------------

    def start_watches(
        self, rows: Sequence[WatchRow], spread: bool = True, *, place: tuple[int, int, float] | None = None
    ) -> None:
        """Schedule ``rows``. A watch the store knows the next poll of keeps it (a restart does
        not poll everything at once); the others, and those overdue, start spread evenly over
        the first active interval. ``place=(first, total, began)``: ``rows`` are the page of a
        larger set, starting at position ``first`` of ``total``, whose loading began at
        ``began`` (this poller's clock): spread over the interval from then, as the whole set
        would be, however long the loading takes (a page that comes late is due at once)."""
        watches, idle = self.watches, self.pacing.idle_interval_s
        now, wall = self.now(), self.wall()
        entries: list[tuple[str, float]] = []
        due_now: list[tuple[int, str]] = []
        floats: dict[float, float] = {}
        for position, row in enumerate(rows):
            key = row.short_id
            if key in watches:
                continue
            watches[key] = Watch.from_row(row, floats)
            next_at = row.next_poll_at
            if spread and next_at is not None and next_at > wall:
                entries.append((key, now + min(next_at - wall, idle)))
            else:
                due_now.append((position, key))
        interval = self.pacing.active_interval_s if spread else 0.0
        if place is None:
            offsets, start = initial_offsets(len(due_now), interval), now
        else:
            first, total, start = place
            offsets = spread_offsets([position for position, _ in due_now], first, total, interval)
        entries += [
            (key, max(now, start + offset)) for (_, key), offset in zip(due_now, offsets, strict=True)
        ]
        self.heap.schedule_many(entries)
        if entries:
            self._kick()

    async def check_states(self, keys: Iterable[str] | None = None, chunk: int = 250) -> None:
        """Read the stored detector state of ``keys`` (every watch by default) now, a chunk
        at a time between polls, so that a damaged one is found at start-up, not when its
        watch is next polled (and the stored JSON is freed at once)."""
        chunk_keys = list(self.watches if keys is None else keys)
        for start in range(0, len(chunk_keys), chunk):
            for key in chunk_keys[start : start + chunk]:
                watch = self.watches.get(key)
                if watch is None:
                    continue
                try:
                    watch.state  # noqa: B018 - reading it parses it
                except DamagedState as exc:
                    self.forget(key)
                    self.on_damaged(key, exc)
            await asyncio.sleep(0)

    def forget(self, short_id: str) -> None:
        self.heap.discard(short_id)  # first: the heap clears the due time on the watch itself
        self.watches.pop(short_id, None)
        self.writer.discard(short_id)

    def sinks_for(self, event_type: str) -> list[str]:
        names = self._sinks_by_type.get(event_type)
        if names is None:
            names = self._sinks_by_type[event_type] = [s.name for s in self.sinks if accepts(s, event_type)]
        return names

    async def end_watch(self, short_id: str, reason: str, started_at: float | None = None) -> bool:
        """End a watch: record ``chat.watch.ended`` and stop polling it."""
        watch = self.watches.get(short_id)
        began = started_at if started_at is not None else (watch.started_at if watch else self.wall())
        event = watch_ended_event(short_id, reason, began, datetime.fromtimestamp(self.wall(), UTC))
        self.writer.discard(short_id)
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
        self._kick()

    def _kick(self, due: float | None = None) -> None:
        """End the scheduler's sleep (for a due time earlier than its wake-up, if ``due``)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (due is None or due < self._sleep_until):
            waiter.set_result(None)

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; an earlier due time, new watches or :meth:`stop` cut it short."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        self._sleep_until = self.now() + max(0.0, seconds)
        timer = loop.call_later(max(0.0, seconds), _wake_up, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def take_turn(self) -> None:
        """Wait for the rate limit (api.rate_limit_per_s) before a request; counted."""
        wait = self.bucket.reserve(self.now())
        if wait > 0:
            self.metrics.rate_limit_waits.inc()
            self.metrics.rate_limit_wait_seconds.inc(wait)
            await asyncio.sleep(wait)

    async def schedule_loop(self) -> None:
        """Hand due conversations to the workers, within the global pause and rate limit."""
        heap = self.heap
        while not self._stopping:
            now = self.now()
            if now < self.paused_until:
                await self._sleep(self.paused_until - now)
                continue
            due = heap.next_due()
            if due is None or due > now:
                await self._sleep(1.0 if due is None else min(1.0, due - now))
                continue
            key = heap.pop_due(now)
            if key is None or key not in self.watches or key in self.in_flight:
                continue
            if self.auth_refusals and self.in_flight:
                # while the token is refused, one probe at a time: no burst of 401s
                heap.schedule(key, now)
                await self._sleep(1.0)
                continue
            await self.take_turn()
            if self._stopping:
                break
            if self.now() < self.paused_until:
                # a 429 or refused token came in while waiting for the rate limit: honour it
                heap.schedule(key, self.paused_until)
                continue
            self.in_flight.add(key)
            await self.queue.put((key, due))

    async def worker(self) -> None:
        while True:
            key, due = await self.queue.get()
            try:
                self.metrics.poll_lateness.observe(max(0.0, self.now() - due))
                await self.poll(key)
                self.store_failing = False
            except DamagedState as exc:  # the state file is damaged: not this poller's to mend
                self.forget(key)
                self.on_damaged(key, exc)
            except STORE_ERRORS as exc:  # disk full, locked: nothing was recorded; poll again later
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
                    self._kick()

    def _retry_later(self, key: str) -> None:
        if key in self.watches:
            self.heap.schedule(key, self.now() + self.pacing.error_backoff_max_s)

    # -- one poll ------------------------------------------------------------------------

    def _reschedule(self, watch: Watch, delay: float) -> None:
        if watch.short_id in self.watches:
            due = self.now() + delay
            # also while stopping: nothing polls it any more, but the due time is what the
            # last flush writes as its next poll (a restart keeps a back-off or Retry-After)
            self.heap.schedule(watch.short_id, due)
            if not self._stopping:
                self._kick(due)

    def wall_offset(self) -> float:
        """Unix time minus this poller's clock: turns a due time into a Unix time."""
        return self.wall() - self.now()

    def _record_later(self, watch: Watch) -> None:
        """A poll that found nothing new: its times are written with the next flush."""
        watch.last_poll_at = self.wall()
        self.writer.later(watch)

    async def poll(self, short_id: str) -> None:
        watch = self.watches.get(short_id)
        if watch is None:
            return
        started = self.now()
        try:
            raw = await self.client.get_conversation_bytes(short_id, self.message_limit)
            self.metrics.poll_latency.observe(self.now() - started)
            answer = hash(raw)
            if answer == watch.quiet_answer:
                # byte for byte the answer of the last poll, which found nothing new: the pure
                # detector would find nothing again (same input, same cursor), so skip it
                await self._on_same_answer(watch)
                return
            conversation = conversation_of(short_id, raw)
            detection = self._detect(watch, conversation, self.message_limit)
            reread = False
            if detection.window_gap and self.message_limit < WINDOW_MAX:
                # newer messages may have pushed unseen ones out of the window: read again at
                # once with the largest limit (this request counts against the rate limit too)
                self.metrics.window_rereads.inc()
                reread = True
                await self.take_turn()
                conversation = await self.client.get_conversation(short_id, WINDOW_MAX)
                detection = self._detect(watch, conversation, WINDOW_MAX)
        except RateLimitedError as exc:
            await self._on_rate_limited(watch, exc, self.log.bind(conversation=short_id))
        except AuthError as exc:
            await self._on_auth_refused(watch, exc, self.log.bind(conversation=short_id))
        except NotFoundError:
            self.metrics.polls.labels("not_found").inc()
            await self.end_watch(short_id, "not_found")
        except RejectedError as exc:
            self.metrics.polls.labels("rejected").inc()
            self.log.warning("the API rejected the conversation id", conversation=short_id, error=str(exc))
            await self.end_watch(short_id, "rejected")
        except TransientError as exc:
            await self._on_transient(watch, exc, self.log.bind(conversation=short_id))
        else:
            if detection.window_gap:
                self.metrics.window_overflows.inc()
                self.log.warning(
                    "more messages arrived than the API returns at once (limit 100); replies older "
                    "than those may have been missed",
                    conversation=short_id,
                    limit=WINDOW_MAX,
                )
            quiet = await self._on_conversation(watch, conversation, detection)
            # remembered only after a poll that found nothing and moved no cursor, and only for
            # an answer read with the usual limit (not after a re-read with limit 100)
            watch.quiet_answer = answer if quiet and not reread and not detection.window_gap else None

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
        self._record_later(watch)
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
        self._record_later(watch)
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
        self._record_later(watch)
        self._reschedule(watch, delay)

    def _recovered(self, watch: Watch) -> None:
        """A successful poll ends every incident it was part of (each logged once)."""
        if self.auth_refusals:
            self.log.info("the API accepts the token again; polling resumed", conversation=watch.short_id)
            self.auth_refusals = 0
            self.metrics.token_refused.set(0)
        if self.rate_limited:
            self.log.info("no longer rate limited; polling resumed", conversation=watch.short_id)
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
            self.log.info("conversation reachable again", conversation=watch.short_id, errors=watch.errors)
        watch.quiet_errors = False
        watch.errors = 0

    def _answered(self, watch: Watch) -> None:
        """Count a successful poll; it ends the incidents it was part of, if any."""
        self._polls_ok.inc()
        outage = self.outage
        if (
            self.auth_refusals
            or self.rate_limited
            or watch.errors
            or outage.active
            or outage.failures_in_a_row
        ):
            self._recovered(watch)  # else there is nothing to recover from (the common case)

    async def _on_same_answer(self, watch: Watch) -> None:
        """A poll whose answer is the last quiet poll's, byte for byte: pace it as that one."""
        self._answered(watch)
        watch.interval_s = next_interval(watch.interval_s, watch.pending, self.pacing, waiting=watch.waiting)
        delay = jittered(watch.interval_s, self.pacing.jitter, self.rng)
        self._record_later(watch)
        if expired(watch.state, self.wall(), self.expire_after_s):
            await self.end_watch(watch.short_id, "expired")
            return
        self._reschedule(watch, delay)

    async def _on_conversation(self, watch: Watch, conversation: Conversation, detection: Detection) -> bool:
        """Pace, record and report one answer; True when it was quiet (no event, no cursor move)."""
        self._answered(watch)
        for status in detection.new_unknown_statuses:
            self.metrics.unknown_statuses.inc()
            self.log.warning(
                "unknown message status; treated as not finished", conversation=watch.short_id, status=status
            )
        # waiting (no reply yet, or INITIATED), streaming (PARTIAL: about to finish), settled
        watch.last_status = (
            ("waiting" if detection.waiting else "streaming") if detection.pending else "settled"
        )
        watch.interval_s = next_interval(
            watch.interval_s, detection.pending, self.pacing, waiting=detection.waiting
        )
        delay = jittered(watch.interval_s, self.pacing.jitter, self.rng)
        watch.waiting = detection.waiting
        state = detection.state
        quiet = not detection.events and cursor(state) == cursor(watch.state)
        if quiet:
            # nothing new: nothing durable to write now (times and bookkeeping go later)
            watch.state_dirty = watch.state_dirty or state != watch.state
            watch.state = state
            self._record_later(watch)
        else:
            await self._record_now(watch, conversation, detection, delay)
        if not detection.events and expired(watch.state, self.wall(), self.expire_after_s):
            await self.end_watch(watch.short_id, "expired")
            return quiet
        self._reschedule(watch, delay)
        return quiet

    async def _record_now(
        self, watch: Watch, conversation: Conversation, detection: Detection, delay: float
    ) -> None:
        """Commit the poll's events with the state that found them (grouped with other polls'),
        before any sink sees them. The cursor moves only once they are stored: if saving fails,
        the next poll detects the same replies again."""
        wall = watch.last_poll_at = self.wall()
        # not rescheduled yet (the cursor moves once this is stored): due in ``delay``
        record = watch.poll_record(wall - self.now(), wall + delay, detection.state.to_json())
        pairs = [(event, self.sinks_for(event.type)) for event in detection.events]
        new = set(await self.writer.durable(record, pairs))
        watch.state = detection.state
        watch.state_dirty = False
        if not new:
            return
        self.on_events()
        # count and log what was new to the store, not what the detector found
        wall = self.wall()
        for event in detection.events:
            if event.id not in new:
                continue
            self.metrics.events.labels(event.type).inc()
            self.metrics.detection_delay.observe(max(0.0, wall - conversation.updated_at.timestamp()))
            self.log.info(
                "reply finished", conversation=watch.short_id, event_type=event.type, event_id=event.id
            )


#: the bucket refills at this share of api.rate_limit_per_s: requests reach the server with
#: some network jitter, and a server counting them in its own 1 s windows must not see one more
RATE_MARGIN = 0.98
#: the bucket holds this many seconds' worth of requests (at least one): enough to send at high
#: rates without a timer per request (timers tick in milliseconds), too little to exceed the
#: limit in any second by more than that
BURST_S = 0.002


def rate_bucket(rate_limit_per_s: float) -> TokenBucket:
    """The token bucket that keeps ``api.rate_limit_per_s``, from the very first second."""
    return TokenBucket(rate_limit_per_s * RATE_MARGIN, burst=max(1.0, rate_limit_per_s * BURST_S), now=0.0)


def _raise(short_id: str, exc: DamagedState) -> None:
    raise exc


def _wake_up(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
