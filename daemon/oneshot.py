"""`qawatch watch` and `qawatch ask`: wait in the foreground, print one event line per id.

Same client and pacing maths as the daemon, but no store and no sinks. Exit code per
conversation: 0 completed, 1 failed/cancelled, 3 timeout, 4 refused or unreachable; the
command exits with the most severe (2 > 4 > 3 > 1 > 0).
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO, TypeVar

from daemon.detect import WINDOW_MAX, WatchState, detect, follow_up_baseline
from daemon.errors import (
    ConnectError,
    ExitCode,
    PermanentError,
    QawatchError,
    RateLimitedError,
    TransientError,
    UpstreamError,
)
from daemon.events import Event
from daemon.qatech import QATechClient
from daemon.scheduler import (
    Pacing,
    TokenBucket,
    error_backoff,
    jittered,
    next_interval,
    rate_limit_pause,
)

T = TypeVar("T")

SEVERITY = (ExitCode.USAGE, ExitCode.API, ExitCode.TIMEOUT, ExitCode.REPLY_FAILED, ExitCode.OK)


def most_severe(codes: Sequence[int]) -> int:
    """2 > 4 > 3 > 1 > 0, as the design orders them."""
    for code in SEVERITY:
        if code in codes:
            return code
    return ExitCode.OK


def event_exit_code(event: Event) -> int:
    return ExitCode.OK if event.type == "chat.reply.completed" else ExitCode.REPLY_FAILED


@dataclass
class Outcome:
    short_id: str
    code: int = ExitCode.TIMEOUT
    event: Event | None = None
    error: str | None = None
    unreachable: bool = False


class SharedPace:
    """What all waits share: the rate limit, the concurrency cap and a 429 pause."""

    def __init__(self, rate_per_s: float, max_concurrency: int, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.bucket = TokenBucket(rate_per_s, now=clock())
        self.slots = asyncio.Semaphore(max_concurrency)
        self.paused_until = 0.0
        self.rate_limited = 0

    async def turn(self) -> None:
        # a 429 elsewhere may move the deadline while we sleep, so check it again after each
        while (pause := self.paused_until - self.clock()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(pause)
        wait = self.bucket.reserve(self.clock())
        if wait > 0:
            await asyncio.sleep(wait)


async def wait_for_reply(
    client: QATechClient,
    short_id: str,
    outcome: Outcome,
    *,
    pace: SharedPace,
    pacing: Pacing,
    limit: int,
    state: WatchState | None = None,
    rng: random.Random,
    out: TextIO,
    err: TextIO,
) -> None:
    """Poll ``short_id`` until a reply it waits on finishes; fill in ``outcome``."""
    state = state or WatchState()
    interval: float | None = None
    errors = 0
    read_limit = limit
    while True:
        await pace.turn()
        try:
            async with pace.slots:
                conversation = await client.get_conversation(short_id, read_limit)
        except PermanentError as exc:
            outcome.code, outcome.error = ExitCode.API, str(exc)
            return
        except RateLimitedError as exc:
            pace.rate_limited += 1
            pause = rate_limit_pause(exc.retry_after, pace.rate_limited, pacing.error_backoff_max_s)
            pace.paused_until = max(pace.paused_until, pace.clock() + pause)
            continue
        except TransientError as exc:
            errors += 1
            outcome.error = str(exc)
            outcome.unreachable = isinstance(exc, ConnectError)
            await asyncio.sleep(error_backoff(errors, pacing.error_backoff_max_s, rng))
            continue
        errors, outcome.error, outcome.unreachable = 0, None, False
        pace.rate_limited = 0
        detection = detect(state, conversation, now=datetime.now(UTC), backfill="latest", limit=read_limit)
        if detection.window_gap and read_limit < WINDOW_MAX:
            # newer messages may have pushed unseen ones out of the window: read again at once
            # with the largest limit, paced like any other request
            read_limit = WINDOW_MAX
            continue
        read_limit = limit
        if detection.window_gap:
            err.write(
                f"qawatch: {short_id}: more than {WINDOW_MAX} messages arrived between two reads; "
                "older replies may have been missed\n"
            )
        # a follow-up's answer is the first reply after it; otherwise the newest finished one
        first = state.awaiting_follow_up
        state = detection.state
        for status in detection.new_unknown_statuses:  # once per conversation, never silently
            err.write(f"qawatch: {short_id}: unknown message status {status!r}; treated as not finished\n")
            err.flush()
        if detection.events:
            event = detection.events[0] if first else detection.events[-1]
            outcome.event, outcome.code = event, event_exit_code(event)
            out.write(event.to_json() + "\n")
            out.flush()
            return
        interval = next_interval(interval, detection.pending, pacing)
        await asyncio.sleep(jittered(interval, pacing.jitter, rng))


async def watch_many(
    client: QATechClient,
    ids: Sequence[str],
    *,
    pacing: Pacing,
    rate_limit_per_s: float,
    max_concurrency: int,
    limit: int,
    timeout_s: float | None,
    states: dict[str, WatchState] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Wait for every id; print events to ``out`` and problems to ``err``; return the exit code.

    Setting ``stop`` (SIGTERM, SIGINT) ends the wait like the timeout does."""
    out = out or sys.stdout
    err = err or sys.stderr
    loop = asyncio.get_running_loop()
    pace = SharedPace(rate_limit_per_s, max_concurrency, loop.time)
    rng = random.Random()
    outcomes = {short_id: Outcome(short_id) for short_id in dict.fromkeys(ids)}
    tasks = [
        asyncio.create_task(
            wait_for_reply(
                client,
                short_id,
                outcome,
                pace=pace,
                pacing=pacing,
                limit=limit,
                state=(states or {}).get(short_id),
                rng=rng,
                out=out,
                err=err,
            )
        )
        for short_id, outcome in outcomes.items()
    ]
    late = await _wait_all(tasks, timeout_s, stop)
    interrupted = bool(late) and stop is not None and stop.is_set()
    for task in late:
        task.cancel()
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        # every error a wait expects is an outcome; anything else is a bug and must not pass
        # for a timeout
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
    for outcome in outcomes.values():
        if outcome.event is None and outcome.code == ExitCode.TIMEOUT and outcome.unreachable:
            outcome.code = ExitCode.API
        if outcome.code == ExitCode.API:
            error = outcome.error or "refused"
            prefix = "" if error.startswith(outcome.short_id) else f"{outcome.short_id}: "
            err.write(f"qawatch: {prefix}{error}\n")
        elif outcome.code == ExitCode.TIMEOUT:
            why = f" (last error: {outcome.error})" if outcome.error else ""
            if interrupted:
                err.write(f"qawatch: {outcome.short_id}: interrupted before a finished reply{why}\n")
            else:
                within = round(timeout_s or 0.0, 1)
                err.write(f"qawatch: {outcome.short_id}: no finished reply within {within:g}s{why}\n")
    err.flush()
    return most_severe([o.code for o in outcomes.values()])


