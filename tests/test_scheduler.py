"""Pacing maths with an injected clock and a seeded RNG: numbers in, numbers out, no sleeping."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.httputil import parse_retry_after
from daemon.scheduler import (
    AUTH_PAUSE_BASE_S,
    AUTH_PAUSE_MAX_S,
    RATE_LIMIT_FLOOR_S,
    RETRY_AFTER_CAP_S,
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
from daemon.watcher import Watch, WatchHeap

PACING = Pacing(active_interval_s=2.0, idle_interval_s=60.0, jitter=0.1, error_backoff_max_s=30.0)


def test_jitter_stays_within_the_fraction_and_varies() -> None:
    """1. 1000 jittered 10 s intervals at ±10% 2. all in [9, 11] 3. spread over the range."""
    rng = random.Random(1)
    values = [jittered(10.0, 0.1, rng) for _ in range(1000)]
    assert all(9.0 <= v <= 11.0 for v in values)
    assert min(values) < 9.2
    assert max(values) > 10.8
    assert jittered(10.0, 0.0, rng) == 10.0


@pytest.mark.parametrize(
    ("previous", "pending", "expected"),
    [
        (None, False, 2.0),  # first poll: start at the active pace
        (None, True, 2.0),
        (2.0, True, 2.0),  # pending stays active
        (32.0, True, 2.0),  # a new message resets to active
        (2.0, False, 4.0),  # settled: doubles
        (4.0, False, 8.0),
        (32.0, False, 60.0),  # capped at the idle interval
        (60.0, False, 60.0),
        (0.5, False, 2.0),  # never below the active interval
    ],
)
def test_next_interval(previous: float | None, pending: bool, expected: float) -> None:
    """1. the previous interval and whether a reply is pending 2. the next un-jittered interval."""
    assert next_interval(previous, pending, PACING) == expected


def test_idle_backoff_sequence_reaches_the_cap() -> None:
    """1. a settled conversation polled again and again 2. 2, 4, 8, 16, 32, 60, 60."""
    interval = None
    seen = []
    for _ in range(7):
        interval = next_interval(interval, False, PACING)
        seen.append(interval)
    assert seen == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


@pytest.mark.parametrize(
    ("previous", "pending", "waiting", "expected"),
    [
        (None, True, True, 5.0),  # first poll finds the question unanswered: the waiting pace
        (2.0, True, True, 5.0),  # INITIATED: its end is not near
        (32.0, True, True, 5.0),  # a new question after a quiet spell
        (5.0, True, False, 2.0),  # PARTIAL (or unknown): it is about to finish
        (None, True, False, 2.0),
        (5.0, False, False, 10.0),  # settled: doubles from where it was
        (2.0, False, False, 4.0),
        (None, False, False, 2.0),
        (5.0, False, True, 10.0),  # waiting without pending means nothing: settled
    ],
)
def test_next_interval_by_phase(
    previous: float | None, pending: bool, waiting: bool, expected: float
) -> None:
    """1. the phase a poll saw (waiting, streaming or settled) 2. the next un-jittered interval."""
    assert (
        next_interval(previous, pending, replace(PACING, waiting_interval_s=5.0), waiting=waiting) == expected
    )


def test_waiting_interval_is_clamped_between_active_and_idle() -> None:
    """1. a waiting interval below the active one, above the idle cap, and null 2. never faster
    than the active pace, never slower than a settled conversation, null is the active pace."""
    assert next_interval(None, True, replace(PACING, waiting_interval_s=0.5), waiting=True) == 2.0
    assert next_interval(None, True, replace(PACING, active_interval_s=10.0), waiting=True) == 10.0
    assert next_interval(None, True, replace(PACING, idle_interval_s=3.0), waiting=True) == 3.0
    assert next_interval(None, True, replace(PACING, waiting_interval_s=None), waiting=True) == 2.0


def reference_interval(previous: float | None, phase: str, pacing: Pacing) -> float:
    """A tiny model of the pace: streaming at active; waiting at the waiting interval, within
    [active, idle] (null: active); settled doubles the previous interval within [active, idle]."""
    active, idle = pacing.active_interval_s, pacing.idle_interval_s
    if phase == "streaming":
        return active
    if phase == "waiting":
        wanted = active if pacing.waiting_interval_s is None else pacing.waiting_interval_s
        return sorted((active, wanted, idle))[1]  # idle >= active: the median clamps
    return active if previous is None else sorted((active, 2 * previous, idle))[1]


intervals = st.floats(0.01, 3600, allow_nan=False)


@given(
    previous=st.one_of(st.none(), intervals),
    phase=st.sampled_from(["waiting", "streaming", "settled"]),
    active=intervals,
    extra=st.floats(0, 86400, allow_nan=False),
    waiting_s=st.one_of(st.none(), intervals),
)
def test_next_interval_matches_the_reference(
    previous: float | None, phase: str, active: float, extra: float, waiting_s: float | None
) -> None:
    """1. any previous interval, phase and settings (idle >= active) 2. the interval the model
    says, always within [active, idle]."""
    pacing = Pacing(active_interval_s=active, idle_interval_s=active + extra, waiting_interval_s=waiting_s)
    got = next_interval(previous, phase != "settled", pacing, waiting=phase == "waiting")
    assert got == reference_interval(previous, phase, pacing)
    assert pacing.active_interval_s <= got <= pacing.idle_interval_s
    if phase == "streaming" or waiting_s is None:  # the old pace: no phase, only pending
        assert got == next_interval(previous, phase != "settled", pacing)


def test_error_backoff_is_full_jitter_and_capped() -> None:
    """1. consecutive errors 1..10 2. each wait within [0, min(cap, 2**(n-1))] 3. never above the cap."""
    rng = random.Random(7)
    for n in range(1, 11):
        ceiling = min(30.0, 2.0 ** (n - 1))
        samples = [error_backoff(n, 30.0, rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # full jitter really uses the range
    assert all(error_backoff(1000, 30.0, rng) <= 30.0 for _ in range(100))


def test_auth_pause_grows_and_caps() -> None:
    """1. the token refused again and again 2. pauses double from the base up to the cap."""
    assert auth_pause(1) == AUTH_PAUSE_BASE_S
    assert auth_pause(2) == AUTH_PAUSE_BASE_S * 2
    assert auth_pause(3) == AUTH_PAUSE_BASE_S * 4
    assert auth_pause(100) == AUTH_PAUSE_MAX_S


def test_rate_limit_pause_prefers_retry_after() -> None:
    """1. a 429 with Retry-After 7 2. pause 7 3. without it, a doubling capped backoff."""
    assert rate_limit_pause(7.0, 1, 30.0) == 7.0
    assert rate_limit_pause(None, 1, 30.0) == 1.0
    assert rate_limit_pause(None, 3, 30.0) == 4.0
    assert rate_limit_pause(None, 50, 30.0) == 30.0


def test_retry_after_seconds_and_http_date() -> None:
    """1. Retry-After as seconds, as an HTTP date, and garbage 2. seconds from now, or None."""
    now = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    assert parse_retry_after("3", now.timestamp()) == 3.0
    assert parse_retry_after(" 2.5 ", now.timestamp()) == 2.5
    date = format_datetime(now + timedelta(seconds=42), usegmt=True)
    assert parse_retry_after(date, now.timestamp()) == pytest.approx(42.0)
    past = format_datetime(now - timedelta(seconds=42), usegmt=True)
    assert parse_retry_after(past, now.timestamp()) == 0.0
    assert parse_retry_after("soon", now.timestamp()) is None
    assert parse_retry_after(None, now.timestamp()) is None
    assert parse_retry_after("-5", now.timestamp()) == 0.0
    for bogus in ("inf", "Infinity", "nan", "1e9", "0x10"):
        assert parse_retry_after(bogus, now.timestamp()) is None, bogus


@given(
    retry_after=st.one_of(st.none(), st.floats(-1e6, 1e10, allow_nan=False)),
    consecutive=st.integers(1, 10_000),
    cap=st.floats(0.01, 86_400),
)
def test_rate_limit_pause_is_bounded(retry_after: float | None, consecutive: int, cap: float) -> None:
    """Any 429: the pause is at least the floor and at most the larger of the Retry-After cap
    and the backoff cap; a positive Retry-After is honoured up to its cap."""
    pause = rate_limit_pause(retry_after, consecutive, cap)
    assert RATE_LIMIT_FLOOR_S <= pause <= max(RETRY_AFTER_CAP_S, cap, RATE_LIMIT_FLOOR_S)
    if retry_after is not None and retry_after > 0:
        assert pause == max(RATE_LIMIT_FLOOR_S, min(retry_after, RETRY_AFTER_CAP_S))
    else:
        assert pause == max(RATE_LIMIT_FLOOR_S, min(cap, 2.0 ** min(consecutive - 1, 32)))


def test_rate_limit_pause_caps_a_huge_retry_after() -> None:
    """1. a server sends Retry-After of a billion seconds 2. the pause is capped at an hour."""
    assert rate_limit_pause(1e9, 1, 30.0) == RETRY_AFTER_CAP_S == 3600.0


def test_first_polls_spread_evenly() -> None:
    """1. four watches start together with a 2 s interval 2. first polls at 0, .5, 1, 1.5 s."""
    assert initial_offsets(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert initial_offsets(0, 2.0) == []
    offsets = initial_offsets(1000, 2.0)
    assert max(offsets) < 2.0
    assert len(set(offsets)) == 1000


def test_token_bucket_limits_rate_with_fake_clock() -> None:
    """1. a bucket of 5/s with burst 5 2. the first 5 go at once 3. then one every 0.2 s."""
    bucket = TokenBucket(5.0, burst=5.0, now=100.0)
    assert [bucket.reserve(100.0) for _ in range(5)] == [0.0] * 5
    assert bucket.reserve(100.0) == pytest.approx(0.2)
    assert bucket.reserve(100.0) == pytest.approx(0.4)
    # after a quiet second, tokens refill up to the burst only
    assert bucket.reserve(110.0) == 0.0


def test_token_bucket_sustained_rate() -> None:
    """1. callers reserve and wait as told for 100 requests at 20/s 2. 100 requests take ~4 s
    after the initial burst of 20."""
    bucket = TokenBucket(20.0, now=0.0)
    now = 0.0
    for _ in range(100):
        now += bucket.reserve(now)
    assert now == pytest.approx(80 / 20.0)


def test_token_bucket_rejects_nonsense() -> None:
    """1. a rate of zero 2. refused."""
    with pytest.raises(ValueError, match="rate_per_s"):
        TokenBucket(0.0)


def test_due_heap_orders_and_reschedules() -> None:
    """1. three keys due at different times 2. popped in due order 3. rescheduling supersedes
    the old entry 4. a discarded key never comes out."""
    heap = DueHeap()
    heap.schedule("a", 3.0)
    heap.schedule("b", 1.0)
    heap.schedule("c", 2.0)
    heap.schedule("a", 0.5)  # moved earlier
    heap.discard("c")
    assert len(heap) == 2
    assert "c" not in heap
    assert heap.next_due() == 0.5
    assert heap.pop_due(0.4) is None
    assert heap.pop_due(10.0) == "a"
    assert heap.pop_due(10.0) == "b"
    assert heap.pop_due(10.0) is None
    assert heap.next_due() is None


def test_due_heap_many_keys_stays_consistent() -> None:
    """1. 10k keys scheduled, half rescheduled later 2. all pop exactly once in order."""
    rng = random.Random(3)
    heap = DueHeap()
    due = {}
    for i in range(10_000):
        due[f"k{i}"] = rng.uniform(0, 100)
        heap.schedule(f"k{i}", due[f"k{i}"])
    for i in range(0, 10_000, 2):
        due[f"k{i}"] += 50
        heap.schedule(f"k{i}", due[f"k{i}"])
    popped = []
    while (key := heap.pop_due(1_000.0)) is not None:
        popped.append(key)
    assert sorted(popped) == sorted(due)
    assert [due[k] for k in popped] == sorted(due.values())


_KEYS = st.sampled_from([f"k{i}" for i in range(6)])
_TIMES = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])  # few values: ties and re-use are common
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), _KEYS, _TIMES),
        st.tuples(st.just("many"), st.lists(st.tuples(_KEYS, _TIMES), max_size=8, unique_by=lambda e: e[0])),
        st.tuples(st.just("discard"), _KEYS),
        st.tuples(st.just("pop"), _TIMES),
    ),
    max_size=60,
)


def _watch_heap() -> DueHeap:
    """The poller's heap, over watches for every key it is given (its due times on them)."""
    watches = {f"k{i}": Watch(f"k{i}", "latest", 0.0) for i in range(6)}
    return WatchHeap(watches)


