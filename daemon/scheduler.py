"""Polling pace: pure timing maths, a token bucket and a due-time heap, all on an injected clock.

Nothing here sleeps or reads a clock by itself: callers pass ``now`` (monotonic seconds) and
a :class:`random.Random`, so every decision is a plain function that tests check with numbers.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass

#: the first error backoff step; doubles per consecutive error up to ``error_backoff_max_s``
ERROR_BACKOFF_BASE_S = 1.0
#: 401/403 pauses start here and double per refused attempt, capped at ``AUTH_PAUSE_MAX_S``
AUTH_PAUSE_BASE_S = 5.0
AUTH_PAUSE_MAX_S = 300.0
#: a server's Retry-After is honoured up to this long (a bogus huge value must not stop polling)
RETRY_AFTER_CAP_S = 3600.0
#: no 429 pauses less than this, whatever its Retry-After or the backoff settings say
RATE_LIMIT_FLOOR_S = 1.0


#: the default ``poll.waiting_interval_s``: see :func:`next_interval` and the README's pacing
DEFAULT_WAITING_INTERVAL_S = 5.0


@dataclass(frozen=True)
class Pacing:
    active_interval_s: float = 2.0
    idle_interval_s: float = 60.0
    jitter: float = 0.1
    error_backoff_max_s: float = 30.0
    #: while a reply is pending but not about to finish (INITIATED, or not created yet);
    #: clamped to [``active_interval_s``, ``idle_interval_s``]; None: the active interval
    waiting_interval_s: float | None = DEFAULT_WAITING_INTERVAL_S


def jittered(interval: float, jitter: float, rng: random.Random) -> float:
    """``interval`` scaled by a uniform factor in ``[1 - jitter, 1 + jitter]``."""
    if jitter <= 0:
        return interval
    return interval * (1.0 + rng.uniform(-jitter, jitter))


def next_interval(previous: float | None, pending: bool, pacing: Pacing, *, waiting: bool = False) -> float:
    """The un-jittered interval after a successful poll, by the phase the poll saw.

    * streaming (``pending`` and not ``waiting``: a reply is ``PARTIAL``, streaming or in an
      unknown status, so about to finish): the active interval;
    * waiting (``pending`` and ``waiting``: no reply yet, or only ``INITIATED`` ones): the
      waiting interval, never faster than the active one nor slower than the idle cap (None:
      the active interval);
    * settled (not ``pending``): starts at the active interval and doubles after each quiet
      poll (from whatever the previous interval was) up to the idle cap.
    """
    if pending:
        if waiting and pacing.waiting_interval_s is not None:
            return min(pacing.idle_interval_s, max(pacing.active_interval_s, pacing.waiting_interval_s))
        return pacing.active_interval_s
    if previous is None:
        return pacing.active_interval_s
    return min(pacing.idle_interval_s, max(pacing.active_interval_s, previous * 2.0))


def error_backoff(consecutive_errors: int, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(cap, base * 2**(n-1))]``."""
    n = max(1, consecutive_errors)
    ceiling = min(cap, ERROR_BACKOFF_BASE_S * 2.0 ** min(n - 1, 32))
    return rng.uniform(0.0, ceiling)


def auth_pause(consecutive_refusals: int) -> float:
    """How long all polling pauses after the n-th refused token in a row (no jitter: global)."""
    n = max(1, consecutive_refusals)
    return min(AUTH_PAUSE_MAX_S, AUTH_PAUSE_BASE_S * 2.0 ** min(n - 1, 32))


def rate_limit_pause(retry_after: float | None, consecutive: int, cap: float) -> float:
    """A 429's pause: the server's ``Retry-After`` when it gives one (> 0), else a capped
    doubling; never less than :data:`RATE_LIMIT_FLOOR_S`."""
    if retry_after is not None and retry_after > 0:
        pause = min(retry_after, RETRY_AFTER_CAP_S)
    else:
        pause = min(cap, ERROR_BACKOFF_BASE_S * 2.0 ** min(max(1, consecutive) - 1, 32))
    return max(RATE_LIMIT_FLOOR_S, pause)


def initial_offsets(count: int, interval: float) -> list[float]:
    """First polls spread evenly over the first interval: ``i * interval / count``."""
    if count <= 0:
        return []
    step = interval / count
    return [i * step for i in range(count)]


def spread_offsets(positions: Iterable[int], first: int, total: int, interval: float) -> list[float]:
    """:func:`initial_offsets` for a page of a larger set: the offsets of ``positions`` within
    a page that starts at position ``first`` of ``total``."""
    step = interval / max(1, total)
    return [(first + position) * step for position in positions]


class TokenBucket:
    """A token bucket on an injected clock: ``reserve(now)`` says how long to wait."""

    def __init__(self, rate_per_s: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self.rate = rate_per_s
        self.capacity = burst if burst is not None else max(1.0, rate_per_s)
        self._tokens = self.capacity
        self._updated = now

    def reserve(self, now: float) -> float:
        """Take one token; return the seconds to wait before using it (0 when available)."""
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._updated = max(self._updated, now)
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate


class DueHeap:
    """Conversations ordered by due time; rescheduling supersedes the old entry lazily.

    An entry is ``(due, key)``; each key's current due time (the same float object) is kept
    by :meth:`_get`/:meth:`_set`/:meth:`_clear`, in a dict here. A subclass may keep it on
    objects it already has (the poller keeps it on its watches: no dict of 100,000 entries).
    Ties pop in key order; a superseded entry is dropped when it reaches the top."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}

    # -- where each key's current due time is kept --------------------------------------

    def _get(self, key: str) -> float | None:
        return self._due.get(key)

    def _set(self, key: str, due: float) -> None:
        self._due[key] = due

    def _clear(self, key: str) -> None:
        self._due.pop(key, None)

    def __len__(self) -> int:
        return len(self._due)

    # -- the heap ------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._get(key) is not None

    def schedule(self, key: str, due: float) -> None:
        self._set(key, due)
        heapq.heappush(self._heap, (due, key))

    def schedule_many(self, entries: Iterable[tuple[str, float]]) -> None:
        """:meth:`schedule` for many keys at once (one heapify instead of a push each)."""
        added = [(when, key) for key, when in entries]
        for when, key in added:
            self._set(key, when)
        if len(added) > len(self._heap):
            self._heap.extend(added)
            heapq.heapify(self._heap)
        else:
            for entry in added:
                heapq.heappush(self._heap, entry)

    def discard(self, key: str) -> None:
        self._clear(key)

    def due_at(self, key: str) -> float | None:
        return self._get(key)

    def _drop_stale(self) -> None:
        heap, get = self._heap, self._get
        while heap:
            when, key = heap[0]
            if get(key) == when:
                return
            heapq.heappop(heap)

    def next_due(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> str | None:
        """The earliest key due at or before ``now``, removed; ``None`` if none is due."""
        self._drop_stale()
        if not self._heap or self._heap[0][0] > now:
            return None
        _, key = heapq.heappop(self._heap)
        self._clear(key)
        return key
