"""Hostile and broken answers from the API (issue "Hardening", items 2, 3, 4, 6, 7 and 10):
each against the real simulator over HTTP, the client or the daemon in-process.

2. 429 with ``Retry-After: 0``, a negative value or a past date
3. JSON nested deeper than any parser's recursion limit
4. ``createdAt`` without a zone next to zoned ones
6. answers larger than ``api.max_response_bytes``
7. secrets cut in half by an excerpt
10. an outage of the whole API: one line when it starts, a summary, one when it ends
"""

from __future__ import annotations

import email.utils
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from support import TOKEN, make_settings, running, until

import daemon.outage
from daemon import logs
from daemon.detect import WatchState, detect
from daemon.errors import AuthError, BadResponseError, NotFoundError, RateLimitedError, TransientError
from daemon.events import rfc3339
from daemon.httputil import EXCERPT_CHARS, excerpt, parse_retry_after
from daemon.models import parse_conversation
from daemon.outage import Outage
from daemon.qatech import QATechClient
from daemon.scheduler import RATE_LIMIT_FLOOR_S, rate_limit_pause
from daemon.settings import is_short_id
from daemon.simulator import Fault, Simulator

FAST = {"active_interval_s": 0.05, "idle_interval_s": 0.05, "jitter": 0.0, "error_backoff_max_s": 0.2}
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[QATechClient]:
    async with QATechClient(sim.base_url, TOKEN, timeout_s=5.0, max_response_bytes=64 * 1024) as opened:
        yield opened


def get_times(sim: Simulator, short_id: str) -> list[float]:
    return [r.at for r in sim.requests_for(short_id) if r.method == "GET"]


def warnings(entries: list[Any]) -> list[Any]:
    return [e for e in entries if e["log_level"] in {"warning", "error"}]


# ---------------------------------------------------------------------------- 2. Retry-After


@pytest.mark.parametrize("value", ["0", "-5", "0.0", email.utils.formatdate(time.time() - 3600, usegmt=True)])
def test_retry_after_that_says_nothing_is_no_hint(value: str) -> None:
    """1. Retry-After 0, negative or in the past 2. "now", which is no hint for a 429 3. the
    pause is the backoff, at least the floor."""
    assert parse_retry_after(value, time.time()) == 0.0
    assert rate_limit_pause(parse_retry_after(value, time.time()), 1, 0.2) == RATE_LIMIT_FLOOR_S
    assert rate_limit_pause(parse_retry_after(value, time.time()), 6, 30.0) == 30.0
    assert parse_retry_after("2", time.time()) == 2.0


async def test_429_with_retry_after_zero_pauses_and_warns_once(sim: Simulator, tmp_path: Path) -> None:
    """1. five answers in a row are 429 with Retry-After: 0 2. the daemon pauses at least the
    floor after each (no burst at the full rate) 3. one warning for the incident 4. the reply
    still arrives."""
    short_id = sim.create_chat("q", short_id="chat_ra0", reply_s=0.0)
    sim.inject(*[Fault("status", status=429, retry_after="0")] * 5, short_id=short_id)
    out = tmp_path / "replies.ndjson"
    with structlog.testing.capture_logs() as entries:
        async with running(make_settings(sim, tmp_path, [short_id], poll=FAST)):
            await until(lambda: out.exists() and out.read_text(), within=15.0, what="the reply")
    times = get_times(sim, short_id)
    gaps = [b - a for a, b in itertools.pairwise(times[:6])]
    assert min(gaps) >= RATE_LIMIT_FLOOR_S * 0.95, gaps
    assert [e["event"] for e in warnings(entries)] == ["rate limited: pausing all polling"]


# ---------------------------------------------------------------------------- 3. deep JSON


async def test_deeply_nested_bodies_are_bad_responses_not_crashes(sim: Simulator) -> None:
    """1. a 500 whose body nests 100,000 lists 2. a transient error naming the status
    3. the same body with 200 4. a bad response, not a RecursionError."""
    short_id = sim.create_chat("q", short_id="chat_deep")
    sim.inject(
        Fault("status", status=500, body=DEEP), Fault("status", status=200, body=DEEP), short_id=short_id
    )
    async with QATechClient(sim.base_url, TOKEN, timeout_s=5.0) as opened:
        with pytest.raises(TransientError, match="500") as first:
            await opened.get_conversation(short_id)
        assert not isinstance(first.value, BadResponseError)
        with pytest.raises(BadResponseError):
            await opened.get_conversation(short_id)