@pytest.mark.parametrize("make", [DueHeap, _watch_heap], ids=["dict", "on-watches"])
@given(ops=_OPS)
def test_due_heap_matches_a_dict_of_due_times(
    make: Callable[[], DueHeap], ops: list[tuple[Any, ...]]
) -> None:
    """The heap behaves as a plain dict of key -> due time would: 1. pop_due returns a key
    whose due time is the smallest and ≤ now (ties in key order), or None when none is due
    2. a rescheduled key has only its latest due time 3. len, `in` and due_at agree."""
    heap = make()
    model: dict[str, float] = {}
    for op in ops:
        if op[0] == "schedule":
            heap.schedule(op[1], op[2])
            model[op[1]] = op[2]
        elif op[0] == "many":
            heap.schedule_many(op[1])
            model.update(dict(op[1]))
        elif op[0] == "discard":
            heap.discard(op[1])
            model.pop(op[1], None)
        else:
            now = op[1]
            due = sorted((when, key) for key, when in model.items() if when <= now)
            expected = due[0][1] if due else None
            assert heap.pop_due(now) == expected
            if expected is not None:
                del model[expected]
        assert len(heap) == len(model)
        assert all(key in heap and heap.due_at(key) == when for key, when in model.items())
        assert heap.next_due() == (min(model.values()) if model else None)


@given(st.integers(0, 3_000), st.lists(st.integers(1, 1_500), min_size=1, max_size=8), st.floats(0.0, 100.0))
def test_pages_spread_as_the_whole_set_would(total: int, page_sizes: list[int], interval: float) -> None:
    """Start-up loads the watch set a page at a time: 1. pages of any sizes, each placed at its
    first position of the whole 2. the offsets, one after the other, are exactly those of the
    whole set spread at once."""
    offsets: list[float] = []
    first = 0
    sizes = iter(page_sizes * (total // max(1, min(page_sizes)) + 1))
    while first < total:
        size = min(next(sizes), total - first)
        offsets += spread_offsets(range(size), first, total, interval)
        first += size
    assert offsets == initial_offsets(total, interval)
