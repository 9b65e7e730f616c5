"""What every sink shares: its name, its event filter and its retry policy."""

from __future__ import annotations

import random

RETRY_BASE_S = 1.0
RETRY_MAX_S = 60.0


def backoff_delay(attempts: int, rng: random.Random, cap: float = RETRY_MAX_S) -> float:
    """Delay after ``attempts`` failed attempts: 1, 2, 4, ... seconds up to ``cap``, ±10%."""
    base = min(cap, RETRY_BASE_S * 2.0 ** min(max(0, attempts - 1), 32))
    return base * rng.uniform(0.9, 1.1)


class BaseSink:
    """Defaults for local sinks: retry forever with a capped backoff, one event at a time."""

    #: how many deliveries may be in flight at once
    max_concurrency = 1
    #: dead-letter an event that could not be delivered for this long (None: never)
    max_age_s: float | None = None
    #: whether delivery depends on someone else's server: a failing local sink (a full disk)
    #: makes the daemon unready, a receiver that is down does not
    remote = False

    def __init__(self, name: str, events: frozenset[str] | None = None) -> None:
        self.name = name
        self.events = events

    def retry_delay(self, attempts: int, rng: random.Random) -> float | None:
        """Seconds before the next attempt after ``attempts`` failed ones; None: dead-letter."""
        return backoff_delay(attempts, rng)

    async def open(self) -> None:
        return None

    async def reopen(self) -> None:
        return None

    async def close(self) -> None:
        return None