async def _wait_all(
    tasks: list[asyncio.Task[None]], timeout_s: float | None, stop: asyncio.Event | None
) -> set[asyncio.Task[None]]:
    """Wait for ``tasks`` until all are done, one fails, ``timeout_s`` passes or ``stop`` is
    set; return the unfinished ones."""
    waiter = asyncio.ensure_future(
        asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
    )
    stopper = asyncio.ensure_future(stop.wait() if stop is not None else asyncio.Event().wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for helper in (waiter, stopper):
        helper.cancel()
    await asyncio.gather(waiter, stopper, return_exceptions=True)
    return {task for task in tasks if not task.done()}


class Interrupted(QawatchError):
    """SIGTERM/SIGINT arrived while ``ask`` was still talking to the API: exit 3, as for ``watch``."""

    exit_code = ExitCode.TIMEOUT


async def _unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event | None, doing: str) -> T:
    """``await awaitable``, unless ``stop`` is set first: then cancel it and raise
    :class:`Interrupted` saying what was being done."""
    if stop is None:
        return await awaitable
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()  # finished first (or together with the signal): use it
    await asyncio.gather(task, return_exceptions=True)
    raise Interrupted(f"ask: interrupted while {doing}")


class AskTimedOut(QawatchError):
    """``--timeout`` passed while ``ask`` was still retrying a request: exit 3."""

    exit_code = ExitCode.TIMEOUT


