"""Prometheus metrics (prometheus-client), one registry per daemon so tests can run several."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

from daemon import __version__

# the *_created series double the exposition for no use here
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENESS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
DELAY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
WATCH_STATES = ("active", "ended")


class Metrics:
    """Every metric qawatch exposes on ``/metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.polls = Counter(
            "qawatch_polls", "Polls of QA.tech conversations, by outcome.", ["outcome"], registry=r
        )
        self.poll_latency = Histogram(
            "qawatch_poll_duration_seconds",
            "Time from sending a poll to having its answer.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.poll_lateness = Histogram(
            "qawatch_poll_lateness_seconds",
            "How late a poll starts after it was due (waits for the rate limit and free workers).",
            buckets=LATENESS_BUCKETS,
            registry=r,
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
        for outcome in (
            "ok",
            "error",
            "bad_response",
            "rate_limited",
            "auth_refused",
            "not_found",
            "rejected",
        ):
            self.polls.labels(outcome)
        for state in WATCH_STATES:
            self.watches.labels(state)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
