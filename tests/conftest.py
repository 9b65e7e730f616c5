"""Shared, generic fixtures: a clean QAWATCH_* environment and a simulator in a thread."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from daemon.simulator import SimConfig, SimulatorThread

#: the token the ``sim_thread`` simulator accepts (``sim_thread.sim.config.token``);
#: distinctive, so that a leak into output is easy to spot
SIM_TOKEN = "qwt-SECRET-7f3a9c1e5b"


def _ours(name: str) -> bool:
    return name.upper().startswith("QAWATCH_") or name == "CREDENTIALS_DIRECTORY"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove every ``QAWATCH_*`` variable (and systemd's credentials folder) for the test;
    set more with the returned monkeypatch."""
    for name in list(os.environ):
        if _ours(name):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """A copy of ``os.environ`` without ``QAWATCH_*`` variables, for child processes."""
    return {name: value for name, value in os.environ.items() if not _ours(name)}


@pytest.fixture
def sim_thread() -> Iterator[SimulatorThread]:
    """A started simulator (0.3 s replies, token :data:`SIM_TOKEN`) on its own thread; always stopped."""
    with SimulatorThread(SimConfig(token=SIM_TOKEN, reply_s=0.3, seed=7)) as thread:
        yield thread
