"""What must not lose a reply or wedge the daemon: a locked store, a stuck stdout reader, a
receiver that keeps saying "later", a sink that raises something unexpected."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support import TOKEN, closed_port, make_settings, running, subprocess_env, until
from webhook_receiver import Answer, Receiver, webhook

import daemon.outbox
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
