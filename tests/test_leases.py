"""The lease rule (:func:`daemon.leases.plan`) against a model of a fleet sharing watches, and
the lease keeper surviving a store that fails mid-round."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from daemon.leases import LeaseKeeper, plan, share
from daemon.metrics import Metrics
from daemon.store import StoreError, StoreRunner


def run_fleet(active: int, held: list[int], rounds: int, batch: int) -> list[int]:
    """Replicas take turns as in production: each applies the rule to what it holds; claims
    come from the watches nobody holds, releases go back there."""
    held = list(held)
    for _ in range(rounds):
        for i in range(len(held)):
            free = active - sum(held)
            change = plan(held[i], active, len(held), batch=batch)
            held[i] += min(change, free) if change > 0 else change
    return held


@given(
    st.integers(0, 5_000),
    st.integers(1, 6),
    st.integers(1, 3_000),
    st.data(),
)
def test_a_fleet_settles_on_even_shares_holding_every_watch(
    active: int, replicas: int, batch: int, data: st.DataObject
) -> None:
    """From any starting split (a new replica holding nothing, a survivor holding all): 1. no
    watch is ever held twice (the model's sum never exceeds the active count) 2. after enough
    rounds every watch is held 3. no replica over its share (rounded up), so none below what
    the others leave."""
    start = data.draw(st.lists(st.integers(0, active), min_size=replicas, max_size=replicas))
    while sum(start) > active:  # a valid starting state: no watch held twice
        start[start.index(max(start))] -= 1
    rounds = 2 + active // batch
    held = run_fleet(active, start, rounds, batch)
    assert sum(held) == active
    target = share(active, replicas)
    assert max(held) <= target
    # the others hold at most their share, so the last holds at least the rest
    assert min(held) >= active - (replicas - 1) * target


def test_share_and_plan_examples() -> None:
    """1. 300 watches on 3 replicas: 100 each 2. a new fourth replica claims 75 3. a replica
    holding 300 of 300 with a new second one releases 150 4. at its share nothing moves."""
    assert share(300, 3) == 100
    assert share(0, 3) == 0
    assert plan(0, 300, 4) == 75
    assert plan(300, 300, 2) == -150
    assert plan(100, 300, 3) == 0
    assert plan(101, 300, 3) == -1
    assert plan(0, 10_000, 1, batch=2000) == 2000


class _FlakyStore:
    """A store whose claim and release fail as during a database restart (the first half of
    the round succeeded)."""

    replica, lease_ttl_s = "A", 3.0

    def __init__(self, holding: set[str]) -> None:
        self.holding = holding

    def heartbeat(self) -> int:
        return 2

    def renew_leases(self) -> set[str]:
        return set(self.holding)

    def watch_counts(self) -> dict[str, int]:
        return {"active": 4}

    def claim_watches(self, limit: int) -> list[Any]:
        raise StoreError("server closed the connection unexpectedly")

    def release_watches(self, short_ids: Iterable[str]) -> int:
        raise StoreError("server closed the connection unexpectedly")

    def release_all(self) -> None: ...

    def close(self) -> None: ...


class _Writer:
    async def flush(self) -> None: ...


class _Poller:
    def __init__(self, keys: set[str]) -> None:
        self.watches = dict.fromkeys(keys)
        self.in_flight: set[str] = set()
        self.writer = _Writer()

    def forget(self, key: str) -> None:
        self.watches.pop(key, None)


@pytest.mark.parametrize("holding", [set(), {"w1", "w2", "w3"}], ids=["claim-fails", "release-fails"])
def test_a_store_error_late_in_a_round_is_survived_and_logged_once(holding: set[str]) -> None:
    """Review: 1. the database goes away between renewing and claiming (or releasing) 2. the
    round ends without raising (the daemon is not stopped) 3. a second failing round does not
    log again (once per incident)."""
    store = _FlakyStore(holding)
    runner = StoreRunner(store)  # type: ignore[arg-type]  # a stand-in store: only its failures matter
    keeper = LeaseKeeper(store, runner, _Poller(set(holding)), Metrics())  # type: ignore[arg-type]

    async def rounds() -> None:
        await keeper.round()
        assert keeper.failing
        await keeper.round()

    with structlog.testing.capture_logs() as logs:
        try:
            asyncio.run(rounds())
        finally:
            asyncio.run(runner.close())
    assert [entry["log_level"] for entry in logs].count("error") == 1
