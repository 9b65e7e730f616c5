"""End-to-end tests of the daemon in-process: a real simulator upstream, a real SQLite state
file, real file sinks (and a MemorySink where a test needs to see inside), and
``App(...).run(stop)`` as a task stopped by setting its event.

Timing: polls every 0.05 s, replies of 0.1-0.6 s, and every wait is a bounded poll
(:func:`until`), so the file runs in seconds and a hang fails instead of blocking.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from support import TOKEN, logged, make_settings, running, until

import daemon.app
import daemon.scheduler
import daemon.sinks.base
from daemon.app import App
from daemon.simulator import CANCELLED_TEXT, FAILED_TEXT, Fault, RequestRecord, Simulator
from daemon.sinks.memory import MemorySink
from daemon.store import SqliteStore, WatchRow

EVENT_ID_RE = re.compile(r"evt_[0-9a-f]+")
RFC3339_MS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
DASHBOARD = "https://app.qa.tech/chat/"

# ---------------------------------------------------------------------------- helpers


def read_events(path: Path) -> list[dict[str, Any]]:
    """The complete NDJSON lines of ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines]


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def gets(sim: Simulator, short_id: str | None = None) -> list[RequestRecord]:
    """The GETs the simulator answered, of one conversation or of all."""
    records = sim.requests_for(short_id) if short_id else list(sim.requests)
    return [r for r in records if r.method == "GET"]


