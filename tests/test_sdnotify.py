"""systemd's notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.sdnotify import Notifier
from daemon.simulator import SimulatorThread

WAIT_S = 5.0  # a safety net for every wait below; each is expected to take well under it


class Receiver:
    """systemd's side: a datagram socket read on a thread, every message kept with its arrival time."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.02)
        self._received: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-receiver", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._received.append((time.monotonic(), data.decode("utf-8")))

    def timed(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._received)

    def messages(self) -> list[str]:
        return [text for _, text in self.timed()]

    def count(self, line: str) -> int:
        return sum(1 for text in self.messages() if line in text.split("\n"))

    def wait_for(self, done: Callable[[list[str]], bool], what: str) -> list[str]:
        """Block (bounded) until ``done(messages)``; fail naming ``what`` and what did arrive."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if done(self.messages()):
                return self.messages()
            time.sleep(0.01)
        assert done(self.messages()), f"{what}; received {self.messages()!r}"
        return self.messages()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    path = str(tmp_path / "notify.sock")
    assert len(path) < 100, "AF_UNIX paths are limited to 108 bytes"
    return path


@pytest.fixture
def receiver(socket_path: str) -> Iterator[Receiver]:
    listener = Receiver(socket_path)
    try:
        yield listener
    finally:
        listener.close()


def notifier(address: str, **env: str) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": address, **env})


def fields(message: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in message.split("\n")]
    assert all(len(pair) == 2 for pair in pairs), message
    return dict(pairs)


# ------------------------------------------------------------------------------- messages


def test_each_message_has_the_protocol_format(receiver: Receiver, socket_path: str) -> None:
    """1. every public call once, in order 2. one datagram per call 3. each is the KEY=value
    lines systemd expects; RELOADING carries a CLOCK_MONOTONIC timestamp in µs; a newline in
    STATUS becomes a space (the protocol is line based)."""
    notify = notifier(socket_path)
    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify.ready()
    notify.ready("watching 3 conversations")
    notify.status("watching 2\nconversations")
    notify.watchdog()
    notify.reloading()
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify.stopping()
    notify.notify(STATUS="draining", ERRNO=0)
    notify.send("EXTEND_TIMEOUT_USEC=5000000")

    got = receiver.wait_for(lambda m: len(m) >= 8, "eight datagrams")
    assert got[:4] == [
        "READY=1",
        "READY=1\nSTATUS=watching 3 conversations",
        "STATUS=watching 2 conversations",
        "WATCHDOG=1",
    ]
    reloading = fields(got[4])
    assert list(reloading) == ["RELOADING", "MONOTONIC_USEC"]
    assert reloading["RELOADING"] == "1"
    assert before_usec <= int(reloading["MONOTONIC_USEC"]) <= after_usec
    assert got[5:] == ["STOPPING=1", "STATUS=draining\nERRNO=0", "EXTEND_TIMEOUT_USEC=5000000"]


def test_abstract_namespace_socket() -> None:
    """1. systemd's socket is abstract: NOTIFY_SOCKET=@name 2. ready() 3. the datagram arrives
    on the socket bound to "\\0name"."""
    name = f"qawatch-test-{uuid.uuid4().hex}"
    listener = Receiver("\0" + name)
    try:
        notifier("@" + name).ready("up")
        assert listener.wait_for(bool, "the READY datagram") == ["READY=1\nSTATUS=up"]
    finally:
        listener.close()


def test_without_notify_socket_every_call_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    """1. no NOTIFY_SOCKET (also: set but empty) 2. every call returns without opening a socket
    3. there is no watchdog interval and run_watchdog returns at once."""
    for environ in ({}, {"NOTIFY_SOCKET": "", "WATCHDOG_USEC": "200000"}, {"WATCHDOG_USEC": "200000"}):
        notify = Notifier.from_env(environ)
        assert not notify.enabled
        assert notify.watchdog_interval_s is None
        with monkeypatch.context() as patched:

            def no_socket(*_: object, **__: object) -> None:
                raise AssertionError("a socket was opened without NOTIFY_SOCKET")

            patched.setattr(socket, "socket", no_socket)
            notify.ready("x")
            notify.status("x")
            notify.watchdog()
            notify.reloading()
            notify.stopping()
            notify.notify(STATUS="x")
            notify.send("READY=1")
        asyncio.run(asyncio.wait_for(notify.run_watchdog(), timeout=1.0))


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch, socket_path: str) -> None:
    """1. NOTIFY_SOCKET and WATCHDOG_USEC in the process environment 2. from_env() without
    arguments picks both up."""
    monkeypatch.setenv("NOTIFY_SOCKET", socket_path)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notify = Notifier.from_env()
    assert notify.address == socket_path
    assert notify.watchdog_interval_s == 15.0


# ------------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("200000", None, 0.1),
        ("30000000", None, 15.0),
        ("200000", "ours", 0.1),
        ("200000", "other", None),
        (None, None, None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
    ],
    ids=["usec", "30s", "pid-ours", "pid-other", "unset", "zero", "negative", "not-a-number"],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    socket_path: str, usec: str | None, pid: str | None, interval: float | None
) -> None:
    """1. WATCHDOG_USEC (and maybe WATCHDOG_PID) as systemd sets them 2. the ping interval is
    half the timeout, in seconds 3. none when unset or invalid, or when the watchdog is meant
    for another process."""
    env = {"WATCHDOG_USEC": usec} if usec is not None else {}
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid() if pid == "ours" else os.getpid() + 1)
    assert notifier(socket_path, **env).watchdog_interval_s == interval


async def test_run_watchdog_pings_at_the_interval(receiver: Receiver, socket_path: str) -> None:
    """1. WATCHDOG_USEC=200000: a ping every 0.1 s 2. run_watchdog for 0.65 s 3. between 4 and 7
    pings arrive (never faster than the interval), spaced apart 4. cancelled: no more pings."""
    notify = notifier(socket_path, WATCHDOG_USEC="200000")
    task = asyncio.create_task(notify.run_watchdog())
    await asyncio.sleep(0.65)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=1.0)
    await asyncio.sleep(0.1)  # let the reader thread catch up
    pings = receiver.timed()
    assert all(text == "WATCHDOG=1" for _, text in pings), pings
    assert 4 <= len(pings) <= 7, pings
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(pings)]
    assert min(gaps) > 0.05, gaps
    await asyncio.sleep(0.25)
    assert len(receiver.timed()) == len(pings), "pings after the task was cancelled"


async def test_unhealthy_daemon_is_not_pinged(receiver: Receiver, socket_path: str) -> None:
    """1. run_watchdog with a health check, 0.1 s interval 2. healthy: pings arrive
    3. unhealthy for 0.4 s: no ping at all, so systemd would restart us 4. healthy again: pings resume."""
    health = {"ok": True}
    notify = notifier(socket_path, WATCHDOG_USEC="200000")
    task = asyncio.create_task(notify.run_watchdog(lambda: health["ok"]))
    try:
        await asyncio.sleep(0.35)
        assert receiver.count("WATCHDOG=1") >= 2
        health["ok"] = False
        await asyncio.sleep(0.05)  # a ping sent just before may still be on its way
        while_unhealthy = receiver.count("WATCHDOG=1")
        await asyncio.sleep(0.4)
        assert receiver.count("WATCHDOG=1") == while_unhealthy
        health["ok"] = True
        await asyncio.sleep(0.3)
        assert receiver.count("WATCHDOG=1") > while_unhealthy
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=1.0)


def test_run_watchdog_without_watchdog_usec_returns_at_once(socket_path: str) -> None:
    """1. NOTIFY_SOCKET but no WATCHDOG_USEC 2. run_watchdog returns immediately, nothing sent."""
    asyncio.run(asyncio.wait_for(notifier(socket_path).run_watchdog(), timeout=1.0))


# ------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("how", ["unlinked", "nobody-listening", "no-folder", "too-long", "not-encodable"])
def test_vanished_socket_never_raises_and_logs_once(
    tmp_path: Path, debug_logs: list[MutableMapping[str, Any]], how: str
) -> None:
    """1. NOTIFY_SOCKET names a socket that is gone (unlinked, closed, never there, or garbage)
    2. every call returns without raising 3. one debug line says so, however many calls fail."""
    path = str(tmp_path / "notify.sock")
    if how in {"unlinked", "nobody-listening"}:
        listener = Receiver(path)
        listener.close()
        if how == "unlinked":
            Path(path).unlink()
    elif how == "no-folder":
        path = str(tmp_path / "missing" / "notify.sock")
    elif how == "too-long":
        path = str(tmp_path / ("x" * 200))
    else:
        path += "\ud800"  # a lone surrogate: no file name can hold it
    notify = notifier(path, WATCHDOG_USEC="200000")
    notify.ready("up")
    notify.watchdog()
    notify.status("still here")
    notify.reloading()
    notify.stopping()
    failures = [e for e in debug_logs if e["event"] == "systemd notify failed"]
    assert len(failures) == 1, debug_logs
    assert failures[0]["log_level"] == "debug"


async def test_run_watchdog_survives_a_vanished_socket(
    receiver: Receiver, socket_path: str, debug_logs: list[MutableMapping[str, Any]]
) -> None:
    """1. run_watchdog pinging 2. the socket disappears 3. the task keeps running without an
    error 4. exactly one debug line."""
    notify = notifier(socket_path, WATCHDOG_USEC="200000")
    task = asyncio.create_task(notify.run_watchdog())
    await asyncio.sleep(0.15)

    def vanish() -> None:
        receiver.close()
        Path(socket_path).unlink()

    await asyncio.to_thread(vanish)
    await asyncio.sleep(0.35)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=1.0)
    assert [e["event"] for e in debug_logs].count("systemd notify failed") == 1


# ------------------------------------------------------------------------------- end to end


def _lines_of(messages: list[str]) -> list[str]:
    """Every KEY=value line in arrival order, STATUS lines left out (they may come at any time)."""
    return [line for text in messages for line in text.split("\n") if not line.startswith("STATUS=")]


def test_run_notifies_systemd_in_order(
    receiver: Receiver, socket_path: str, subprocess_env: dict[str, str], sim_thread: SimulatorThread
) -> None:
    """1. qawatch run with NOTIFY_SOCKET and WATCHDOG_USEC=400000, as under Type=notify
    2. READY=1 with a STATUS 3. WATCHDOG=1 pings 4. SIGHUP: RELOADING=1 (with MONOTONIC_USEC),
    then READY=1 5. SIGTERM: STOPPING=1, no READY after it, exit 0."""
    tmp = Path(socket_path).parent
    sim = sim_thread.sim
    config = tmp / "qawatch.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": sim_thread.base_url, "timeout_s": 2},
                "watch": {"ids": [sim.create_chat("q", reply="a")]},
                "state": {"path": str(tmp / "state.db")},
                "sinks": [{"type": "file", "path": str(tmp / "replies.ndjson")}],
                "control": {"listen": None},
                "shutdown": {"grace_s": 2},
            }
        ),
        encoding="utf-8",
    )
    env = {k: v for k, v in subprocess_env.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env |= {
        "NOTIFY_SOCKET": socket_path,
        "WATCHDOG_USEC": "400000",
        "QAWATCH_API__TOKEN": sim.config.token,
        "QAWATCH_LOG__FORMAT": "json",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)],
        env=env,
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        got = receiver.wait_for(lambda m: "READY=1" in _lines_of(m), "READY=1 after start")
        ready = next(text for text in got if "READY=1" in text.split("\n"))
        assert "STATUS" in fields(ready), ready
        receiver.wait_for(lambda m: "WATCHDOG=1" in _lines_of(m), "a watchdog ping")
        process.send_signal(signal.SIGHUP)
        receiver.wait_for(lambda m: _lines_of(m).count("READY=1") >= 2, "READY=1 after the reload")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)
    assert process.returncode == 0, stderr
    receiver.wait_for(lambda m: "STOPPING=1" in _lines_of(m), "STOPPING=1 at shutdown")
    order = [
        line
        for line in _lines_of(receiver.messages())
        if line != "WATCHDOG=1" and not line.startswith("MONOTONIC_USEC=")
    ]
    assert order == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], receiver.messages()
    reloading = next(text for text in receiver.messages() if "RELOADING=1" in text.split("\n"))
    assert "MONOTONIC_USEC" in fields(reloading)
    assert "Traceback" not in stderr
