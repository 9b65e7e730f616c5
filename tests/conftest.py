"""Shared, generic fixtures: a clean QAWATCH_* environment for every test, a simulator on the
test's event loop or in a thread, a webhook receiver, and PostgreSQL (``pg_url``, ``pg_db``,
``make_pg_db``: see pgserver.py)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import pytest
import structlog
import structlog.testing
from hypothesis import HealthCheck, settings
from pgserver import make_pg_db, pg_db, pg_url  # noqa: F401 - fixtures: PostgreSQL, see pgserver.py
from support import TOKEN, ours, started_sim
from support import subprocess_env as clean_env
from webhook_receiver import Receiver

from daemon.simulator import SimConfig, Simulator, SimulatorThread

# property tests: bounded in `make test`, thousands of examples in `make proptest`
settings.register_profile("default", max_examples=400, deadline=None, print_blob=True)
settings.register_profile(
    "long", max_examples=5_000, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: the token the ``sim_thread`` simulator accepts (``sim_thread.sim.config.token``);
#: distinctive, so that a leak into output is easy to spot
SIM_TOKEN = "qwt-SECRET-7f3a9c1e5b"


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove every ``QAWATCH_*`` variable (and systemd's credentials folder) for every test, so
    that none of the developer's shell leaks into :class:`Settings`; set more with the returned
    monkeypatch."""
    for name in list(os.environ):
        if ours(name):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """A copy of ``os.environ`` without ``QAWATCH_*`` variables, for child processes."""
    return clean_env()


@pytest.fixture
def sim_config() -> SimConfig:
    """The ``sim`` fixture's configuration: token :data:`support.TOKEN`, 0.3 s replies, seed 7.
    A test file overrides this fixture for another token, speed or seed."""
    return SimConfig(token=TOKEN, reply_s=0.3, seed=7)


@pytest.fixture
async def sim(sim_config: SimConfig) -> AsyncIterator[Simulator]:
    """A started simulator (:func:`sim_config`) on the test's event loop; always stopped."""
    async with started_sim(sim_config) as simulator:
        yield simulator


@pytest.fixture
def sim_thread() -> Iterator[SimulatorThread]:
    """A started simulator (0.3 s replies, token :data:`SIM_TOKEN`) on its own thread; always stopped."""
    with SimulatorThread(SimConfig(token=SIM_TOKEN, reply_s=0.3, seed=7)) as thread:
        yield thread


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A started webhook receiver answering 200 (script more with ``receiver.answer(...)``)."""
    rec = await Receiver().start()
    try:
        yield rec
    finally:
        await rec.stop()


@pytest.fixture
def debug_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Captured log entries at debug level, whatever an earlier test configured; restored after."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as entries:
            yield entries
    finally:
        structlog.configure(**saved)