# ---------------------------------------------------------------------------- 4. zone-less times


async def test_created_at_without_a_zone_is_utc(sim: Simulator) -> None:
    """1. one message's createdAt has no zone, the others have one 2. parsed as UTC: the
    detector and the event work, and the event shows it with Z."""
    body = {
        "shortId": "chat_zone",
        "url": "https://app.qa.tech/chat/chat_zone",
        "createdAt": "2026-11-27T10:00:00Z",
        "updatedAt": "2026-11-27T10:00:02",
        "messages": [
            {
                "id": "a1",
                "role": "assistant",
                "createdAt": "2026-11-27T10:00:02",
                "text": "hi",
                "status": "COMPLETED",
            },
            {"id": "u1", "role": "user", "createdAt": "2026-11-27T10:00:01+00:00", "text": "q"},
        ],
    }
    sim.create_chat(short_id="chat_zone")
    sim.inject(*[Fault("status", status=200, body=json.dumps(body))] * 2, short_id="chat_zone")
    async with QATechClient(sim.base_url, TOKEN) as opened:
        conversation = await opened.get_conversation("chat_zone")
    assert all(m.created_at.tzinfo is not None for m in conversation.messages)
    assert conversation.messages[1].created_at < conversation.messages[0].created_at  # comparable
    (event,) = detect(WatchState(), conversation, now=conversation.updated_at).events
    assert event.data["message"]["createdAt"] == "2026-11-27T10:00:02.000Z"


# ---------------------------------------------------------------------------- 6. size


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_answer_over_the_size_cap_is_a_bad_response(
    sim: Simulator, client: QATechClient, chunked: bool
) -> None:
    """1. a 200 of 1 MB (cap 64 KiB), with or without Content-Length 2. a bad response naming
    the setting, and the client keeps working."""
    short_id = sim.create_chat("q", short_id="chat_big", reply_s=0.0)
    big = json.dumps({"shortId": short_id, "padding": "x" * 1_000_000})
    fault = Fault("status", status=200, body=big, chunked=chunked)
    sim.inject(fault, short_id=short_id)
    with pytest.raises(BadResponseError, match=r"api\.max_response_bytes"):
        await client.get_conversation(short_id)
    assert (await client.get_conversation(short_id)).short_id == short_id


# ---------------------------------------------------------------------------- 7. secrets


def test_excerpt_scrubs_a_secret_before_cutting_it() -> None:
    """1. a token registered as secret straddles the excerpt's cut 2. no 6 characters of it
    survive in the excerpt."""
    token = "qwt-SECRET-cut-in-half-0123456789"
    logs.register_secret(token)
    body = "e" * (EXCERPT_CHARS - 10) + token + " tail"
    text = excerpt(body)
    assert len(text) <= EXCERPT_CHARS
    assert not any(token[i : i + 6] in text for i in range(len(token) - 5))


async def test_rate_limited_error_never_carries_the_token(sim: Simulator) -> None:
    """1. a 429 whose body echoes the token 2. the error text has no part of it."""
    token = "qwt-SECRET-echoed-9876543210"
    logs.register_secret(token)
    short_id = sim.create_chat("q", short_id="chat_echo")
    sim.inject(
        Fault("status", status=503, body=json.dumps({"message": "x" * 110 + token})), short_id=short_id
    )
    async with QATechClient(sim.base_url, TOKEN) as opened:
        with pytest.raises(TransientError) as caught:
            await opened.get_conversation(short_id)
    assert not isinstance(caught.value, RateLimitedError)
    assert not any(token[i : i + 6] in str(caught.value) for i in range(len(token) - 5))


# ---------------------------------------------------------------------------- 10. outage


