"""What must not lose a reply or wedge the daemon: a locked store, a stuck stdout reader, a
receiver that keeps saying "later", a sink that raises something unexpected."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs
from support import TOKEN, closed_port, make_settings, running, started_sim, subprocess_env, until
from webhook_receiver import Answer, Receiver, deliveries, webhook

import daemon.outbox
from daemon import logs
from daemon.settings import Settings
from daemon.simulator import SimConfig, Simulator, SimulatorThread
from daemon.sinks.webhook import WebhookSink
from daemon.store import SqliteStore

F_SETPIPE_SZ = 1031


async def test_a_failed_store_write_does_not_lose_the_reply(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. another process holds the state file's write lock while a reply finishes 2. the
    daemon's saves fail ("database is locked") and it logs that once 3. the lock goes away
    4. the reply is still reported, once (the cursor had not moved)."""
    monkeypatch.setattr(SqliteStore, "busy_timeout_ms", 100)
    chat = sim.create_chat("locked?", reply_s=0.6)
    settings = make_settings(sim, tmp_path, [chat])
    out = tmp_path / "replies.ndjson"
    async with running(settings) as app:
        await until(lambda: len(sim.requests_for(chat)) >= 2, what="first polls")
        blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            await until(lambda: app.poller is not None and app.poller.store_failing, what="store failing")
            assert "the state store cannot be written" in app.readiness_problems()
            finished = sim.conversation_json(chat)["messages"][0]
            await until(
                lambda: sim.conversation_json(chat)["messages"][0]["status"] == "COMPLETED",
                what="reply finished",
            )
            # polls see the finished reply while the store refuses to save it
            seen = len(sim.requests_for(chat))
            await until(lambda: len(sim.requests_for(chat)) >= seen + 2, what="polls while locked")
            assert not out.exists() or "chat.reply" not in out.read_text()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await until(lambda: out.exists() and "chat.reply.completed" in out.read_text(), what="reply")
        await asyncio.sleep(0.3)
    assert out.read_text().count("chat.reply.completed") == 1
    assert finished["role"] == "assistant"


