"""Status-aware pacing in a model: requests per reply and detection delay, no network, no sleep.

A deterministic model of issue 10's figure 11: a reply takes ``D`` seconds (uniform grid over
20-60 s); the API shows it ``INITIATED`` (or not yet created) until ``(1 - share) * D`` and
streaming (``PARTIAL``) after, until it completes at ``D``. A poller polls at ``offset`` first,
then after every poll waits the interval its pacing gives for what that poll saw. It detects the
reply at its first poll at or after ``D``; the delay is that poll's time less ``D``, and the
requests are every poll up to and including it. Request latency and the scheduler's own lateness
are left out: the benchmark measures those.

qawatch's pacing here is the real :func:`daemon.scheduler.next_interval` and
:func:`daemon.scheduler.jittered` with a seeded RNG. Run this file to print the table:
``.venv/bin/python tests/test_pacing_model.py``.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from daemon.scheduler import Pacing, jittered, next_interval

#: the interval to wait after a poll that saw the reply waiting (True) or streaming (False)
Policy = Callable[[bool, random.Random], float]


@dataclass(frozen=True)
class Figures:
    requests: float  # mean requests per reply
    mean_delay: float
    p95_delay: float
    max_delay: float


def one_reply(
    duration: float, share: float, offset: float, policy: Policy, rng: random.Random
) -> tuple[int, float]:
    """(requests, delay) for one reply of ``duration`` that streams for its last ``share``."""
    streams_at = (1.0 - share) * duration
    t, requests = offset, 0
    while True:
        requests += 1
        if t >= duration:
            return requests, t - duration
        t += policy(t < streams_at, rng)


def model(policy: Policy, first: float, share: float, *, grid: int = 400, phases: int = 25) -> Figures:
    """Replies of 20-60 s (``grid`` + 1 durations) times ``phases`` first-poll offsets in
    ``[0, first)``."""
    rng = random.Random(11)
    requests: list[int] = []
    delays: list[float] = []
    for i in range(grid + 1):
        duration = 20.0 + 40.0 * i / grid
        for k in range(phases):
            n, delay = one_reply(duration, share, first * (k + 0.5) / phases, policy, rng)
            requests.append(n)
            delays.append(delay)
    delays.sort()
    return Figures(
        statistics.fmean(requests), statistics.fmean(delays), delays[int(0.95 * len(delays))], delays[-1]
    )


def fixed(interval: float) -> tuple[Policy, float]:
    return (lambda waiting, rng: interval), interval


def qawatch(pacing: Pacing) -> tuple[Policy, float]:
    def policy(waiting: bool, rng: random.Random) -> float:
        return jittered(next_interval(None, True, pacing, waiting=waiting), pacing.jitter, rng)

    return policy, next_interval(None, True, pacing, waiting=True)


def figures(policy: tuple[Policy, float], share: float, **grid: int) -> Figures:
    return model(policy[0], policy[1], share, **grid)


SMALL = {"grid": 80, "phases": 10}  # for the tests: a few thousand replies, well under a second


@pytest.mark.parametrize("share", [0.2, 0.3, 0.7])
def test_default_pacing_beats_the_3s_loop_on_delay(share: float) -> None:
    """1. replies of 20-60 s streaming for their last 20% (figure 11), 30% or 70% (the
    simulator) 2. qawatch's defaults detect them sooner than a fixed 3 s loop, mean and p95."""
    ours, loop = figures(qawatch(Pacing()), share, **SMALL), figures(fixed(3.0), share, **SMALL)
    assert ours.mean_delay < loop.mean_delay
    assert ours.p95_delay < loop.p95_delay


def test_default_pacing_needs_fewer_requests_than_the_3s_loop_at_figure_11s_share() -> None:
    """1. replies streaming for their last 20% 2. fewer requests per reply than a fixed 3 s
    loop, and far fewer than polling at the active pace all along (waiting_interval_s null)."""
    ours = figures(qawatch(Pacing()), 0.2, **SMALL)
    assert ours.requests < 0.8 * figures(fixed(3.0), 0.2, **SMALL).requests
    assert ours.requests < 0.6 * figures(qawatch(Pacing(waiting_interval_s=None)), 0.2, **SMALL).requests


def test_without_visible_streaming_the_delay_is_the_waiting_pace() -> None:
    """The trade-off. 1. replies jump from INITIATED to COMPLETED 2. the mean delay is about
    half the waiting interval (as a fixed loop at that interval), not half the active one."""
    for waiting in (3.0, 5.0, 8.0):
        ours = figures(qawatch(Pacing(waiting_interval_s=waiting)), 0.0, **SMALL)
        assert ours.mean_delay == pytest.approx(waiting / 2, rel=0.1)
        assert ours.requests == pytest.approx(figures(fixed(waiting), 0.0, **SMALL).requests, rel=0.1)


def table() -> str:
    rows: list[tuple[str, tuple[Policy, float]]] = [
        ("fixed 20 s", fixed(20.0)),
        ("fixed 5 s", fixed(5.0)),
        ("fixed 3 s", fixed(3.0)),
        ("qawatch waiting null", qawatch(Pacing(waiting_interval_s=None))),
    ]
    rows += [
        (f"qawatch waiting {w:g} s", qawatch(Pacing(waiting_interval_s=w))) for w in (3.0, 4.0, 5.0, 6.0, 8.0)
    ]
    lines = []
    for share in (0.2, 0.7, 0.0):
        what = f"streaming for the last {share:.0%}" if share else "INITIATED straight to COMPLETED"
        lines.append(f"\n{what} (model; replies of 20-60 s, active 2 s, jitter ±10%)")
        lines.append(f"{'pacing':24} {'req/reply':>9} {'mean s':>7} {'p95 s':>6} {'max s':>6}")
        for name, policy in rows:
            f = figures(policy, share)
            lines.append(
                f"{name:24} {f.requests:9.2f} {f.mean_delay:7.2f} {f.p95_delay:6.2f} {f.max_delay:6.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