async def test_an_outage_of_the_whole_api_is_three_lines_not_one_per_watch(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. 40 watched chats 2. every GET answers 503 3. a few lines: at most two per-watch
    warnings before it is clearly upstream-wide, then one "keeps failing" 4. the API recovers:
    one "answers again", and every reply arrives."""
    monkeypatch.setattr(daemon.outage, "OUTAGE_QUIET_S", 0.5)  # 30 s: how long it must be quiet
    ids = [sim.create_chat("q", short_id=f"chat_out{i}", reply_s=0.0) for i in range(40)]
    out = tmp_path / "replies.ndjson"
    settings = make_settings(
        sim, tmp_path, ids, poll=FAST, api={"rate_limit_per_s": 400, "max_concurrency": 8}
    )
    sim.config.fault_5xx = 1.0
    with structlog.testing.capture_logs() as entries:
        async with running(settings):
            await until(
                lambda: sum(1 for r in sim.requests if r.status == 503) >= 200, within=20.0, what="503s"
            )
            sim.config.fault_5xx = 0.0
            await until(
                lambda: out.exists() and len(out.read_text().splitlines()) == 40, within=20.0, what="replies"
            )
            await until(lambda: any(e["event"] == "the API answers again" for e in entries), what="the end")
    lines = [e["event"] for e in warnings(entries)]
    assert lines.count("the API keeps failing, for several conversations in a row; backing off") == 1
    assert len(lines) <= 3, lines
    assert [e["event"] for e in entries].count("the API answers again") == 1
    assert [e["event"] for e in entries].count("conversation reachable again") <= 2


def test_outage_is_one_incident_with_a_summary_a_minute() -> None:
    """1. one conversation failing again and again is not an outage 2. three conversations
    failing one after another start one 3. a summary at most every 60 s 4. three successes
    end it with its figures."""
    outage = Outage()
    assert [outage.failed("chat_a", t) for t in range(10)] == [None] * 10
    assert outage.failed("chat_b", 10) is None
    assert outage.failed("chat_c", 11) == "start"
    assert outage.active
    actions = [outage.failed(f"chat_{i % 5}", 11 + i) for i in range(1, 130)]
    assert actions.count("summary") == 2
    assert outage.succeeded(141) is None
    assert outage.succeeded(142) is None
    assert outage.succeeded(143) is None  # three in a row, but a failure only 3 s ago
    end = outage.succeeded(200)
    assert end is not None
    assert (end.duration_s, end.failed_polls, end.conversations) == (189, 12 + 129, 8)
    assert not outage.active
    assert outage.failed("chat_a", 300) is None  # a new streak starts from nothing


# ---------------------------------------------------------------------------- second review


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59"])
def test_a_time_utc_cannot_hold_is_a_bad_response(when: str) -> None:
    """1. a createdAt that is valid ISO 8601 but out of range in UTC 2. a bad response (logged
    once, backed off), not an OverflowError on every poll."""
    body = {"shortId": "chat_a", "createdAt": when, "updatedAt": when, "messages": []}
    with pytest.raises(BadResponseError):
        parse_conversation(json.dumps(body).encode())


def test_the_earliest_time_is_still_rfc3339() -> None:
    """Year 1 is written with four digits, as RFC 3339 wants."""
    body = b'{"shortId":"chat_a","createdAt":"0001-01-01T00:00:00","updatedAt":"0001-01-01T00:00:00"}'
    assert rfc3339(parse_conversation(body).created_at) == "0001-01-01T00:00:00.000Z"


def test_a_secret_behind_whitespace_or_a_cut_does_not_survive() -> None:
    """1. a token after thousands of spaces (collapsed only after a cut, before) 2. a token split
    by reading only the first bytes of a body 3. no 6 characters of it in either excerpt."""
    token = "qat_SECRET-behind-spaces-4242"
    logs.register_secret(token)
    for text in (" " * 7_670 + token, ("x" * 2_030 + token).encode()[:2_040]):
        shown = excerpt(text)
        assert not any(token[i : i + 6] in shown for i in range(len(token) - 5)), shown


@pytest.mark.parametrize(
    ("status", "error"), [(404, NotFoundError), (401, AuthError), (429, RateLimitedError)]
)
async def test_an_error_answer_with_a_huge_body_keeps_its_status(
    sim: Simulator, client: QATechClient, status: int, error: type[Exception]
) -> None:
    """1. a 404, 401 or 429 whose body is 5 MB (cap 64 KiB) 2. classified by its status, not as
    an oversized answer (a 404 still ends the watch, a 429 still pauses polling)."""
    short_id = sim.create_chat("q", short_id=f"chat_big{status}")
    sim.inject(Fault("status", status=status, body="x" * 5_000_000), short_id=short_id)
    with pytest.raises(error):
        await client.get_conversation(short_id)


@pytest.mark.parametrize("char", ["\u200b", "\ufeff", "\u00ad", "\u2060", "\u3000"])
def test_ids_with_invisible_characters_are_refused(char: str) -> None:
    """`chat_a` and `chat_a` plus a zero-width space look the same but are two watches."""
    assert is_short_id("chat_a")
    assert not is_short_id(f"chat_a{char}")
    assert not is_short_id(f"chat_{char}a")