async def test_a_receiver_that_says_later_is_left_alone_until_then(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. a webhook receiver answers 429 with Retry-After: 3 to everything 2. more replies
    finish meanwhile (and the idle recheck is short) 3. no request reaches the receiver before
    the 3 s are up, however many events wait."""
    monkeypatch.setattr(daemon.outbox, "RECHECK_S", 0.1)
    receiver = await Receiver(default=Answer(429, headers={"Retry-After": "3"})).start()
    try:
        first = sim.create_chat("first?", reply_s=0.2)
        later = [sim.create_chat(f"later {i}?", reply_s=0.5 + 0.3 * i) for i in range(4)]
        settings = make_settings(sim, tmp_path, [first, *later], sinks=[webhook(receiver)])
        async with running(settings):
            await until(lambda: len(receiver.hits) >= 1, what="first attempt")
            first_at = receiver.hits[0].at
            await asyncio.sleep(2.5)
            assert len(receiver.hits) == 1, [round(h.at - first_at, 2) for h in receiver.hits]
            await until(lambda: len(receiver.hits) >= 2, within=3, what="attempt after Retry-After")
            assert receiver.hits[1].at - first_at >= 2.9
            assert receiver.hits[1].id == receiver.hits[0].id  # the oldest event goes first
    finally:
        await receiver.stop()


async def test_a_sink_raising_something_unexpected_does_not_stop_the_daemon(
    sim: Simulator, tmp_path: Path, receiver: Receiver
) -> None:
    """1. a webhook sink with a header value aiohttp refuses (a line break) 2. each attempt
    raises ValueError inside aiohttp 3. the daemon keeps running and the file sink still gets
    the reply 4. the webhook delivery stays pending for a retry."""
    chat = sim.create_chat("header?")
    bad = WebhookSink("hook", receiver.url, headers={"X-Team": "qa\nInjected: 1"})
    settings = make_settings(sim, tmp_path, [chat])
    out = tmp_path / "replies.ndjson"
    async with running(settings, extra_sinks=[bad]) as app:
        await until(lambda: out.exists() and "chat.reply.completed" in out.read_text(), what="file")
        worker = next(w for w in app.sink_workers if w.sink.name == "hook")
        await until(lambda: worker.failing, what="webhook failing")
        assert not app.failed
    rows = sqlite3.connect(tmp_path / "state.db").execute(
        "SELECT state, attempts, last_error FROM deliveries WHERE sink = 'hook'"
    )
    state, attempts, error = rows.fetchone()
    assert (state, attempts >= 1) == ("pending", True)
    assert "ValueError" in error
    assert receiver.hits == []  # nothing with an injected header went out


async def test_token_refused_gauge_goes_back_to_zero(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. the API refuses the token 2. qawatch_token_refused is 1 3. it accepts it again
    4. the gauge is 0 and readiness has no problem left."""
    import daemon.scheduler

    monkeypatch.setattr(daemon.scheduler, "AUTH_PAUSE_BASE_S", 0.2)
    chat = sim.create_chat("gauge?")
    sim.forbidden = True
    async with running(make_settings(sim, tmp_path, [chat])) as app:
        registry = app.metrics.registry
        await until(lambda: registry.get_sample_value("qawatch_token_refused") == 1, what="gauge 1")
        sim.forbidden = False
        await until(lambda: registry.get_sample_value("qawatch_token_refused") == 0, within=5, what="gauge 0")
        assert app.readiness_problems() == []


def test_a_stuck_stdout_reader_does_not_wedge_the_daemon(tmp_path: Path) -> None:
    """1. `qawatch run` with the stdout sink writes into a 4 KiB pipe nobody reads 2. many
    replies finish 3. /healthz keeps answering and polling goes on 4. SIGTERM still stops it
    within the grace period, exit 0."""
    with SimulatorThread(SimConfig(token=TOKEN, reply_s=0.3, seed=3)) as thread:
        ids = [thread.sim.create_chat("question " + "x" * 400, reply_s=0.2 + 0.02 * i) for i in range(30)]
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
        port = closed_port()
        env = subprocess_env() | {
            "QAWATCH_API__TOKEN": TOKEN,
            "QAWATCH_API__BASE_URL": thread.base_url,
            "QAWATCH_API__RATE_LIMIT_PER_S": "200",
            "QAWATCH_POLL__ACTIVE_INTERVAL_S": "0.05",
            "QAWATCH_POLL__IDLE_INTERVAL_S": "0.2",
            "QAWATCH_WATCH__IDS": ",".join(ids),
            "QAWATCH_CONTROL__LISTEN": f"127.0.0.1:{port}",
            "QAWATCH_STATE__PATH": str(tmp_path / "state.db"),
            "QAWATCH_SHUTDOWN__GRACE_S": "2",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run"],
            env=env,
            cwd=tmp_path,
            stdout=write_end,
            stderr=subprocess.DEVNULL,
        )
        os.close(write_end)
        try:
            deadline = time.monotonic() + 10
            while len({r.path for r in thread.sim.requests}) < len(ids):
                assert time.monotonic() < deadline, "not every chat was polled"
                time.sleep(0.05)
            time.sleep(1.0)  # replies finish; the pipe fills up after a few lines
            for _ in range(3):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                    assert answer.status == 200
                before = len(thread.sim.requests)
                time.sleep(0.3)
                assert len(thread.sim.requests) > before, "polling stopped"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(read_end)


async def test_retention_forgets_delivered_texts_but_never_reports_twice(
    sim: Simulator, tmp_path: Path
) -> None:
    """1. a daemon with a tiny retention delivers a reply 2. pruning runs after it is older than
    that 3. the stored text is gone, the id stays 4. after a restart it is not reported again."""
    chat = sim.create_chat("retention?")
    tiny = {"retention_days": 0.1 / 86400}  # 0.1 s
    base = make_settings(sim, tmp_path, [chat])
    settings = base.model_copy(update={"state": base.state.model_copy(update=tiny)})
    out = tmp_path / "replies.ndjson"
    async with running(settings) as app:
        await until(lambda: out.exists() and "chat.reply.completed" in out.read_text(), what="reply")
        await asyncio.sleep(0.3)
        await app.prune()
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("SELECT body FROM events").fetchall() == [("",)]
    assert db.execute("SELECT COUNT(*) FROM deliveries").fetchone() == (0,)
    db.close()
    async with running(settings):
        await asyncio.sleep(0.5)
    assert out.read_text().count("chat.reply.completed") == 1


class _GarbledHTTP:
    """A raw TCP server on 127.0.0.1 answering every request with a header line longer than
    aiohttp accepts (a malformed HTTP answer); counts the connections it served."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.served = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(2)
                    conn.recv(65536)
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 9000 + b"\r\nContent-Length: 0\r\n\r\n"
                    )
                    self.served += 1
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


async def test_a_malformed_http_answer_is_a_transient_error(tmp_path: Path) -> None:
    """1. the API answers with an oversized header line 2. the client raises TransientError
    (not a bug) 3. the daemon counts it as an error poll and backs off, without tracebacks."""
    from daemon.errors import TransientError
    from daemon.qatech import QATechClient

    server = _GarbledHTTP()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with QATechClient(base, "t0ken-for-test") as client:
            with pytest.raises(TransientError, match="malformed HTTP answer"):
                await client.get_conversation("chat_abc")
        settings = Settings(
            api={"base_url": base, "token": "t0ken-for-test"},
            poll={"active_interval_s": 0.05, "error_backoff_max_s": 0.2},
            watch={"ids": ["chat_abc"]},
            state={"path": tmp_path / "s.db"},
            sinks=[],
            control={"listen": None},
        )
        with capture_logs() as logs:
            async with running(settings) as app:
                await until(lambda: server.served >= 3, what="three polls")
                registry = app.metrics.registry
                assert (registry.get_sample_value("qawatch_polls_total", {"outcome": "error"}) or 0) >= 2
        assert not [line for line in logs if line.get("log_level") == "error"]
        assert len([line for line in logs if line["event"].startswith("transient API error")]) == 1
    finally:
        server.close()


async def test_a_dead_letter_while_failing_does_not_spin(
    sim: Simulator, tmp_path: Path, receiver: Receiver
) -> None:
    """1. a receiver answers 500 forever; the schedule allows one retry 2. the event is
    dead-lettered 3. the worker then idles: little CPU and few store queries for a second."""
    receiver.default = Answer(500)
    chat = sim.create_chat("dead?", reply_s=0.1)
    settings = make_settings(sim, tmp_path, [chat], sinks=[webhook(receiver, retry_schedule_s=[0.3])])
    async with running(settings) as app:
        await until(lambda: any(r[1] == "dead" for r in deliveries(tmp_path / "state.db")), what="dead")
        store = app.runner.store  # type: ignore[union-attr]
        calls = 0
        real = store.due_deliveries

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return real(*args, **kwargs)

        store.due_deliveries = counting  # type: ignore[method-assign]
        cpu = time.process_time()
        await asyncio.sleep(1.0)
        assert time.process_time() - cpu < 0.5
        assert calls <= 3, calls


async def test_retry_after_zero_does_not_burn_the_schedule(
    sim: Simulator, tmp_path: Path, receiver: Receiver
) -> None:
    """1. a receiver answers 429 with Retry-After: 0 2. qawatch still waits at least a second
    between attempts, so the schedule is not spent in milliseconds."""
    receiver.default = Answer(429, headers={"Retry-After": "0"})
    chat = sim.create_chat("zero?", reply_s=0.1)
    settings = make_settings(sim, tmp_path, [chat], sinks=[webhook(receiver)])
    async with running(settings):
        await until(lambda: len(receiver.hits) >= 2, within=4, what="two attempts")
        assert receiver.hits[1].at - receiver.hits[0].at >= 0.95
        await asyncio.sleep(0.3)
        assert len(receiver.hits) <= 3


async def test_runtime_add_racing_a_reload_is_kept(sim: Simulator, tmp_path: Path) -> None:
    """1. a configured id is removed from the watch file while, at the same moment, it is added
    at runtime 2. whichever goes first, it ends up watched from the runtime source."""
    a, b = sim.create_chat("a?"), sim.create_chat("b?")
    watch_file = tmp_path / "ids.txt"
    watch_file.write_text(f"{a}\n{b}\n")
    settings = make_settings(sim, tmp_path, watch={"file": watch_file})
    async with running(settings) as app:
        watch_file.write_text(f"{a}\n")
        await asyncio.gather(app.add_watch(b, "latest"), app.reload(reread_config=False))
        row = await app.watch_row(b)
        assert row is not None
        assert (row.state, row.in_runtime, row.in_config) == ("active", True, False)
        assert b in app.poller.watches  # type: ignore[union-attr]


async def test_a_locked_store_during_reload_and_delivery_does_not_stop_the_daemon(
    sim: Simulator, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. another process holds the state file's lock 2. a reload and a webhook delivery both
    hit it 3. the daemon logs it and carries on 4. after the lock goes, the event is delivered."""
    monkeypatch.setattr(SqliteStore, "busy_timeout_ms", 100)
    monkeypatch.setattr(daemon.outbox, "STORE_RETRY_S", 0.2)
    receiver.default = Answer(200, delay_s=0.5)
    chat = sim.create_chat("lock?", reply_s=0.1)
    settings = make_settings(sim, tmp_path, [chat], sinks=[webhook(receiver)])
    async with running(settings) as app:
        await until(lambda: len(receiver.hits) >= 1, what="delivery in flight")
        blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            await app.reload()
            await asyncio.sleep(0.8)  # the in-flight delivery's answer cannot be recorded
            assert not app.failed
            worker = app.sink_workers[0]
            assert worker.store_failing
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await until(lambda: deliveries(tmp_path / "state.db")[0][1] == "delivered", what="delivered")
        assert not app.failed


async def test_webhook_url_query_token_never_reaches_logs_or_the_store(tmp_path: Path) -> None:
    """1. a webhook URL carries ?token=... 2. the receiver answers with a malformed HTTP reply
    3. neither the log lines nor the stored last_error contain the token."""
    server = _GarbledHTTP()
    secret = "QUERY-TOKEN-8c1f0a"
    try:
        async with started_sim(SimConfig(token=TOKEN, reply_s=0.1)) as sim:
            chat = sim.create_chat("query?")
            hook = {"type": "webhook", "url": f"http://127.0.0.1:{server.port}/h?token={secret}"}
            settings = make_settings(sim, tmp_path, [chat], sinks=[hook])
            stream = io.StringIO()
            saved = structlog.get_config()
            logs.configure("debug", "json", stream)
            try:
                async with running(settings):
                    await until(lambda: server.served >= 1, what="an attempt")
                    await until(
                        lambda: (
                            (deliveries(tmp_path / "state.db", "webhook") or [("", "", 0, None)])[0][3]
                            is not None
                        ),
                        what="error recorded",
                    )
            finally:
                structlog.configure(**saved)
        stored = deliveries(tmp_path / "state.db", "webhook")[0][3] or ""
        assert "malformed answer" in stored
        assert secret not in stored
        assert secret not in stream.getvalue()
        assert "sink failing" in stream.getvalue()
    finally:
        server.close()