async def _retrying(
    call: Callable[[], Awaitable[T]],
    *,
    retry: type[TransientError],
    doing: str,
    pacing: Pacing,
    deadline: float | None,
    timeout_s: float | None,
    stop: asyncio.Event | None,
    err: TextIO,
) -> T:
    """``await call()``, again after each ``retry`` error (a 429 waits for its Retry-After),
    until it succeeds, ``stop`` is set (:class:`Interrupted`) or ``deadline`` (a loop time)
    would pass (:class:`AskTimedOut`, naming ``doing``)."""
    loop = asyncio.get_running_loop()
    rng = random.Random()
    failures = 0
    while True:
        remaining = None if deadline is None else deadline - loop.time()
        try:
            return await _unless_stopped(asyncio.wait_for(call(), remaining), stop, doing)
        except TimeoutError:
            raise AskTimedOut(f"ask: no answer within {timeout_s:g}s while {doing}") from None
        except retry as exc:
            failures += 1
            if isinstance(exc, RateLimitedError):
                pause = rate_limit_pause(exc.retry_after, failures, pacing.error_backoff_max_s)
            else:
                pause = error_backoff(failures, pacing.error_backoff_max_s, rng)
            if deadline is not None and loop.time() + pause >= deadline:
                raise AskTimedOut(
                    f"ask: gave up {doing} within --timeout {timeout_s:g}s (last error: {exc})"
                ) from None
            err.write(f"qawatch: {exc}; retrying in {pause:.1f}s\n")
            err.flush()
            await _unless_stopped(asyncio.sleep(pause), stop, doing)


async def ask(
    client: QATechClient,
    message: str,
    *,
    chat: str | None,
    limit: int,
    pacing: Pacing | None = None,
    timeout_s: float | None = None,
    err: TextIO | None = None,
    stop: asyncio.Event | None = None,
) -> tuple[str, WatchState]:
    """Post ``message`` (a new chat, or a follow-up in ``chat``); return the id to wait on
    and a detector state in which every reply finished before the message counts as history.

    A 429 on the POST (not processed) is retried after its Retry-After; reading ``chat``
    first is retried after any transient error; both within ``timeout_s``
    (:class:`AskTimedOut`). A POST that failed otherwise (5xx, no answer) may have been
    processed: it is not retried. Setting ``stop`` (SIGTERM, SIGINT) abandons the request in
    flight: :class:`Interrupted`."""
    err = err or sys.stderr
    pacing = pacing or Pacing()
    deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s

    async def post(call: Callable[[], Awaitable[T]], doing: str) -> T:
        try:
            return await _retrying(
                call,
                retry=RateLimitedError,
                doing=doing,
                pacing=pacing,
                deadline=deadline,
                timeout_s=timeout_s,
                stop=stop,
                err=err,
            )
        except TransientError as exc:
            failed = UpstreamError(f"{exc} (not retried: it may have been processed)", status=exc.status)
            raise failed from None

    if chat is None:
        conversation = await post(
            lambda: client.create_chat(message), "starting a new chat (it may have been created)"
        )
        err.write(f"qawatch: started {conversation.short_id} {conversation.url}\n".replace("  ", " "))
        return conversation.short_id, WatchState(initialized=True)
    before = await _retrying(
        lambda: client.get_conversation(chat, limit),
        retry=TransientError,
        doing=f"reading {chat} before the follow-up (nothing was sent)",
        pacing=pacing,
        deadline=deadline,
        timeout_s=timeout_s,
        stop=stop,
        err=err,
    )
    baseline = follow_up_baseline(before, message, now=datetime.now(UTC), limit=limit)
    await post(
        lambda: client.send_message(chat, message), f"sending the follow-up to {chat} (it may have been sent)"
    )
    err.write(f"qawatch: sent a follow-up to {chat}\n")
    return chat, baseline
