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

from daemon.detect import WINDOW_MAX, Detection, WatchState, detect, follow_up_baseline
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
from daemon.logs import get_logger
from daemon.models import Conversation
from daemon.progress import Display, current_reply, failure_line, one_line
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
    #: the conversation's URL and the text of the reply it was writing, for a timeout's line
    url: str = ""
    partial: str = ""
    #: what goes to stdout: "json", the event line; "text", only the reply's text
    output: str = "json"


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


class _Unreachable(Exception):
    """The API still could not be reached when the ``--unreachable-after`` bound passed."""


class _Downtime:
    """Connection failures in a row: since when (the start of the first failed request), and
    how long until they reach ``bound_s`` (None: no bound)."""

    def __init__(self, bound_s: float | None, clock: Callable[[], float]) -> None:
        self.bound_s = bound_s
        self.clock = clock
        self.since: float | None = None

    def failed(self, asked_at: float) -> None:
        self.since = asked_at if self.since is None else self.since

    def left(self) -> float | None:
        if self.since is None or self.bound_s is None:
            return None
        return self.since + self.bound_s - self.clock()

    def describe(self) -> str:
        down_for = self.clock() - (self.since if self.since is not None else self.clock())
        return f"unreachable for {down_for:.0f}s in a row; --unreachable-after {self.bound_s or 0:g}s"

    async def bounded(self, awaitable: Awaitable[T]) -> T:
        """``await awaitable``; while the API is down, only until the bound (at least a second,
        so that the last try is a real one): :class:`_Unreachable` after that."""
        left = self.left()
        if left is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, max(left, 1.0))
        except TimeoutError:
            raise _Unreachable from None


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
    display: Display,
    unreachable_after_s: float | None = None,
) -> None:
    """Poll ``short_id`` until a reply it waits on finishes; fill in ``outcome``; tell
    ``display`` what each answer says. Connection failures in a row for ``unreachable_after_s``
    end the wait (exit 4)."""
    state = state or WatchState()
    interval: float | None = None
    errors = 0
    read_limit = limit
    down = _Downtime(unreachable_after_s, pace.clock)
    while True:
        await pace.turn()
        asked_at = pace.clock()
        try:
            async with pace.slots:
                conversation = await down.bounded(client.get_conversation(short_id, read_limit))
        except PermanentError as exc:
            outcome.code, outcome.error = ExitCode.API, str(exc)
            display.finished(short_id, f"ended: {one_line(str(exc).removeprefix(f'{short_id}: '), 80)}")
            return
        except RateLimitedError as exc:
            down.since = None  # it answered
            pace.rate_limited += 1
            pause = rate_limit_pause(exc.retry_after, pace.rate_limited, pacing.error_backoff_max_s)
            pace.paused_until = max(pace.paused_until, pace.clock() + pause)
            continue
        except (TransientError, _Unreachable) as exc:
            errors += 1
            backoff = error_backoff(errors, pacing.error_backoff_max_s, rng)
            retry_in = _failed(exc, asked_at, backoff, down=down, outcome=outcome, display=display)
            if retry_in is None:
                return
            await asyncio.sleep(retry_in)
            continue
        errors, outcome.error, outcome.unreachable, down.since = 0, None, False, None
        pace.rate_limited = 0
        detection = detect(state, conversation, now=datetime.now(UTC), backfill="latest", limit=read_limit)
        if detection.window_gap and read_limit < WINDOW_MAX:
            # newer messages may have pushed unseen ones out of the window: read again at once
            # with the largest limit, paced like any other request
            read_limit = WINDOW_MAX
            continue
        read_limit = limit
        # a follow-up's answer is the first reply after it; otherwise the newest finished one
        first = state.awaiting_follow_up
        state = detection.state
        _observe(short_id, conversation, detection, outcome, display)
        if detection.events:
            _report(detection.events[0] if first else detection.events[-1], outcome, display, out)
            return
        interval = next_interval(interval, detection.pending, pacing, waiting=detection.waiting)
        await asyncio.sleep(jittered(interval, pacing.jitter, rng))


def _failed(
    exc: Exception, asked_at: float, backoff: float, *, down: _Downtime, outcome: Outcome, display: Display
) -> float | None:
    """Record a transient failure of a request begun at ``asked_at``; return the pause before
    the next try, or None when connection failures in a row reached the bound (exit 4)."""
    outcome.error = outcome.error if isinstance(exc, _Unreachable) else str(exc)
    outcome.unreachable = isinstance(exc, ConnectError | _Unreachable)
    if outcome.unreachable:
        down.failed(asked_at)
    else:
        down.since = None  # it answered, if badly
    left = down.left()
    if left is not None and left <= 0:
        outcome.code = ExitCode.API
        outcome.error = f"{outcome.error or 'no answer'} ({down.describe()})"
        display.finished(outcome.short_id, "API unreachable")
        return None
    display.trouble(outcome.short_id, outcome.error or str(exc))
    return backoff if left is None else min(backoff, left)


def _observe(
    short_id: str, conversation: Conversation, detection: Detection, outcome: Outcome, display: Display
) -> None:
    """What an answer tells the user: the display's state and any anomaly, never silently."""
    if detection.window_gap:
        display.print(
            f"qawatch: {short_id}: more than {WINDOW_MAX} messages arrived between two reads; "
            "older replies may have been missed"
        )
    for status in detection.new_unknown_statuses:  # once per conversation
        display.print(f"qawatch: {short_id}: unknown message status {status!r}; treated as not finished")
    state = detection.state
    # ask --chat: until its follow-up is visible, no reply listed is the one waited for
    reply = current_reply(conversation, follow_up_seen=not state.awaiting_follow_up or bool(state.follow_up))
    outcome.url = conversation.url or outcome.url
    outcome.partial = reply.text if reply is not None and not reply.finished else ""
    display.observed(short_id, url=conversation.url, reply=reply)
    get_logger().debug(  # --log-level debug: every answer, for when a wait looks wrong
        "answer",
        conversation=short_id,
        messages=len(conversation.messages),
        pending=detection.pending,
        reply_status=reply.status if reply is not None else None,
        events=len(detection.events),
    )


