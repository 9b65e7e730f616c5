"""Each case of "Detection you can trust" end to end: the simulator as upstream, the daemon
in-process on a real SQLite file with a real file sink, and ``watch``/``ask`` as real
child processes.

1. window overflow: 12 turns while the daemon is down; more than 100 messages at once
2. history that vanishes from an answer (or whose ties come back reordered) and returns
3. ``ask --chat`` while the previous turn's reply still streams and the follow-up lags
4. the API's order, not createdAt; messages of other roles
5. every reply of the current turn decides "pending"
6. an id listed twice in one answer
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from support import TOKEN, logged, make_settings, qawatch_async, running, until

from daemon.app import App
from daemon.simulator import Simulator

FAST = {"active_interval_s": 0.05, "idle_interval_s": 0.05, "jitter": 0.0}


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def reply_ids(path: Path) -> list[str]:
    return [e["data"]["message"]["id"] for e in read_events(path) if e["type"].startswith("chat.reply.")]


def gets(sim: Simulator, short_id: str) -> int:
    return sum(1 for r in sim.requests_for(short_id) if r.method == "GET")


def counter(app: App, name: str, **labels: str) -> float:
    value = app.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def cli_env(env: dict[str, str]) -> dict[str, str]:
    return {
        **env,
        "QAWATCH_API__TOKEN": TOKEN,
        "QAWATCH_POLL__ACTIVE_INTERVAL_S": "0.05",
        "QAWATCH_POLL__JITTER": "0",
    }


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "replies.ndjson"


# ---------------------------------------------------------------------------- 1. the window


async def test_daemon_stopped_while_twelve_turns_complete_reports_every_reply(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. the first reply is reported; the daemon stops 2. 12 turns complete (24 messages,
    more than api.message_limit 20) 3. the daemon starts again 4. the full answer shares
    nothing with the last one: it reads again with limit 100 5. all 12 replies are reported,
    once, oldest first, and nothing is said to be lost."""
    short_id = sim.create_chat("q0", short_id="chat_twelve", reply_s=0.0)
    settings = make_settings(sim, tmp_path, [short_id], poll=FAST)
    async with running(settings):
        await until(lambda: len(reply_ids(out)) == 1, what="the first reply")
    replies = sim.add_turns(short_id, 12)
    async with running(settings) as app:
        await until(lambda: len(reply_ids(out)) == 13, what="the 12 replies")
        polls = gets(sim, short_id)
        await until(lambda: gets(sim, short_id) >= polls + 3, what="more polls")
        assert counter(app, "qawatch_window_rereads_total") == 1
        assert counter(app, "qawatch_window_overflows_total") == 0
        assert counter(app, "qawatch_events_total", type="chat.reply.completed") == 12
    assert reply_ids(out)[1:] == replies
    limits = [r.query.get("limit") for r in sim.requests_for(short_id) if r.method == "GET"]
    assert limits.count("100") == 1


async def test_more_than_100_messages_at_once_is_said_once(sim: Simulator, tmp_path: Path, out: Path) -> None:
    """1. a watched conversation 2. 60 turns (120 messages) arrive between two polls 3. the
    read with limit 100 still shares nothing with the last answer: one warning naming the
    conversation, qawatch_window_overflows_total 1 4. the 50 replies it shows are reported."""
    short_id = sim.create_chat("q0", short_id="chat_flood", reply_s=0.0)
    settings = make_settings(sim, tmp_path, [short_id], poll=FAST)
    with structlog.testing.capture_logs() as logs:
        async with running(settings) as app:
            await until(lambda: len(reply_ids(out)) == 1, what="the first reply")
            replies = sim.add_turns(short_id, 60)
            await until(lambda: len(reply_ids(out)) == 51, what="the 50 replies in reach")
            polls = gets(sim, short_id)
            await until(lambda: gets(sim, short_id) >= polls + 3, what="more polls")
            assert counter(app, "qawatch_window_overflows_total") == 1
    assert reply_ids(out)[1:] == replies[-50:]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["conversation"] == short_id
    assert "limit 100" in warnings[0]["event"] or warnings[0].get("limit") == 100


# ---------------------------------------------------------------------------- 2. history


@pytest.mark.parametrize("backfill", ["none", "latest"])
async def test_history_that_vanishes_and_comes_back_is_not_reported_again(
    sim: Simulator, tmp_path: Path, out: Path, backfill: str
) -> None:
    """1. two turns finished before the watch began (same createdAt) 2. the daemon starts
    (backfill none: nothing; latest: the newest reply, once) 3. answers hide the newest reply,
    then list the ties in the other order 4. nothing more is reported, logged or counted."""
    short_id = sim.create_chat(short_id="chat_history")
    old, newest = sim.add_turns(short_id, 2)
    settings = make_settings(sim, tmp_path, [short_id], poll=FAST, watch={"backfill": backfill})
    expected = [newest] if backfill == "latest" else []
    with structlog.testing.capture_logs() as logs:
        async with running(settings) as app:
            await until(lambda: gets(sim, short_id) >= 2, what="first polls")
            sim.hide(short_id, newest, answers=2)
            sim.hide(short_id, old, answers=3)
            await until(lambda: gets(sim, short_id) >= 6, what="answers without them")
            sim.flip_ties(short_id, answers=3)
            await until(lambda: gets(sim, short_id) >= 12, what="answers with ties reordered")
            assert counter(app, "qawatch_events_total", type="chat.reply.completed") == len(expected)
    assert reply_ids(out) == expected
    assert len(logged(logs, "reply finished")) == len(expected)


# ---------------------------------------------------------------------------- 3. ask --chat


