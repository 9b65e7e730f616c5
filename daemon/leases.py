"""Which watches this replica polls, when several share one PostgreSQL store.

Every third of ``state.lease_ttl_s`` the keeper says the replica is alive, renews the leases
it holds (forgetting any it lost: lapsed and taken over, or ended by another replica), and
claims or releases watches to hold its share: the active watches divided by the live
replicas, rounded up. Between renewals it says it is alive and claims up to its share every
second. A replica that dies stops renewing; its leases lapse the TTL after its last renewal
and the others claim its watches within about a second of that. :func:`plan` is the pure
rule, tested against a model of a fleet.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.store import STORE_ERRORS, StoreRunner, WatchRow

if TYPE_CHECKING:
    from daemon.watcher import Poller

#: between renewals, lapsed watches are looked for this often (seconds)
CLAIM_CHECK_S = 1.0
#: the most watches one round claims (one statement; a dead replica's 10,000 are taken over
#: in one round, in about a tenth of a second)
CLAIM_BATCH = 10_000


def share(active: int, replicas: int) -> int:
    """This replica's share of ``active`` watches among ``replicas`` live replicas."""
    return math.ceil(active / max(1, replicas)) if active > 0 else 0


def plan(held: int, active: int, replicas: int, *, batch: int = CLAIM_BATCH) -> int:
    """How many watches to claim (positive) or release (negative) this round: claim up to
    the share (at most ``batch`` at a time), release down to it. The shares are rounded up,
    so together they can hold every watch, and a replica at its share never moves: no
    watches passed back and forth."""
    target = share(active, replicas)
    if held < target:
        return min(batch, target - held)
    return target - held  # 0 at the share, negative above it


@runtime_checkable
class SharedStore(Protocol):
    """What a store shared by replicas has beyond :class:`~daemon.store.Store`."""

    replica: str
    lease_ttl_s: float

    def heartbeat(self) -> int: ...
    def renew_leases(self) -> set[str]: ...
    def watch_counts(self) -> dict[str, int]: ...
    def claim_watches(self, limit: int) -> list[WatchRow]: ...
    def release_watches(self, short_ids: Iterable[str]) -> int: ...
    def release_all(self) -> None: ...


class LeaseKeeper:
    def __init__(self, store: SharedStore, runner: StoreRunner, poller: Poller, metrics: Metrics) -> None:
        self.store = store
        self.runner = runner
        self.poller = poller
        self.metrics = metrics
        self.log = get_logger()
        self.failing = False
        self.replicas = 1
        #: active watches in the store, as counted at the last renewal
        self.active = 0

    @property
    def every_s(self) -> float:
        return self.store.lease_ttl_s / 3

    @property
    def tick_s(self) -> float:
        """How often lapsed watches are looked for between renewals: a dead replica's watches
        are taken over within about a second of its leases lapsing."""
        return min(CLAIM_CHECK_S, self.every_s)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = -math.inf
        while True:
            if loop.time() - renewed >= self.every_s - 0.01:
                renewed = loop.time()
                await self.round()
            else:
                await self.round(renew=False)
            await asyncio.sleep(self.tick_s)

    async def round(self, *, renew: bool = True) -> None:
        """One heartbeat, renewal (``renew``) and claim/release; a failing store is logged
        once per incident, and the replica keeps polling what it holds meanwhile. Without
        ``renew`` (between renewals): only a heartbeat and claims up to the share."""
        try:
            await self._round(renew)
        except STORE_ERRORS as exc:
            if not self.failing:
                self.log.error(
                    "cannot renew leases: the state store is unreachable; polling the watches held",
                    error=" ".join(str(exc).split())[:200],
                )
            self.failing = True

    async def _round(self, renew: bool = True) -> None:
        store, run = self.store, self.runner.run
        poller = self.poller
        self.replicas = await run(store.heartbeat)
        if renew:
            held = await run(store.renew_leases)
            self.active = (await run(store.watch_counts)).get("active", 0)
        else:  # between renewals: the live count is new, the watch count that of the renewal
            held = set(poller.watches)
        active = self.active
        lost = [key for key in poller.watches if key not in held]
        for key in lost:
            poller.forget(key)
        if lost:
            self.metrics.lease_losses.inc(len(lost))
            self.log.info("leases lost to other replicas", watches=len(lost))
        change = plan(len(held), active, self.replicas)
        if change > 0:
            rows = await run(store.claim_watches, change)
            if rows:
                poller.start_watches(rows)
                self.metrics.lease_claims.inc(len(rows))
                await poller.check_states(row.short_id for row in rows)
        elif change < 0 and renew:
            spare = [key for key in held if key not in poller.in_flight][:-change]
            await poller.writer.flush()  # their latest poll times first: the next holder starts from them
            released = await run(store.release_watches, spare)
            for key in spare:
                poller.forget(key)
            self.metrics.lease_releases.inc(released)
        self.metrics.leases_held.set(len(poller.watches))
        self.metrics.replicas.set(self.replicas)
        if self.failing:  # a whole round went through: the incident is over
            self.log.info("state store reachable again; leases renewed", held=len(held))
            self.failing = False