def event_output(event: Event, output: str) -> str:
    """The stdout line(s) for ``event``: its JSON, or with ``text`` the reply's text alone (for
    ``reply=$(qawatch ask ...)``; a watch that ended has no text: its reason)."""
    if output != "text":
        return event.to_json()
    message = event.data.get("message")
    return (
        str(message["text"]) if isinstance(message, dict) else f"{event.short_id}: {event.data.get('reason')}"
    )


def _report(event: Event, outcome: Outcome, display: Display, out: TextIO) -> None:
    """The event on ``out``; a failed or cancelled reply also on stderr, with its text and URL
    (the job log says why it failed, whatever happens to stdout)."""
    outcome.event, outcome.code = event, event_exit_code(event)
    message = event.data["message"]
    status = str(message["status"])
    display.finished(outcome.short_id, status)
    display.emit(out, event_output(event, outcome.output))
    if outcome.code != ExitCode.OK:
        url = str(event.data["conversation"].get("url") or outcome.url)
        display.print(failure_line(outcome.short_id, status, str(message["text"]), url))


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
    display: Display | None = None,
    unreachable_after_s: float | None = None,
    output: str = "json",
) -> int:
    """Wait for every id; print events to ``out`` and problems to ``err`` (or ``display``'s
    stream, with progress); return the exit code.

    Setting ``stop`` (SIGTERM, SIGINT) ends the wait like the timeout does; connection failures
    in a row for ``unreachable_after_s`` end one conversation's wait with exit 4."""
    out = out or sys.stdout
    display = display or Display(err or sys.stderr)
    loop = asyncio.get_running_loop()
    pace = SharedPace(rate_limit_per_s, max_concurrency, loop.time)
    rng = random.Random()
    outcomes = {short_id: Outcome(short_id, output=output) for short_id in dict.fromkeys(ids)}
    for short_id in outcomes:
        display.add(short_id)
    async with display:
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
                    display=display,
                    unreachable_after_s=unreachable_after_s,
                )
            )
            for short_id, outcome in outcomes.items()
        ]
        late = await _wait_all(tasks, timeout_s, stop)
        interrupted = bool(late) and stop is not None and stop.is_set()
        for task in late:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes.values():
            if outcome.event is None and outcome.code == ExitCode.TIMEOUT:
                display.finished(outcome.short_id, "interrupted" if interrupted else "timed out")
    for result in results:
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
            display.print(f"qawatch: {prefix}{error}")
        elif outcome.code == ExitCode.TIMEOUT:
            why = f" (last error: {outcome.error})" if outcome.error else ""
            within = round(timeout_s or 0.0, 1)
            what = (
                "interrupted before a finished reply"
                if interrupted
                else f"no finished reply within {within:g}s"
            )
            display.print(f"qawatch: {outcome.short_id}: {what}{why}{_so_far(outcome)}")
    return most_severe([o.code for o in outcomes.values()])


def _so_far(outcome: Outcome) -> str:
    """What a timed-out wait saw last: the reply's text so far (bounded) and the URL."""
    said = (
        f"; the reply so far ({len(outcome.partial)} characters): {one_line(outcome.partial)}"
        if outcome.partial
        else "; no reply yet"
    )
    return said + (f" ({outcome.url})" if outcome.url else "")


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
    unreachable_after_s: float | None = None,
) -> T:
    """``await call()``, again after each ``retry`` error (a 429 waits for its Retry-After),
    until it succeeds, ``stop`` is set (:class:`Interrupted`), ``deadline`` (a loop time)
    would pass (:class:`AskTimedOut`, naming ``doing``) or connection failures in a row last
    ``unreachable_after_s`` (an :class:`UpstreamError`, exit 4)."""
    loop = asyncio.get_running_loop()
    rng = random.Random()
    failures = 0
    down = _Downtime(unreachable_after_s, loop.time)
    last_error = ""
    while True:
        remaining = None if deadline is None else deadline - loop.time()
        asked_at = loop.time()
        try:
            return await _unless_stopped(asyncio.wait_for(down.bounded(call()), remaining), stop, doing)
        except TimeoutError:
            raise AskTimedOut(f"ask: no answer within {timeout_s:g}s while {doing}") from None
        except _Unreachable:
            raise UpstreamError(f"ask: {last_error} ({down.describe()}) while {doing}") from None
        except retry as exc:
            failures += 1
            last_error = str(exc)
            if isinstance(exc, ConnectError):
                down.failed(asked_at)
            else:
                down.since = None
            if isinstance(exc, RateLimitedError):
                pause = rate_limit_pause(exc.retry_after, failures, pacing.error_backoff_max_s)
            else:
                pause = error_backoff(failures, pacing.error_backoff_max_s, rng)
            left = down.left()
            if left is not None and left <= 0:
                raise UpstreamError(f"ask: {exc} ({down.describe()}) while {doing}") from None
            pause = pause if left is None else min(pause, left)
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
    unreachable_after_s: float | None = None,
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
        unreachable_after_s=unreachable_after_s,
    )
    baseline = follow_up_baseline(before, message, now=datetime.now(UTC), limit=limit)
    await post(
        lambda: client.send_message(chat, message), f"sending the follow-up to {chat} (it may have been sent)"
    )
    err.write(f"qawatch: sent a follow-up to {chat}\n")
    return chat, baseline