def types(events: Sequence[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def ended(events: Sequence[dict[str, Any]], short_id: str) -> list[str]:
    """The reasons of the ``chat.watch.ended`` events of ``short_id``."""
    return [
        e["data"]["reason"]
        for e in events
        if e["type"] == "chat.watch.ended" and e["data"]["conversation"]["shortId"] == short_id
    ]


def replies_of(events: Sequence[dict[str, Any]], short_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["type"].startswith("chat.reply.") and e["data"]["conversation"]["shortId"] == short_id
    ]


def newest_message(sim: Simulator, short_id: str) -> dict[str, Any]:
    message: dict[str, Any] = sim.conversation_json(short_id)["messages"][0]
    return message


def finished(sim: Simulator, short_id: str) -> bool:
    message = newest_message(sim, short_id)
    return message["role"] == "assistant" and message["status"] in {"COMPLETED", "FAILED", "CANCELLED"}


def watch_row(state: Path, short_id: str) -> WatchRow | None:
    store = SqliteStore(state)
    store.open()
    try:
        return store.get_watch(short_id)
    finally:
        store.close()


def delivery_counts(state: Path) -> dict[tuple[str, str], int]:
    store = SqliteStore(state)
    store.open()
    try:
        return store.delivery_counts()
    finally:
        store.close()


def max_in_window(times: Sequence[float], width: float) -> int:
    """The most ``times`` that fall in any half-open window ``[t, t + width)``."""
    ordered = sorted(times)
    best = 0
    for i, start in enumerate(ordered):
        best = max(best, sum(1 for t in ordered[i:] if t < start + width))
    return best


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The default file sink's path."""
    return tmp_path / "replies.ndjson"


@pytest.fixture
def logs() -> Iterator[list[Any]]:
    with structlog.testing.capture_logs() as entries:
        yield entries


# ---------------------------------------------------------------------------- 1. events


async def test_streamed_reply_is_reported_once_with_final_text(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. a reply streams INITIATED -> PARTIAL -> COMPLETED over 0.6 s while the daemon polls
    2. exactly one JSON line lands in the file sink, with the final text
    3. further polls of the finished conversation add nothing
    4. the line has the event schema; its id is ``evt_`` + hex without a dot; the file is 0600."""
    answer = "Yes: the signup form rejects addresses without an @ and says so inline."
    started = time.monotonic()
    short_id = sim.create_chat(
        "Does signup validate email?", short_id="chat_stream", reply=answer, reply_s=0.6
    )
    async with running(make_settings(sim, tmp_path, [short_id])):
        await until(lambda: read_events(out), what="the reply event")
        done_at = time.monotonic()
        polls_when_done = len(gets(sim, short_id))
        await until(lambda: len(gets(sim, short_id)) >= polls_when_done + 5, what="more polls")
        events = read_events(out)

    # the daemon saw the reply unfinished several times (INITIATED at 0.06 s, PARTIAL from 0.18 s)
    streaming_polls = [r for r in gets(sim, short_id) if started + 0.2 <= r.at < started + 0.55]
    assert len(streaming_polls) >= 3
    assert done_at - started >= 0.6
    assert len(events) == 1
    event = events[0]
    message = newest_message(sim, short_id)
    assert set(event) == {"type", "id", "timestamp", "data"}
    assert event["type"] == "chat.reply.completed"
    assert EVENT_ID_RE.fullmatch(event["id"])
    assert "." not in event["id"]
    assert RFC3339_MS_RE.fullmatch(event["timestamp"])
    assert event["data"]["conversation"] == {
        "shortId": short_id,
        "url": DASHBOARD + short_id,
        "title": "Does signup validate email?",
    }
    assert event["data"]["message"] == {
        "id": message["id"],
        "role": "assistant",
        "status": "COMPLETED",
        "createdAt": message["createdAt"],
        "text": answer,
    }
    assert file_mode(out) == 0o600


async def test_failed_and_cancelled_replies_have_their_event_types(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. one reply ends FAILED, another CANCELLED 2. each is reported once, with the type
    chat.reply.failed / chat.reply.cancelled and its final status and text."""
    failed = sim.create_chat("Run the checkout suite", short_id="chat_fail", outcome="FAILED", reply_s=0.2)
    cancelled = sim.create_chat(
        "Run the login suite", short_id="chat_cancel", outcome="CANCELLED", reply_s=0.3
    )
    async with running(make_settings(sim, tmp_path, [failed, cancelled])):
        await until(lambda: len(read_events(out)) >= 2, what="two events")
        polls = len(gets(sim, cancelled))
        await until(lambda: len(gets(sim, cancelled)) >= polls + 5, what="more polls")
    events = read_events(out)
    assert len(events) == 2
    by_chat = {e["data"]["conversation"]["shortId"]: e for e in events}
    assert by_chat[failed]["type"] == "chat.reply.failed"
    assert by_chat[failed]["data"]["message"]["status"] == "FAILED"
    assert by_chat[failed]["data"]["message"]["text"] == FAILED_TEXT
    assert by_chat[cancelled]["type"] == "chat.reply.cancelled"
    assert by_chat[cancelled]["data"]["message"]["status"] == "CANCELLED"
    assert by_chat[cancelled]["data"]["message"]["text"] == CANCELLED_TEXT


# ---------------------------------------------------------------------------- 2. pitfalls


async def test_no_event_while_the_user_message_is_newest_or_the_reply_unfinished(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. a conversation whose newest message is the user's is polled: no event
    2. an INITIATED assistant message appears: still no event
    3. it says COMPLETED but isStreaming is still true: still no event
    4. streaming stops: one event with the final text."""
    short_id = sim.create_chat(None, short_id="chat_wait")
    sim.add_message(short_id, "user", "Is checkout OK after the deploy?")
    async with running(make_settings(sim, tmp_path, [short_id])):
        await until(lambda: len(gets(sim, short_id)) >= 5, what="polls of the waiting chat")
        assert read_events(out) == []
        reply_id = sim.add_message(short_id, "assistant", "", status="INITIATED")
        seen = len(gets(sim, short_id))
        await until(lambda: len(gets(sim, short_id)) >= seen + 5, what="polls of the initiated reply")
        assert read_events(out) == []
        sim.set_message(short_id, reply_id, status="COMPLETED", text="Checkout", is_streaming=True)
        seen = len(gets(sim, short_id))
        await until(lambda: len(gets(sim, short_id)) >= seen + 5, what="polls of the streaming reply")
        assert read_events(out) == []
        sim.set_message(short_id, reply_id, text="Checkout works.", is_streaming=False)
        await until(lambda: read_events(out), what="the reply event")
    events = read_events(out)
    assert len(events) == 1
    assert events[0]["data"]["message"]["id"] == reply_id
    assert events[0]["data"]["message"]["text"] == "Checkout works."


async def test_follow_up_does_not_rereport_the_previous_reply(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. reply 1 finishes and is reported 2. a follow-up is sent; while it is pending the
    newest assistant message is still reply 1 3. reply 2 finishes 4. the file holds reply 1 and
    reply 2, once each, in that order."""
    short_id = sim.create_chat("first question", short_id="chat_turns", reply="first answer", reply_s=0.1)
    async with running(make_settings(sim, tmp_path, [short_id])):
        await until(lambda: len(read_events(out)) == 1, what="reply 1")
        sim.send_message(short_id, "second question", reply="second answer", reply_s=0.5)
        await until(lambda: len(read_events(out)) >= 2, what="reply 2")
        polls = len(gets(sim, short_id))
        await until(lambda: len(gets(sim, short_id)) >= polls + 5, what="more polls")
    events = read_events(out)
    assert [e["data"]["message"]["text"] for e in events] == ["first answer", "second answer"]
    assert events[0]["id"] != events[1]["id"]
    assert events[0]["data"]["message"]["id"] != events[1]["data"]["message"]["id"]


async def test_backfill_latest_reports_a_reply_finished_before_the_watch(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. chat_done's reply failed before the daemon starts; chat_turn's first reply finished
    and a follow-up is pending 2. start with backfill latest 3. chat_done's reply is reported at
    once, as chat.reply.failed 4. chat_turn's old reply is history (never reported); its new reply is."""
    done = sim.create_chat("q", short_id="chat_done", outcome="FAILED", reply_s=0.0)
    turn = sim.create_chat("q1", short_id="chat_turn", reply="old answer", reply_s=0.0)
    sim.send_message(turn, "q2", reply="new answer", reply_s=0.6)
    assert finished(sim, done)
    async with running(make_settings(sim, tmp_path, [done, turn])):
        await until(lambda: replies_of(read_events(out), done), what="the backfilled reply")
        assert replies_of(read_events(out), turn) == []
        await until(lambda: replies_of(read_events(out), turn), what="the follow-up's reply")
    events = read_events(out)
    assert [e["type"] for e in replies_of(events, done)] == ["chat.reply.failed"]
    assert [e["data"]["message"]["text"] for e in replies_of(events, turn)] == ["new answer"]


async def test_backfill_none_reports_only_new_replies(sim: Simulator, tmp_path: Path, out: Path) -> None:
    """1. a reply finished before the daemon starts 2. start with backfill none 3. several polls:
    nothing reported 4. a follow-up's reply finishes: it alone is reported."""
    short_id = sim.create_chat("q", short_id="chat_old", reply="old answer", reply_s=0.0)
    settings = make_settings(sim, tmp_path, [short_id], watch={"backfill": "none"})
    async with running(settings):
        await until(lambda: len(gets(sim, short_id)) >= 5, what="polls")
        assert read_events(out) == []
        sim.send_message(short_id, "q2", reply="new answer", reply_s=0.2)
        await until(lambda: read_events(out), what="the new reply")
    assert [e["data"]["message"]["text"] for e in read_events(out)] == ["new answer"]


async def test_503s_back_off_without_hammering_and_the_reply_still_arrives(
    sim: Simulator, tmp_path: Path, out: Path, logs: list[Any]
) -> None:
    """1. the next 10 GETs of a chat answer 503 (polling would be every 0.02 s)
    2. the daemon backs off (full jitter, capped at 0.3 s): 10 errors take well over 10 polls' time
    3. it logs one warning for the incident, keeps running, and reports the reply afterwards."""
    short_id = sim.create_chat("q", short_id="chat_503", reply="made it", reply_s=0.2)
    sim.inject(*[Fault("status", status=503)] * 10, short_id=short_id)
    settings = make_settings(
        sim, tmp_path, [short_id], poll={"active_interval_s": 0.02, "error_backoff_max_s": 0.3}
    )
    async with running(settings):
        await until(lambda: read_events(out), within=6, what="the reply after the 503s")
    errors = [r.at for r in gets(sim, short_id) if r.status == 503]
    assert len(errors) == 10
    # naive polling at 0.02 s would fit 10 requests in 0.2 s; 9 backoffs U(0, 0.3) sum to
    # less than 0.3 s with probability 1/9! (about 3e-6)
    assert errors[-1] - errors[0] >= 0.3
    assert len(logged(logs, "transient API error; backing off", conversation=short_id)) == 1
    assert len(logged(logs, "conversation reachable again", conversation=short_id)) == 1
    assert read_events(out)[0]["data"]["message"]["text"] == "made it"


async def test_429_without_retry_after_pauses_with_backoff(sim: Simulator, tmp_path: Path, out: Path) -> None:
    """1. the next 3 GETs answer 429 without Retry-After 2. each pauses all polling for the
    capped backoff (0.3 s here) before the next request 3. the reply is still reported."""
    short_id = sim.create_chat("q", short_id="chat_429", reply="made it", reply_s=0.1)
    sim.inject(*[Fault("status", status=429)] * 3, short_id=short_id)
    settings = make_settings(sim, tmp_path, [short_id], poll={"error_backoff_max_s": 0.3})
    async with running(settings):
        await until(lambda: read_events(out), what="the reply after the 429s")
    records = gets(sim, short_id)
    assert [r.status for r in records[:4]] == [429, 429, 429, 200]
    gaps = [b.at - a.at for a, b in itertools.pairwise(records[:4])]
    assert all(gap >= 0.28 for gap in gaps), gaps


async def test_unknown_status_is_logged_once_not_finished_and_polled_at_a_bounded_rate(
    sim: Simulator, tmp_path: Path, out: Path, logs: list[Any]
) -> None:
    """1. the newest assistant message has status THINKING (not in the API's list)
    2. for 1 s: no event, the watch keeps polling, at no more than its active interval
    3. one warning names the conversation and the status 4. it turns COMPLETED: reported once."""
    short_id = sim.create_chat(None, short_id="chat_odd")
    sim.add_message(short_id, "user", "q")
    reply_id = sim.add_message(short_id, "assistant", "hmm", status="THINKING")
    async with running(make_settings(sim, tmp_path, [short_id])) as app:
        await until(lambda: len(gets(sim, short_id)) >= 2, what="first polls")
        before = len(gets(sim, short_id))
        await asyncio.sleep(1.0)  # a fixed measuring window
        during = len(gets(sim, short_id)) - before
        assert read_events(out) == []
        sim.set_message(short_id, reply_id, status="COMPLETED", text="done")
        await until(lambda: read_events(out), what="the reply once finished")
        assert app.poller is not None
        assert app.poller.metrics.registry.get_sample_value("qawatch_unknown_statuses_total") == 1
    # active interval 0.05 s +-10 %: about 20 polls a second; a tight loop would do hundreds
    assert 8 <= during <= 25
    warnings = logged(logs, "unknown message status; treated as not finished")
    assert [(w["conversation"], w["status"], w["log_level"]) for w in warnings] == [
        (short_id, "THINKING", "warning")
    ]
    events = read_events(out)
    assert len(events) == 1
    assert events[0]["data"]["message"]["text"] == "done"


# ---------------------------------------------------------------------------- 3. restart


async def test_restart_neither_repeats_nor_skips(sim: Simulator, tmp_path: Path, out: Path) -> None:
    """1. run: reply 1 is reported; stop 2. while stopped, reply 2 finishes and a follow-up is
    sent (so reply 2 is no longer the newest message) 3. restart on the same state file
    4. reply 2 is reported once, reply 1 not again, and reply 3 follows."""
    short_id = sim.create_chat("q1", short_id="chat_restart", reply="answer 1", reply_s=0.1)
    settings = make_settings(sim, tmp_path, [short_id])
    async with running(settings):
        await until(lambda: len(read_events(out)) == 1, what="reply 1")

    sim.send_message(short_id, "q2", reply="answer 2", reply_s=0.1)
    await until(lambda: finished(sim, short_id), what="reply 2 to finish while stopped")
    sim.send_message(short_id, "q3", reply="answer 3", reply_s=0.4)
    assert newest_message(sim, short_id)["role"] == "user"
    polls_before = len(gets(sim, short_id))

    async with running(settings):
        await until(lambda: len(read_events(out)) >= 3, what="replies 2 and 3")
        polls = len(gets(sim, short_id))
        await until(lambda: len(gets(sim, short_id)) >= polls + 5, what="more polls")
    assert len(gets(sim, short_id)) > polls_before
    texts = [e["data"]["message"]["text"] for e in read_events(out)]
    assert texts == ["answer 1", "answer 2", "answer 3"]


# ---------------------------------------------------------------------------- 4. 429 Retry-After


@pytest.mark.parametrize("rate_limit_per_s", [200, 4], ids=["rate-free", "rate-bound"])
async def test_429_with_retry_after_pauses_every_conversation(
    sim: Simulator, tmp_path: Path, rate_limit_per_s: float
) -> None:
    """1. five pending chats are polled every 0.05 s, as fast as the rate limit lets them
    (rate-bound: the scheduler is nearly always waiting for a token when the 429 comes)
    2. one GET answers 429 with Retry-After: 1 3. no chat is polled for ~1 s after it
    (requests already on their way may land in the first 0.1 s) 4. polling resumes for every
    chat afterwards."""
    ids = [sim.create_chat("q", short_id=f"chat_p{i}", reply_s=60) for i in range(5)]
    settings = make_settings(sim, tmp_path, ids, api={"rate_limit_per_s": rate_limit_per_s})
    async with running(settings):
        await until(lambda: all(gets(sim, i) for i in ids), what="every chat polled")
        sim.inject(Fault("status", status=429, retry_after="1"))
        await until(lambda: any(r.status == 429 for r in gets(sim)), what="the 429")
        hit = next(r.at for r in gets(sim) if r.status == 429)
        await until(
            lambda: all(any(r.at > hit + 1.0 for r in gets(sim, i)) for i in ids),
            within=3,
            what="polling to resume for every chat",
        )
    during = [(r.path, round(r.at - hit, 3)) for r in gets(sim) if hit + 0.1 < r.at < hit + 0.95]
    assert during == []
    assert len([r for r in gets(sim) if hit < r.at <= hit + 0.1]) <= 5


# ---------------------------------------------------------------------------- 5. 401


async def test_refused_token_pauses_all_polling_with_growing_backoff_then_resumes(
    sim: Simulator, tmp_path: Path, out: Path, logs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. the API refuses the daemon's token (401) for three chats whose replies are finished
    2. over 1.5 s only a few probes are made, further and further apart (auth pause base
    0.3 s here), one error is logged, and ``token_refused`` is true
    3. the API accepts the token again: polling resumes and the three replies are delivered."""
    monkeypatch.setattr(daemon.scheduler, "AUTH_PAUSE_BASE_S", 0.3)
    ids = [sim.create_chat("q", short_id=f"chat_auth{i}", reply_s=0.0) for i in range(3)]
    sim.config.token = "rotated-token"  # the daemon still sends sim-token
    async with running(make_settings(sim, tmp_path, ids)) as app:
        await asyncio.sleep(1.5)  # a fixed measuring window
        refused = [r.at for r in gets(sim)]
        assert app.poller is not None
        assert app.poller.token_refused
        assert all(r.status == 401 for r in gets(sim))
        sim.config.token = TOKEN
        await until(lambda: len(read_events(out)) == 3, within=4, what="the replies after the fix")
        assert not app.poller.token_refused
    assert 2 <= len(refused) <= 6, refused
    probes = [t for i, t in enumerate(refused) if i == 0 or t - refused[i - 1] > 0.1]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert len(gaps) >= 2
    assert gaps[1] >= 1.5 * gaps[0], gaps
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["the API refused the token; all polling paused"]
    assert "sim-token" not in repr(logs)
    assert sorted(e["data"]["conversation"]["shortId"] for e in read_events(out)) == ids


# ---------------------------------------------------------------------------- 6-10. watch ends


async def test_404_ends_the_watch_for_good(sim: Simulator, tmp_path: Path, out: Path) -> None:
    """1. chat_gone does not exist upstream 2. the daemon ends its watch: chat.watch.ended with
    reason not_found, store row ended 3. restart with the id still configured: it stays ended,
    is not polled and no second event is emitted, while chat_live is still served."""
    live = sim.create_chat("q", short_id="chat_live", reply="one", reply_s=0.1)
    gone = "chat_gone"
    state = tmp_path / "state.db"
    settings = make_settings(sim, tmp_path, [live, gone])
    async with running(settings):
        await until(lambda: ended(read_events(out), gone), what="the ended event")
        await until(lambda: replies_of(read_events(out), live), what="chat_live's reply")
    assert ended(read_events(out), gone) == ["not_found"]
    row = watch_row(state, gone)
    assert row is not None
    assert (row.state, row.reason) == ("ended", "not_found")
    polls_of_gone = len(gets(sim, gone))

    sim.send_message(live, "q2", reply="two", reply_s=0.2)
    async with running(settings):
        await until(lambda: len(replies_of(read_events(out), live)) == 2, what="chat_live's second reply")
        polls = len(gets(sim, live))
        await until(lambda: len(gets(sim, live)) >= polls + 3, what="more polls of chat_live")
    assert len(gets(sim, gone)) == polls_of_gone
    assert ended(read_events(out), gone) == ["not_found"]
    row = watch_row(state, gone)
    assert row is not None
    assert (row.state, row.reason) == ("ended", "not_found")


async def test_400_ends_the_watch_as_rejected(sim: Simulator, tmp_path: Path, out: Path) -> None:
    """1. the next GET of a chat answers 400 2. its watch ends with reason rejected
    3. it is not polled again."""
    short_id = sim.create_chat("q", short_id="chat_bad", reply_s=0.1)
    sim.inject(Fault("status", status=400, body='{"message": "bad id"}'), short_id=short_id)
    async with running(make_settings(sim, tmp_path, [short_id])):
        await until(lambda: ended(read_events(out), short_id), what="the ended event")
        await asyncio.sleep(0.3)  # several poll intervals: no further GET may come
    assert ended(read_events(out), short_id) == ["rejected"]
    assert [r.status for r in gets(sim, short_id)] == [400]
    row = watch_row(tmp_path / "state.db", short_id)
    assert row is not None
    assert (row.state, row.reason) == ("ended", "rejected")


async def test_malformed_and_wrong_shape_bodies_are_survived(
    sim: Simulator, tmp_path: Path, out: Path, logs: list[Any]
) -> None:
    """1. chat_a's next 2 GETs answer 200 with broken JSON, chat_b's next one with JSON of the
    wrong shape 2. one warning per conversation names it and quotes the body
    3. the daemon keeps running and both replies arrive."""
    chat_a = sim.create_chat("q", short_id="chat_a", reply="a", reply_s=0.2)
    chat_b = sim.create_chat("q", short_id="chat_b", reply="b", reply_s=0.2)
    sim.inject(Fault("malformed"), Fault("malformed"), short_id=chat_a)
    sim.inject(Fault("wrong_shape", body='{"data": [1, 2]}'), short_id=chat_b)
    async with running(make_settings(sim, tmp_path, [chat_a, chat_b])):
        await until(lambda: len(read_events(out)) == 2, what="both replies")
    warned = "unexpected response body; backing off"
    warn_a = logged(logs, warned, conversation=chat_a)
    warn_b = logged(logs, warned, conversation=chat_b)
    assert len(warn_a) == 1
    assert len(warn_b) == 1
    assert '"shortId": "chat_a"' in warn_a[0]["excerpt"]
    assert warn_b[0]["excerpt"] == '{"data": [1, 2]}'
    assert [r.status for r in gets(sim, chat_a)][:3] == [200, 200, 200]
    assert sorted(e["data"]["message"]["text"] for e in read_events(out)) == ["a", "b"]


async def test_id_removed_from_config_between_runs_ends_as_removed(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. run with chat_keep and chat_drop; both replies reported; stop 2. restart with only
    chat_keep configured 3. chat.watch.ended (removed) for chat_drop 4. chat_drop is not polled
    and its new reply not reported, while chat_keep's is."""
    keep = sim.create_chat("q", short_id="chat_keep", reply="k1", reply_s=0.1)
    drop = sim.create_chat("q", short_id="chat_drop", reply="d1", reply_s=0.1)
    async with running(make_settings(sim, tmp_path, [keep, drop])):
        await until(lambda: len(read_events(out)) == 2, what="both replies")
    polls_of_drop = len(gets(sim, drop))

    sim.send_message(keep, "q2", reply="k2", reply_s=0.2)
    sim.send_message(drop, "q2", reply="d2", reply_s=0.2)
    async with running(make_settings(sim, tmp_path, [keep])):
        await until(lambda: ended(read_events(out), drop), what="the removed event")
        await until(lambda: len(replies_of(read_events(out), keep)) == 2, what="chat_keep's new reply")
        await until(lambda: finished(sim, drop), what="chat_drop's new reply to finish")
        polls = len(gets(sim, keep))
        await until(lambda: len(gets(sim, keep)) >= polls + 3, what="more polls of chat_keep")
    assert ended(read_events(out), drop) == ["removed"]
    assert len(gets(sim, drop)) == polls_of_drop
    assert [e["data"]["message"]["text"] for e in replies_of(read_events(out), drop)] == ["d1"]
    row = watch_row(tmp_path / "state.db", drop)
    assert row is not None
    assert (row.state, row.reason) == ("ended", "removed")


async def test_settled_conversation_expires(sim: Simulator, tmp_path: Path, out: Path) -> None:
    """1. a finished conversation is watched with expire_after_s 0.5 2. its reply is reported
    3. it does not change for 0.5 s: chat.watch.ended with reason expired, after the reply
    4. polling stops."""
    short_id = sim.create_chat("q", short_id="chat_quiet", reply="done", reply_s=0.0)
    settings = make_settings(sim, tmp_path, [short_id], watch={"expire_after_s": 0.5})
    async with running(settings):
        await until(lambda: ended(read_events(out), short_id), what="the expired event")
        await asyncio.sleep(0.3)  # longer than the idle interval: no further GET may come
    events = read_events(out)
    assert types(events) == ["chat.reply.completed", "chat.watch.ended"]
    assert events[1]["data"] == {"conversation": {"shortId": short_id}, "reason": "expired"}
    assert EVENT_ID_RE.fullmatch(events[1]["id"])
    records = gets(sim, short_id)
    assert records[-1].at - records[0].at >= 0.45
    row = watch_row(tmp_path / "state.db", short_id)
    assert row is not None
    assert (row.state, row.reason) == ("ended", "expired")


# ---------------------------------------------------------------------------- 11-12. sinks


async def test_sink_event_filter(sim: Simulator, tmp_path: Path) -> None:
    """1. two file sinks: "failures" with events [chat.reply.failed], "all" without a filter
    2. one reply each COMPLETED, FAILED, CANCELLED and one 404 3. "all" receives all four;
    "failures" only the failed reply, and no delivery is even recorded for it otherwise."""
    failures, everything = tmp_path / "failures.ndjson", tmp_path / "all.ndjson"
    sinks: list[dict[str, Any]] = [
        {"type": "file", "name": "failures", "path": failures, "events": ["chat.reply.failed"]},
        {"type": "file", "name": "all", "path": everything},
    ]
    ids = [
        sim.create_chat("q", short_id="chat_ok", outcome="COMPLETED", reply_s=0.1),
        sim.create_chat("q", short_id="chat_ko", outcome="FAILED", reply_s=0.1),
        sim.create_chat("q", short_id="chat_stop", outcome="CANCELLED", reply_s=0.1),
        "chat_missing",
    ]
    async with running(make_settings(sim, tmp_path, ids, sinks=sinks)):
        await until(lambda: len(read_events(everything)) == 4, what="four events")
        await until(lambda: read_events(failures), what="the failure")
    assert sorted(types(read_events(everything))) == [
        "chat.reply.cancelled",
        "chat.reply.completed",
        "chat.reply.failed",
        "chat.watch.ended",
    ]
    assert types(read_events(failures)) == ["chat.reply.failed"]
    assert read_events(failures)[0] == next(
        e for e in read_events(everything) if e["type"] == "chat.reply.failed"
    )
    assert delivery_counts(tmp_path / "state.db") == {("all", "delivered"): 4, ("failures", "delivered"): 1}


async def test_failing_sink_does_not_block_others_and_gets_its_events_later(
    sim: Simulator, tmp_path: Path, out: Path, logs: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. a memory sink fails its next 2 attempts; a file sink works (retry base 0.2 s here)
    2. two replies finish: the file has both while the memory sink still has none
    3. the memory sink later gets both, once each, with the same event ids, in order
    4. one error for the incident and one recovery line are logged."""
    monkeypatch.setattr(daemon.sinks.base, "RETRY_BASE_S", 0.2)
    flaky = MemorySink("flaky")
    flaky.fail_next = 2
    first = sim.create_chat("q", short_id="chat_one", reply="one", reply_s=0.05)
    second = sim.create_chat("q", short_id="chat_two", reply="two", reply_s=0.15)
    async with running(make_settings(sim, tmp_path, [first, second]), extra_sinks=[flaky]):
        await until(lambda: len(read_events(out)) == 2, what="both replies in the file")
        assert flaky.received == []
        assert flaky.fail_next < 2  # it was tried
        await until(lambda: len(flaky.received) == 2, within=4, what="the retried deliveries")
    assert [e["id"] for e in flaky.received] == [e["id"] for e in read_events(out)]
    assert flaky.received == read_events(out)
    assert len(logged(logs, "sink failing; will retry", sink="flaky")) == 1
    assert len(logged(logs, "sink recovered", sink="flaky")) == 1


async def test_undelivered_event_is_resent_after_a_restart(
    sim: Simulator, tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. a sink named "hook" refuses every attempt while a reply is reported (the file sink
    takes it) 2. the daemon stops with that delivery pending 3. it restarts with a working
    "hook" 4. the hook receives the event once, with the file line's id; the file has no
    duplicate."""
    monkeypatch.setattr(daemon.sinks.base, "RETRY_BASE_S", 0.2)
    broken = MemorySink("hook")
    broken.fail_next = 1000
    short_id = sim.create_chat("q", short_id="chat_durable", reply="kept", reply_s=0.1)
    settings = make_settings(sim, tmp_path, [short_id])
    async with running(settings, extra_sinks=[broken]):
        await until(lambda: read_events(out) and broken.fail_next < 1000, what="a refused attempt")
    assert broken.received == []
    assert delivery_counts(tmp_path / "state.db")[("hook", "pending")] == 1

    healthy = MemorySink("hook")
    async with running(settings, extra_sinks=[healthy]):
        await until(lambda: healthy.received, what="the re-sent event")
        await asyncio.sleep(0.2)  # room for a wrong second delivery
    assert [e["id"] for e in healthy.received] == [e["id"] for e in read_events(out)]
    assert len(read_events(out)) == 1
    assert healthy.received[0]["data"]["message"]["text"] == "kept"


# ---------------------------------------------------------------------------- 13. pacing


async def test_rate_limit_holds_across_thirty_chats(sim: Simulator, tmp_path: Path) -> None:
    """1. 30 pending chats that would each be polled every 0.05 s (600 requests/s)
    2. rate_limit_per_s 20 (burst 20) 3. over 2.5 s, no 1-second window holds more than
    burst + rate = 40 GETs, and the limit is actually reached."""
    ids = [sim.create_chat("q", short_id=f"chat_r{i:02d}", reply_s=60) for i in range(30)]
    async with running(make_settings(sim, tmp_path, ids, api={"rate_limit_per_s": 20})):
        start = time.monotonic()
        await asyncio.sleep(2.5)  # a fixed measuring window
    times = [r.at for r in gets(sim) if r.at >= start - 0.5]
    assert max_in_window(times, 1.0) <= 40
    assert 40 <= len(times) <= 20 + 20 * 3.0 + 2


async def test_concurrency_limit_holds(sim: Simulator, tmp_path: Path) -> None:
    """1. ten pending chats, max_concurrency 3 2. every GET stalls 0.15 s upstream
    3. no window shorter than the stall holds more than 3 request arrivals (more would mean
    more than 3 in flight at once), and 3 at once does happen."""
    ids = [sim.create_chat("q", short_id=f"chat_c{i}", reply_s=60) for i in range(10)]
    sim.inject(*[Fault("stall", stall_s=0.15)] * 200)
    async with running(make_settings(sim, tmp_path, ids, api={"max_concurrency": 3})):
        await until(lambda: len(gets(sim)) >= 15, what="15 stalled GETs")
    assert max_in_window([r.at for r in gets(sim)], 0.14) == 3


# ---------------------------------------------------------------------------- 14. reload


async def test_reload_applies_the_rewritten_watch_file(sim: Simulator, tmp_path: Path, out: Path) -> None:
    """1. watch.file lists chat_a and chat_b; both replies reported 2. the file is rewritten to
    chat_a and chat_c, then ``request_reload()`` (SIGHUP) 3. chat_c's finished reply is
    reported, chat_b ends as removed 4. chat_b is not polled after that."""
    chat_a = sim.create_chat("q", short_id="chat_a", reply="a", reply_s=0.1)
    chat_b = sim.create_chat("q", short_id="chat_b", reply="b", reply_s=0.1)
    chat_c = sim.create_chat("q", short_id="chat_c", reply="c", reply_s=0.0)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(f"{chat_a}\n{chat_b}  # the B team\n", encoding="utf-8")
    settings = make_settings(sim, tmp_path, watch={"file": ids_file})
    async with running(settings) as app:
        await until(lambda: len(read_events(out)) == 2, what="a's and b's replies")
        assert gets(sim, chat_c) == []
        ids_file.write_text(f"# rewritten\n{chat_a}\n\n{chat_c}\n", encoding="utf-8")
        app.request_reload()
        await until(lambda: ended(read_events(out), chat_b), what="b's removed event")
        seen_end = time.monotonic()
        await until(lambda: replies_of(read_events(out), chat_c), what="c's reply")
        sim.send_message(chat_b, "q2", reply="b2", reply_s=0.1)
        sim.send_message(chat_a, "q2", reply="a2", reply_s=0.1)
        await until(lambda: len(replies_of(read_events(out), chat_a)) == 2, what="a's second reply")
        polls = len(gets(sim, chat_a))
        await until(lambda: len(gets(sim, chat_a)) >= polls + 3, what="more polls of a")
    assert ended(read_events(out), chat_b) == ["removed"]
    assert [r for r in gets(sim, chat_b) if r.at > seen_end] == []
    assert [e["data"]["message"]["text"] for e in replies_of(read_events(out), chat_b)] == ["b"]
    assert [e["data"]["message"]["text"] for e in replies_of(read_events(out), chat_c)] == ["c"]


async def test_watch_file_change_is_picked_up_without_sighup(
    sim: Simulator, tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. watch.file lists chat_first (file checked every 0.1 s here instead of 2 s)
    2. chat_second is appended to the file, no reload is requested 3. its reply is reported."""
    monkeypatch.setattr(daemon.app, "WATCH_FILE_CHECK_S", 0.1)
    first = sim.create_chat("q", short_id="chat_first", reply="1", reply_s=0.0)
    second = sim.create_chat("q", short_id="chat_second", reply="2", reply_s=0.0)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(f"{first}\n", encoding="utf-8")
    async with running(make_settings(sim, tmp_path, watch={"file": ids_file})):
        await until(lambda: read_events(out), what="the first reply")
        ids_file.write_text(f"{first}\n{second}\n", encoding="utf-8")
        os.utime(ids_file, (time.time() + 5, time.time() + 5))  # a visible mtime change
        await until(lambda: replies_of(read_events(out), second), within=3, what="the second reply")
    assert [e["data"]["message"]["text"] for e in read_events(out)] == ["1", "2"]


async def test_reload_reopens_the_file_sink_after_logrotate(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. reply 1 is written to replies.ndjson 2. logrotate renames it to replies.ndjson.1 and
    sends SIGHUP (``request_reload()``) 3. reply 2 goes to a new replies.ndjson (mode 0600);
    the rotated file keeps only reply 1."""
    probe = MemorySink("probe")  # counts reopens: tells when the reload has run
    short_id = sim.create_chat("q1", short_id="chat_rot", reply="one", reply_s=0.1)
    rotated = tmp_path / "replies.ndjson.1"
    async with running(make_settings(sim, tmp_path, [short_id]), extra_sinks=[probe]) as app:
        await until(lambda: len(read_events(out)) == 1, what="reply 1")
        os.rename(out, rotated)  # what logrotate does
        app.request_reload()
        await until(lambda: probe.reopened == 1, what="the reload")
        sim.send_message(short_id, "q2", reply="two", reply_s=0.1)
        await until(lambda: read_events(out), what="reply 2 in the new file")
    assert [e["data"]["message"]["text"] for e in read_events(rotated)] == ["one"]
    assert [e["data"]["message"]["text"] for e in read_events(out)] == ["two"]
    assert file_mode(out) == 0o600


# ---------------------------------------------------------------------------- 15. shutdown


async def test_stop_with_polls_in_flight_finishes_within_the_grace_period(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. two chats' GETs stall upstream for 10 s 2. the daemon is stopped while both are in
    flight 3. ``App.run`` returns within the 1 s grace period (plus a little), without an
    internal failure, and the store is closed 4. a restart on the same state file works and
    reports the replies."""
    ids = [sim.create_chat("q", short_id=f"chat_s{i}", reply_s=0.1) for i in range(2)]
    sim.inject(Fault("stall", stall_s=10), Fault("stall", stall_s=10))
    settings = make_settings(sim, tmp_path, ids, grace_s=1.0)
    app = App(settings, TOKEN)
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    try:
        await until(
            lambda: app.poller is not None and len(app.poller.in_flight) == 2, what="two polls in flight"
        )
        stopped_at = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 5)
        elapsed = time.monotonic() - stopped_at
    finally:
        stop.set()
        if not task.done():
            task.cancel()
    assert 0.9 <= elapsed <= 1.5, elapsed
    assert not app.failed
    assert app.poller is not None
    store = app.poller.runner.store
    assert isinstance(store, SqliteStore)
    with pytest.raises(RuntimeError, match="open"):
        store.watches()
    assert read_events(out) == []

    async with running(settings):
        await until(lambda: len(read_events(out)) == 2, what="the replies after the restart")


async def test_readded_watch_backfills_only_the_newest_reply(
    sim: Simulator, tmp_path: Path, out: Path
) -> None:
    """1. run with chat_back: reply 1 reported 2. run without it: it ends as removed
    3. while unwatched, replies 2 and 3 finish 4. run with it configured again: it is a newly
    added watch, so only reply 3 (the newest) is reported, reply 2 is history, and reply 1
    is not repeated."""
    short_id = sim.create_chat("q1", short_id="chat_back", reply="answer 1", reply_s=0.0)
    other = sim.create_chat("q", short_id="chat_other", reply="other", reply_s=0.0)
    async with running(make_settings(sim, tmp_path, [short_id, other])):
        await until(lambda: len(read_events(out)) == 2, what="reply 1")
    async with running(make_settings(sim, tmp_path, [other])):
        await until(lambda: ended(read_events(out), short_id), what="the removed event")
    sim.send_message(short_id, "q2", reply="answer 2", reply_s=0.0)
    sim.send_message(short_id, "q3", reply="answer 3", reply_s=0.0)
    async with running(make_settings(sim, tmp_path, [short_id, other])):
        await until(lambda: len(replies_of(read_events(out), short_id)) >= 2, what="the backfilled reply")
        polls = len(gets(sim, short_id))
        await until(lambda: len(gets(sim, short_id)) >= polls + 3, what="more polls")
    texts = [e["data"]["message"]["text"] for e in replies_of(read_events(out), short_id)]
    assert texts == ["answer 1", "answer 3"]
