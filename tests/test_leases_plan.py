"""The lease rule (:func:`daemon.leases.plan`) against a model of a fleet sharing watches."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.leases import plan, share


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
