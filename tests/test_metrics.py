"""The lean metrics on the poll path are exposed exactly as prometheus-client's own types
would expose the same observations (the reference here), and pass ``promtool``'s lint where
it is installed (the check in test_control covers the whole exposition)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from daemon.metrics import LATENESS_BUCKETS, LeanCounter, LeanHistogram

values = st.floats(min_value=0.0, max_value=100.0, allow_nan=False) | st.sampled_from(
    [*LATENESS_BUCKETS, 0.0]  # the bounds themselves: a value equal to a bound is in its bucket
)


@given(st.lists(values, max_size=60))
def test_lean_histogram_exposes_what_prometheus_histogram_does(observations: list[float]) -> None:
    lean_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    lean = LeanHistogram("h_seconds", "doc", LATENESS_BUCKETS, lean_registry)
    reference = Histogram("h_seconds", "doc", buckets=LATENESS_BUCKETS, registry=reference_registry)
    for value in observations:
        lean.observe(value)
        reference.observe(value)
    assert lean.count == len(observations)
    assert generate_latest(lean_registry) == generate_latest(reference_registry)


@given(st.lists(st.sampled_from(["ok", "error", "new"]), max_size=40))
def test_lean_counter_exposes_what_prometheus_counter_does(outcomes: list[str]) -> None:
    lean_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    lean = LeanCounter("c", "doc", "outcome", ("ok", "error"), lean_registry)
    reference = Counter("c", "doc", ["outcome"], registry=reference_registry)
    for outcome in ("ok", "error"):
        reference.labels(outcome)
    for outcome in outcomes:
        lean.labels(outcome).inc()
        reference.labels(outcome).inc()
    assert lean.labels("ok").get() == outcomes.count("ok")

    # the reference also writes c_created lines unless disabled; compare the samples
    def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(lean_registry) == samples(reference_registry)
