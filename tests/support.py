"""Helpers shared by the test files: bounded polling, an in-process simulator and daemon, fast
settings against the simulator, and what subprocess tests need (a clean environment, a closed
port, the one-line error check).

A plain module, not a fixture file: the fixtures built on it live in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from daemon.app import App
from daemon.events import Event
from daemon.settings import Settings
from daemon.simulator import SimConfig, Simulator
from daemon.sinks import Sink, build_sinks

#: how the tests start the CLI in a child process
QAWATCH = [sys.executable, "-m", "daemon"]
#: a safety net for one CLI call: every call in the tests is expected to take well under it
CALL_TIMEOUT_S = 20.0

#: the simulator's public default token (``SimConfig().token``), which the ``sim`` fixture accepts
TOKEN = "sim-token"


def ours(name: str) -> bool:
    """An environment variable qawatch reads: ``QAWATCH_*`` or systemd's credentials folder."""
    return name.upper().startswith("QAWATCH_") or name == "CREDENTIALS_DIRECTORY"


def subprocess_env() -> dict[str, str]:
    """A copy of ``os.environ`` without ``QAWATCH_*`` variables, for child processes."""
    return {name: value for name, value in os.environ.items() if not ours(name)}


async def until(predicate: Callable[[], object], within: float = 5.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` is truthy, checking every 10 ms; fail after ``within`` s.

    ``predicate`` may also return an awaitable (an ``async def`` predicate): its result counts.
    """
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.01)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def one_line_error(stderr: str) -> str:
    """The single stderr line of a failed command (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    stripped = stderr.strip()
    assert stripped, "nothing on stderr"
    assert "\n" not in stripped, stderr
    assert stripped.startswith("qawatch:"), stripped
    return stripped


def logged(logs: Sequence[Any], event: str, **fields: object) -> list[Any]:
    """Captured log entries with message ``event`` whose ``fields`` match."""
    return [
        entry
        for entry in logs
        if entry["event"] == event and all(entry.get(k) == v for k, v in fields.items())
    ]


@contextlib.asynccontextmanager
async def started_sim(config: SimConfig | None = None, **kwargs: Any) -> AsyncIterator[Simulator]:
    """A simulator (``Simulator(config, **kwargs)``) listening on a free port; always stopped."""
    simulator = Simulator(config, **kwargs)
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


def make_settings(
    sim: Simulator,
    tmp_path: Path,
    ids: Sequence[str] = (),
    *,
    api: dict[str, Any] | None = None,
    poll: dict[str, Any] | None = None,
    watch: dict[str, Any] | None = None,
    sinks: list[dict[str, Any]] | None = None,
    control: dict[str, Any] | None = None,
    state: str = "state.db",
    grace_s: float = 2.0,
) -> Settings:
    """Fast settings against ``sim`` with token :data:`TOKEN` and no control API; by default one
    file sink at ``tmp_path/replies.ndjson``."""
    return Settings(
        api={"base_url": sim.base_url, "token": TOKEN, "rate_limit_per_s": 200, **(api or {})},
        poll={
            "active_interval_s": 0.05,
            "idle_interval_s": 0.2,
            "jitter": 0.1,
            "error_backoff_max_s": 0.2,
            **(poll or {}),
        },
        watch={"ids": list(ids), **(watch or {})},
        state={"path": tmp_path / state},
        sinks=sinks if sinks is not None else [{"type": "file", "path": tmp_path / "replies.ndjson"}],
        control={"listen": None, **(control or {})},
        shutdown={"grace_s": grace_s},
    )


@contextlib.asynccontextmanager
async def running(settings: Settings, *, extra_sinks: Sequence[Sink] = ()) -> AsyncIterator[App]:
    """Run the daemon (configured sinks plus ``extra_sinks``, the token ``api.token``) until the
    block ends.

    On exit the stop event is set, ``App.run`` must return within 10 s, and the daemon must
    not have failed internally.
    """
    assert settings.api.token is not None
    app = App(settings, settings.api.token.get_secret_value(), sinks=[*build_sinks(settings), *extra_sinks])
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop), name="app")
    try:
        await until(lambda: app.ready.is_set() or task.done(), what="daemon ready")
        if task.done():
            task.result()  # re-raise why it did not start
        yield app
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert not app.failed, "a background task of the daemon failed"


async def qawatch_async(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """Run ``qawatch ARGS`` in a child process without blocking the loop (so in-process servers
    keep answering); (exit code, stdout, stderr). Killed if it outlives :data:`CALL_TIMEOUT_S`."""
    process = await asyncio.create_subprocess_exec(
        *QAWATCH,
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CALL_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def reply_event(n: int, short_id: str = "chat_a") -> Event:
    """A reply event numbered ``n`` (its id and message id follow from ``n``), for store tests."""
    return Event(
        type="chat.reply.completed",
        id=f"evt_{n:032x}",
        timestamp="2026-11-27T10:00:00.000Z",
        data={"conversation": {"shortId": short_id}, "message": {"id": f"m{n}", "text": f"t{n}"}},
    )