async def test_ask_follow_up_never_answers_with_the_previous_turn(
    sim: Simulator, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. the previous turn's reply streams for 4 s 2. ask --chat sends a follow-up, which the
    API lists only 4 s later 3. the previous reply completes first 4. ask waits and prints the
    follow-up's own answer, exit 0."""
    short_id = sim.create_chat("first", short_id="chat_follow", reply="previous answer", reply_s=4.0)
    sim.config.visible_lag_s = 4.0
    sim.config.reply_s = 0.3
    code, stdout, stderr = await qawatch_async(
        "ask", "--base-url", sim.base_url, "--chat", short_id, "--timeout", "15", "second",
        env=cli_env(subprocess_env),
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, stderr
    (line,) = stdout.splitlines()
    event = json.loads(line)
    assert event["data"]["message"]["text"].startswith("Answer to 'second'")
    posted = [r.at for r in sim.requests_for(short_id) if r.method == "POST"]
    previous_done = sim.conversation_json(short_id, limit=100)["messages"]
    assert len(posted) == 1
    assert any(m["text"] == "previous answer" for m in previous_done)
    # the case that matters: the follow-up was sent while the previous reply still streamed
    first = sim.requests_for(short_id)[0].at
    assert posted[0] - first < 4.0


# ---------------------------------------------------------------------------- 4. order and roles


async def test_watch_takes_the_apis_order_and_ignores_other_roles(
    sim: Simulator, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. chat_order: the API lists the reply above the user message although its createdAt
    is a minute older 2. chat_roles: a "system" message is newest, above a finished reply
    3. watch reports both replies at once, exit 0."""
    order = sim.create_chat(short_id="chat_order")
    sim.add_message(order, "user", "q")
    listed_first = sim.add_message(order, "assistant", "a", created_shift_s=-60.0)
    roles = sim.create_chat("q", short_id="chat_roles", reply_s=0.0)
    sim.add_message(roles, "system", "a note")
    code, stdout, stderr = await qawatch_async(
        "watch", "--base-url", sim.base_url, "--timeout", "10", order, roles,
        env=cli_env(subprocess_env),
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, stderr
    events = {e["data"]["conversation"]["shortId"]: e for e in map(json.loads, stdout.splitlines())}
    assert events[order]["data"]["message"]["id"] == listed_first
    assert events[roles]["data"]["message"]["role"] == "assistant"
    assert gets(sim, order) == 1  # settled at the first answer: no wait until the timeout
    assert gets(sim, roles) == 1


# ---------------------------------------------------------------------------- 5. pending


async def test_an_unfinished_reply_of_the_turn_keeps_the_conversation_pending(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. [a2 COMPLETED, a1 PARTIAL, u1] 2. a2 is reported (backfill) 3. the daemon keeps
    polling at active_interval_s (0.05 s), not idle_interval_s (30 s) 4. a1 completes and is
    reported within a second."""
    short_id = sim.create_chat(short_id="chat_pending")
    sim.add_message(short_id, "user", "q")
    a1 = sim.add_message(short_id, "assistant", "half", status="PARTIAL", is_streaming=True)
    a2 = sim.add_message(short_id, "assistant", "done")
    poll = {"active_interval_s": 0.05, "idle_interval_s": 30.0, "jitter": 0.0}
    async with running(make_settings(sim, tmp_path, [short_id], poll=poll)):
        await until(lambda: reply_ids(out) == [a2], what="a2")
        polls = gets(sim, short_id)
        await until(lambda: gets(sim, short_id) >= polls + 5, within=2.0, what="active polling")
        sim.set_message(short_id, a1, status="COMPLETED", text="whole", is_streaming=False)
        await until(lambda: reply_ids(out) == [a2, a1], within=1.0, what="a1")


# ---------------------------------------------------------------------------- 6. an id twice


async def test_an_id_twice_in_one_answer_is_one_event(sim: Simulator, tmp_path: Path, out: Path) -> None:
    """1. a reply finishes and the next answers list it twice 2. one event, counted and
    logged once."""
    short_id = sim.create_chat("q", short_id="chat_twice", reply_s=0.0)
    reply = sim.conversation_json(short_id)["messages"][0]["id"]
    settings = make_settings(sim, tmp_path, [short_id], poll=FAST, watch={"backfill": "none"})
    with structlog.testing.capture_logs() as logs:
        async with running(settings) as app:
            await until(lambda: gets(sim, short_id) >= 1, what="the first poll")
            sim.send_message(short_id, "q2", reply_s=0.1)
            await until(
                lambda: sim.conversation_json(short_id)["messages"][0]["role"] == "assistant", what="a2"
            )
            second = sim.conversation_json(short_id)["messages"][0]["id"]
            sim.list_twice(short_id, second, answers=20)
            await until(lambda: reply_ids(out) == [second], what="the reply")
            polls = gets(sim, short_id)
            await until(lambda: gets(sim, short_id) >= polls + 5, what="more polls")
            assert counter(app, "qawatch_events_total", type="chat.reply.completed") == 1
    assert reply != second
    assert reply_ids(out) == [second]
    assert len(logged(logs, "reply finished")) == 1


async def test_a_note_of_another_role_newest_is_no_window_overflow(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. a finished turn, then a "system" note is newest 2. the daemon polls with
    api.message_limit 1 and backfill none 3. the note is a landmark like any message: no
    re-read with limit 100 and no history reported, poll after poll."""
    short_id = sim.create_chat("q", short_id="chat_note", reply_s=0.0)
    sim.add_message(short_id, "system", "a note")
    settings = make_settings(
        sim, tmp_path, [short_id], poll=FAST, api={"message_limit": 1}, watch={"backfill": "none"}
    )
    async with running(settings) as app:
        await until(lambda: gets(sim, short_id) >= 8, what="polls")
        assert counter(app, "qawatch_window_rereads_total") == 0
    assert reply_ids(out) == []
