"""Prometheus metrics (prometheus-client), one registry per daemon so tests can run several."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from daemon import __version__

# the *_created series double the exposition for no use here
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENESS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
DELAY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
WATCH_STATES = ("active", "ended")
#: prometheus-client's float spelling (its own function is unannotated)
_go_float: Callable[[float], str] = floatToGoString
POLL_OUTCOMES = ("ok", "error", "bad_response", "rate_limited", "auth_refused", "not_found", "rejected")


class LeanHistogram:
    """A histogram for the poll path, exposed as prometheus-client's ``Histogram`` is (same
    series, same bucket rule: the first bound ``>=`` the value). It is written only from the
    event loop's thread, so it needs no lock: an observation is a bisect and two additions,
    a fraction of ``Histogram.observe`` (which takes a lock per bucket and for the sum)."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(float(b) for b in buckets)
        #: the ``le`` labels, spelt as prometheus-client spells them
        self.labels = [_go_float(bound) for bound in (*self.bounds, float("inf"))]
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def collect(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        for label, count in zip(self.labels, self.counts, strict=True):
            cumulative += count
            buckets.append((label, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation)


class LeanCounter:
    """A counter by one label for the poll path: ``labels(value)`` is a child with ``inc()``
    and ``get()``, exposed as prometheus-client's labelled ``Counter`` (``<name>_total``).
    Lock-free for the same reason as :class:`LeanHistogram`."""

    def __init__(
        self, name: str, documentation: str, label: str, values: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self._children = {value: LeanCount() for value in values}
        registry.register(self)

    def labels(self, value: str) -> LeanCount:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = LeanCount()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, child in self._children.items():
            family.add_metric([value], child.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=[self.label])


class LeanCount:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def get(self) -> float:
        return self.value


class Metrics:
    """Every metric qawatch exposes on ``/metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # the three metrics every poll updates: lean (see LeanHistogram), the rest as usual
        self.polls = LeanCounter(
            "qawatch_polls", "Polls of QA.tech conversations, by outcome.", "outcome", POLL_OUTCOMES, r
        )
        self.poll_latency = LeanHistogram(
            "qawatch_poll_duration_seconds",
            "Time from sending a poll to having its answer.",
            LATENCY_BUCKETS,
            r,
        )
        self.poll_lateness = LeanHistogram(
            "qawatch_poll_lateness_seconds",
            "How late a poll starts after it was due (waits for the rate limit and free workers).",
            LATENESS_BUCKETS,
            r,
        )
        self.group_commits = Counter(
            "qawatch_store_commits", "Transactions that recorded polls with news (group commits).", registry=r
        )
        self.group_committed_polls = Counter(
            "qawatch_store_committed_polls", "Polls recorded by those transactions.", registry=r
        )
        self.watches = Gauge("qawatch_watches", "Watched conversations, by state.", ["state"], registry=r)
        # several replicas on one PostgreSQL store (state.url); zero with SQLite
        self.leases_held = Gauge(
            "qawatch_leases_held", "Watches this replica holds the lease of (polls).", registry=r
        )
        self.replicas = Gauge(
            "qawatch_replicas", "Live replicas sharing the store, as this one last saw.", registry=r
        )
        self.lease_claims = Counter(
            "qawatch_lease_claims",
            "Watches this replica claimed (new, or their holder's lease lapsed).",
            registry=r,
        )
        self.lease_losses = Counter(
            "qawatch_lease_losses",
            "Watches whose lease this replica found lost (taken over or ended).",
            registry=r,
        )
        self.lease_releases = Counter(
            "qawatch_lease_releases",
            "Watches this replica gave up so that others hold their share.",
            registry=r,
        )
        self.events = Counter(
            "qawatch_events", "Events recorded in the outbox, by type.", ["type"], registry=r
        )
        self.deliveries = Counter(
            "qawatch_deliveries",
            "Delivery attempts, by sink and outcome (delivered, retry, dead, disabled).",
            ["sink", "outcome"],
            registry=r,
        )
        self.outbox_pending = Gauge(
            "qawatch_outbox_pending", "Events waiting for delivery, by sink.", ["sink"], registry=r
        )
        self.rate_limit_waits = Counter(
            "qawatch_rate_limit_waits",
            "Polls that waited for the token bucket (api.rate_limit_per_s).",
            registry=r,
        )
        self.rate_limit_wait_seconds = Counter(
            "qawatch_rate_limit_wait_seconds", "Time polls spent waiting for the rate limit.", registry=r
        )
        self.detection_delay = Histogram(
            "qawatch_detection_delay_seconds",
            "From the conversation's updatedAt (server clock) to qawatch detecting the finished reply.",
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self.unknown_statuses = Counter(
            "qawatch_unknown_statuses",
            "Message status values qawatch did not know (once per conversation).",
            registry=r,
        )
        self.window_rereads = Counter(
            "qawatch_window_rereads",
            "Answers that were full and shared no message with the last one, read again with limit 100.",
            registry=r,
        )
        self.window_overflows = Counter(
            "qawatch_window_overflows",
            "Answers where even limit 100 did not reach back to what was seen: replies may be lost upstream.",
            registry=r,
        )
        self.token_refused = Gauge(
            "qawatch_token_refused", "1 while the API refuses the token (401/403).", registry=r
        )
        self.sink_disabled = Gauge(
            "qawatch_sink_disabled",
            "1 while a sink is disabled (webhook answered 410).",
            ["sink"],
            registry=r,
        )
        self.build = Info("qawatch_build", "qawatch build information.", registry=r)
        self.build.info({"version": __version__})
        for state in WATCH_STATES:
            self.watches.labels(state)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
