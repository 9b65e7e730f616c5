"""What the daemon needs from durable state, whatever the database: the :class:`Store`
protocol, the rows it hands out, and :class:`StoreRunner`.

A store commits an event and its per-sink delivery rows in the same transaction as the
detector state that produced them, so the cursor never moves past an unrecorded reply, and a
reply event id that is already stored is never stored (or delivered) again.

The methods are synchronous and meant to run on one worker thread: see :class:`StoreRunner`.
A failing database raises one of :data:`STORE_ERRORS`, which is what callers catch.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, ParamSpec, Protocol, TypeVar

from daemon.events import Event

P = ParamSpec("P")
T = TypeVar("T")


class StoreError(Exception):
    """A store other than SQLite could not do its work (the database unreachable, a failed
    statement): its driver's error, in one line without credentials."""


#: the driver error classes of every store: SQLite's own, and :class:`StoreError`, which the
#: PostgreSQL store raises for its driver's errors (so that psycopg is imported only with it)
_ERROR_CLASSES: list[type[BaseException]] = [sqlite3.Error, StoreError]
#: what any store may raise for a failing database (disk full, locked, connection lost):
#: callers catch these (``except STORE_ERRORS``), never one driver's class
STORE_ERRORS: tuple[type[BaseException], ...] = tuple(_ERROR_CLASSES)


class WatchRow(NamedTuple):
    """One watch as the store holds it (a named tuple: 100,000 load in a fraction of a second)."""

    short_id: str
    #: 1 when the configuration names it (SQLite's 0/1, used as a truth value)
    in_config: int
    #: 1 when added at runtime (control API, `qawatch add`)
    in_runtime: int
    state: str
    reason: str | None
    backfill: str
    started_at: float
    ended_at: float | None
    detector: str | None
    interval_s: float | None
    errors: int
    last_poll_at: float | None
    last_status: str | None
    next_poll_at: float | None
    #: with a shared store: the replica polling it now (None: nobody, or a one-process store)
    holder: str | None

    @property
    def active(self) -> bool:
        return self.state == "active"

    @property
    def source(self) -> str:
        parts = [name for name, on in (("config", self.in_config), ("runtime", self.in_runtime)) if on]
        return "+".join(parts) or "none"


@dataclass(frozen=True)
class Delivery:
    seq: int
    event_id: str
    body: str
    attempts: int
    #: when the delivery was queued (or replayed): ``max_age_s`` counts from here
    created_at: float


@dataclass(frozen=True)
class DeadLetter:
    event_id: str
    event_type: str
    short_id: str
    sink: str
    attempts: int
    last_error: str | None
    created_at: float
    dead_at: float


@dataclass(frozen=True, slots=True)
class PollRecord:
    """What one poll changes for a watch, saved in one transaction with its events."""

    short_id: str
    detector: str | None
    interval_s: float | None
    errors: int
    last_poll_at: float
    last_status: str
    next_poll_at: float | None
    #: when the watch (this incarnation of it) began; None: whatever incarnation is active
    started_at: float | None = None


def poll_values(record: PollRecord) -> tuple[object, ...]:
    """The parameters of a store's poll update, in the order both stores' statements take
    them: the new values, then the watch and (twice) the incarnation it must still be."""
    return (
        record.detector,
        record.interval_s,
        record.errors,
        record.last_poll_at,
        record.last_status,
        record.next_poll_at,
        record.short_id,
        record.started_at,
        record.started_at,
    )


class Store(Protocol):
    """What the daemon needs from durable state."""

    def open(self) -> None: ...
    def close(self) -> None: ...
    def sync_config_watches(self, ids: Sequence[str], backfill: str, now: float) -> list[WatchRow]: ...
    def add_runtime_watch(self, short_id: str, backfill: str, now: float) -> WatchRow: ...
    def remove_runtime_watch(self, short_id: str) -> WatchRow | None: ...
    def get_watch(self, short_id: str) -> WatchRow | None: ...
    def watches(self, *, active_only: bool = False, ended_only: bool = False) -> list[WatchRow]: ...
    def active_watches_page(self, after: int, limit: int) -> tuple[list[WatchRow], int]: ...
    def watch_counts(self) -> dict[str, int]: ...
    def save_poll(self, record: PollRecord, events: Sequence[tuple[Event, Sequence[str]]]) -> list[str]: ...
    def save_polls(
        self, polls: Sequence[tuple[PollRecord, Sequence[tuple[Event, Sequence[str]]]]]
    ) -> list[list[str]]: ...
    def save_poll_times(self, records: Sequence[PollRecord]) -> None: ...
    def end_watch(
        self, short_id: str, reason: str, now: float, event: tuple[Event, Sequence[str]] | None
    ) -> bool: ...
    def due_deliveries(self, sink: str, now: float, limit: int = 100) -> list[Delivery]: ...
    def next_delivery_at(self, sink: str) -> float | None: ...
    def mark_delivered(self, seq: int, sink: str, now: float) -> None: ...
    def mark_delivered_many(self, seqs: Sequence[int], sink: str, now: float) -> None: ...
    def mark_retry(self, seq: int, sink: str, next_at: float, error: str, now: float) -> None: ...
    def mark_dead(self, seq: int, sink: str, error: str, now: float) -> None: ...
    def delivery_counts(self) -> dict[tuple[str, str], int]: ...
    def prune(self, cutoff: float) -> tuple[int, int]: ...
    def dead_letters(self, sink: str | None = None) -> list[DeadLetter]: ...
    def replay_dead(
        self, now: float, *, sink: str | None = None, event_id: str | None = None, since: float | None = None
    ) -> int: ...


class StoreRunner:
    """Runs a synchronous store's calls on one dedicated thread, off the event loop."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qawatch-store")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def open(self) -> None:
        await self.run(self.store.open)

    async def close(self) -> None:
        try:
            await self.run(self.store.close)
        finally:
            self._executor.shutdown(wait=True)
