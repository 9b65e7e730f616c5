"""The QA.tech client against a real simulator: every answer classified per the design's table."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from support import closed_port

from daemon import __version__
from daemon.errors import (
    AuthError,
    BadResponseError,
    ConnectError,
    NotFoundError,
    PermanentError,
    RateLimitedError,
    RejectedError,
    TransientError,
    UpstreamError,
)
from daemon.httputil import EXCERPT_CHARS
from daemon.qatech import QATechClient
from daemon.simulator import Fault, SimConfig, Simulator

TOKEN = "qwt-CLIENT-SECRET-41c2"


@pytest.fixture
def sim_config() -> SimConfig:
    """The ``sim`` fixture's simulator: this file's token, 0.2 s replies, seed 3."""
    return SimConfig(token=TOKEN, reply_s=0.2, seed=3)


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[QATechClient]:
    async with QATechClient(sim.base_url, TOKEN, timeout_s=2.0) as opened:
        yield opened


def gets(sim: Simulator, short_id: str) -> int:
    return sum(1 for r in sim.requests_for(short_id) if r.method == "GET")


# ---------------------------------------------------------------------------------------
# 200 and the request itself


async def test_200_is_parsed(sim: Simulator, client: QATechClient) -> None:
    """1. a chat whose reply finished 2. GET 3. the conversation, newest message first."""
    short_id = sim.create_chat("Does login work?", reply="Yes.", reply_s=0.0)
    conversation = await client.get_conversation(short_id, 5)
    assert conversation.short_id == short_id
    assert conversation.title == "Does login work?"
    assert [m.role for m in conversation.messages] == ["assistant", "user"]
    newest = conversation.messages[0]
    assert (newest.status, newest.text, newest.is_streaming) == ("COMPLETED", "Yes.", False)
    assert newest.finished


async def test_request_carries_limit_bearer_and_user_agent(sim: Simulator, client: QATechClient) -> None:
    """1. GET with limit 7 2. the simulator saw ?limit=7 (not the OpenAPI ``query=`` form),
    the Bearer token and ``User-Agent: qawatch/<version>``."""
    short_id = sim.create_chat("hello")
    await client.get_conversation(short_id, 7)
    (record,) = sim.requests_for(short_id)
    assert record.method == "GET"
    assert record.query == {"limit": "7"}
    headers = {k.lower(): v for k, v in record.headers.items()}
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["user-agent"] == f"qawatch/{__version__}"


async def test_post_create_chat_and_follow_up(sim: Simulator, client: QATechClient) -> None:
    """1. create a chat (202, no messages yet) 2. send a follow-up (202)
    3. both POSTs reached the simulator once, with the Bearer token."""
    conversation = await client.create_chat("first question")
    assert conversation.messages == ()
    short_id = conversation.short_id
    await client.send_message(short_id, "second question")
    posts = [r for r in sim.requests if r.method == "POST"]
    assert [r.path for r in posts] == ["/v1/chat", f"/v1/chat/{short_id}"]
    assert all(r.status == 202 for r in posts)
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in posts)
    texts = [m["text"] for m in sim.conversation_json(short_id)["messages"] if m["role"] == "user"]
    assert sorted(texts) == ["first question", "second question"]


async def test_unknown_fields_are_tolerated(sim: Simulator, client: QATechClient) -> None:
    """1. a 200 body with extra fields at every level and an unknown status
    2. parsed; the unknown status is kept as text and is not finished."""
    short_id = sim.create_chat()
    body = {
        "shortId": short_id,
        "url": "https://app.qa.tech/chat/x",
        "title": "t",
        "createdAt": "2026-01-01T00:00:00.000Z",
        "updatedAt": "2026-01-01T00:00:01.000Z",
        "project": {"id": "p1", "name": "demo"},
        "messages": [
            {
                "id": "m2",
                "role": "assistant",
                "createdAt": "2026-01-01T00:00:01.000Z",
                "text": "...",
                "status": "THINKING",
                "isStreaming": False,
                "toolCalls": [{"name": "run_test"}],
            },
            {"id": "m1", "role": "user", "createdAt": "2026-01-01T00:00:00.000Z", "text": "q"},
        ],
    }
    sim.inject(Fault("status", status=200, body=json.dumps(body)), short_id=short_id)
    conversation = await client.get_conversation(short_id)
    assert [m.id for m in conversation.messages] == ["m2", "m1"]
    assert conversation.messages[0].status == "THINKING"
    assert not conversation.messages[0].finished


# ---------------------------------------------------------------------------------------
# error answers, classified


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, RejectedError),
        (401, AuthError),
        (403, AuthError),
        (404, NotFoundError),
        (408, TransientError),
        (500, TransientError),
        (501, TransientError),
        (502, TransientError),
        (503, TransientError),
    ],
)
async def test_status_is_classified_and_not_retried_in_call(
    sim: Simulator, client: QATechClient, status: int, error_class: type[UpstreamError]
) -> None:
    """1. the API answers ``status`` with a message 2. the design's error class, with the status
    and the API's message 3. exactly one request (waiting is the scheduler's job)."""
    short_id = sim.create_chat("q")
    sim.inject(Fault("status", status=status, body='{"message": "api says no"}'), short_id=short_id)
    with pytest.raises(error_class) as caught:
        await client.get_conversation(short_id)
    error = caught.value
    assert type(error) is error_class  # not a subclass such as ConnectError or RateLimitedError
    assert error.status == status
    assert isinstance(error, PermanentError) == (status in (400, 401, 403, 404))
    if status != 404:
        assert "api says no" in str(error)
    assert gets(sim, short_id) == 1


async def test_real_401_403_404_400_from_the_simulator(sim: Simulator) -> None:
    """1. a wrong token 2. a suspended organisation 3. an unknown chat 4. an invalid id
    5. AuthError, AuthError, NotFoundError, RejectedError."""
    short_id = sim.create_chat("q")
    async with QATechClient(sim.base_url, "wrong-token") as wrong:
        with pytest.raises(AuthError) as caught:
            await wrong.get_conversation(short_id)
        assert caught.value.status == 401
    async with QATechClient(sim.base_url, TOKEN) as client:
        sim.forbidden = True
        with pytest.raises(AuthError) as caught:
            await client.get_conversation(short_id)
        assert caught.value.status == 403
        sim.forbidden = False
        with pytest.raises(NotFoundError):
            await client.get_conversation("chat_doesnotexist")
        with pytest.raises(RejectedError):
            await client.get_conversation("chatX")


async def test_429_retry_after_seconds(sim: Simulator, client: QATechClient) -> None:
    """1. 429 with ``Retry-After: 7`` 2. RateLimitedError (transient) with retry_after 7."""
    short_id = sim.create_chat("q")
    sim.inject(Fault("status", status=429, retry_after="7"), short_id=short_id)
    with pytest.raises(RateLimitedError) as caught:
        await client.get_conversation(short_id)
    assert isinstance(caught.value, TransientError)
    assert caught.value.retry_after == 7.0
    assert caught.value.status == 429


async def test_429_retry_after_http_date(sim: Simulator, client: QATechClient) -> None:
    """1. 429 with ``Retry-After`` as an HTTP date 30 s ahead 2. retry_after is about 30 s."""
    short_id = sim.create_chat("q")
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    sim.inject(Fault("status", status=429, retry_after=when), short_id=short_id)
    with pytest.raises(RateLimitedError) as caught:
        await client.get_conversation(short_id)
    assert caught.value.retry_after is not None
    assert 27.0 <= caught.value.retry_after <= 30.5


async def test_429_without_retry_after(sim: Simulator, client: QATechClient) -> None:
    """1. 429 with no ``Retry-After`` 2. RateLimitedError whose retry_after is None (backoff decides)."""
    short_id = sim.create_chat("q")
    sim.inject(Fault("status", status=429), short_id=short_id)
    with pytest.raises(RateLimitedError) as caught:
        await client.get_conversation(short_id)
    assert caught.value.retry_after is None


async def test_503_retry_after_is_kept(sim: Simulator, client: QATechClient) -> None:
    """1. 503 with ``Retry-After: 4`` 2. TransientError carrying retry_after 4."""
    short_id = sim.create_chat("q")
    sim.inject(Fault("status", status=503, retry_after="4"), short_id=short_id)
    with pytest.raises(TransientError) as caught:
        await client.get_conversation(short_id)
    assert caught.value.retry_after == 4.0


# ---------------------------------------------------------------------------------------
# bodies of the wrong shape


@pytest.mark.parametrize(
    "fault",
    [
        Fault("malformed"),
        Fault("malformed", body="<html><body>Bad gateway</body></html>"),
        Fault("wrong_shape", body='{"data": [1, 2]}'),
        Fault("wrong_shape", body="[1, 2, 3]"),
        Fault("wrong_shape", body='{"shortId": 42, "messages": "none"}'),
        Fault("wrong_shape", body="null"),
    ],
    ids=["truncated", "html", "other-object", "list", "wrong-types", "null"],
)
async def test_bad_body_is_bad_response_with_excerpt(
    sim: Simulator, client: QATechClient, fault: Fault
) -> None:
    """1. a 200 whose body is not JSON or not a conversation 2. BadResponseError (transient)
    3. with a short excerpt of the body."""
    short_id = sim.create_chat("q")
    sim.inject(fault, short_id=short_id)
    with pytest.raises(BadResponseError) as caught:
        await client.get_conversation(short_id)
    error = caught.value
    assert isinstance(error, TransientError)
    assert error.excerpt
    assert len(error.excerpt) <= EXCERPT_CHARS
    body = fault.body if fault.body is not None else '{"shortId": "'
    assert error.excerpt[:10] == " ".join(body.split())[:10]


async def test_long_bad_body_is_cut_to_a_short_excerpt(sim: Simulator, client: QATechClient) -> None:
    """1. a 200 with 20 kB of non-JSON 2. the excerpt and the message stay short."""
    short_id = sim.create_chat("q")
    sim.inject(Fault("malformed", body="garbage " * 2500), short_id=short_id)
    with pytest.raises(BadResponseError) as caught:
        await client.get_conversation(short_id)
    assert len(caught.value.excerpt) <= EXCERPT_CHARS
    assert len(str(caught.value)) < 500


async def test_message_without_created_at_is_bad_response(sim: Simulator, client: QATechClient) -> None:
    """1. a conversation whose message lacks createdAt 2. BadResponseError naming where."""
    short_id = sim.create_chat("q")
    body = sim.conversation_json(short_id)
    del body["messages"][0]["createdAt"]
    sim.inject(Fault("status", status=200, body=json.dumps(body)), short_id=short_id)
    with pytest.raises(BadResponseError, match="createdAt"):
        await client.get_conversation(short_id)


# ---------------------------------------------------------------------------------------
# stalls and connection failures


async def test_stall_longer_than_timeout_is_connect_error(sim: Simulator) -> None:
    """1. every GET stalls for 30 s 2. timeout_s is 0.3 3. ConnectError (transient) after the
    short in-call retries, well within a few seconds."""
    short_id = sim.create_chat("q")
    sim.inject(*[Fault("stall", stall_s=30.0)] * 3, short_id=short_id)
    started = time.monotonic()
    async with QATechClient(sim.base_url, TOKEN, timeout_s=0.3, connect_retries=2) as client:
        with pytest.raises(ConnectError) as caught:
            await client.get_conversation(short_id)
    elapsed = time.monotonic() - started
    assert isinstance(caught.value, TransientError)
    assert 0.9 <= elapsed < 3.0  # three attempts of 0.3 s each, plus at most 0.6 s of backoff
    assert "0.3" in str(caught.value)


async def test_one_stall_is_retried_and_then_answered(sim: Simulator) -> None:
    """1. the first GET stalls 2. the in-call retry gets the conversation."""
    short_id = sim.create_chat("q")
    sim.inject(Fault("stall", stall_s=30.0), short_id=short_id)
    async with QATechClient(sim.base_url, TOKEN, timeout_s=0.3) as client:
        conversation = await client.get_conversation(short_id)
    assert conversation.short_id == short_id


async def test_connection_refused_is_connect_error() -> None:
    """1. the base URL is a closed port 2. ConnectError naming the URL, after the short
    backoff retries (under 2 s)."""
    base_url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    async with QATechClient(base_url, TOKEN, timeout_s=1.0, connect_retries=2) as client:
        with pytest.raises(ConnectError) as caught:
            await client.get_conversation("chat_abc")
    assert time.monotonic() - started < 2.0
    assert base_url in str(caught.value)
    assert TOKEN not in str(caught.value)


class DroppingServer:
    """A real TCP server that reads each request's head, notes its method and hangs up."""

    def __init__(self) -> None:
        self.methods: list[str] = []
        #: each request's target, byte for byte as sent
        self.targets: list[str] = []
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.methods.append(head.split(b" ", 1)[0].decode())
            self.targets.append(head.split(b" ", 2)[1].decode())
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_get_is_retried_but_post_never_is() -> None:
    """1. a server that hangs up on every request 2. a GET is tried 1 + connect_retries times
    3. a POST (create and follow-up) is sent exactly once: a retry could post it twice."""
    dropper = DroppingServer()
    async with dropper as base_url, QATechClient(base_url, TOKEN, connect_retries=2) as client:
        with pytest.raises(ConnectError):
            await client.get_conversation("chat_abc")
        get_attempts = dropper.methods.count("GET")
        with pytest.raises(ConnectError):
            await client.create_chat("hello")
        with pytest.raises(ConnectError):
            await client.send_message("chat_abc", "again")
    assert get_attempts >= 3  # qawatch's own retries (aiohttp may add one per attempt)
    assert dropper.methods.count("POST") == 2


async def test_post_is_not_retried_against_the_simulator(sim: Simulator, client: QATechClient) -> None:
    """1. faults queued for the chat (they hit GETs only) 2. a follow-up POST is answered 202
    once 3. exactly one POST recorded, one user message added."""
    short_id = sim.create_chat("q", reply_s=0.0)
    sim.inject(Fault("status", status=503), Fault("stall", stall_s=30.0), short_id=short_id)
    await client.send_message(short_id, "follow-up")
    posts = [r for r in sim.requests_for(short_id) if r.method == "POST"]
    assert len(posts) == 1
    users = [m for m in sim.conversation_json(short_id)["messages"] if m["role"] == "user"]
    assert [m["text"] for m in users].count("follow-up") == 1


# ---------------------------------------------------------------------------------------
# the token stays hidden


async def test_repr_never_shows_the_token(sim: Simulator, client: QATechClient) -> None:
    """1. an open client 2. repr and str show the base URL, never the token
    3. nor does any error it raises."""
    assert TOKEN not in repr(client)
    assert TOKEN not in str(client)
    assert sim.base_url in repr(client)
    sim.forbidden = True
    with pytest.raises(AuthError) as caught:
        await client.get_conversation("chat_abc")
    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(caught.value)


async def test_client_must_be_opened() -> None:
    """1. a client never opened 2. a call fails loudly rather than hanging."""
    client = QATechClient("http://127.0.0.1:1", TOKEN)
    with pytest.raises(RuntimeError, match="open"):
        await client.get_conversation("chat_abc")


async def test_request_target_keeps_the_base_path_as_configured_and_quotes_odd_ids() -> None:
    """1. api.base_url with a path holding encoded reserved characters (a gateway's prefix)
    2. a plain id and one with characters a path must quote 3. each request's target, as sent,
    keeps the prefix byte for byte (not decoded to ';' and '=') and quotes only the odd id."""
    dropper = DroppingServer()
    async with dropper as origin:
        client = QATechClient(origin + "/tenant%3Bv%3D2/", TOKEN, connect_retries=0)
        async with client:
            for short_id, limit in (("chat_abc-1", 20), ("odd/id é", 7)):
                with pytest.raises(ConnectError):
                    await client.get_conversation(short_id, limit)
    # aiohttp may send a request twice on a connection that hangs up: each target once here
    assert list(dict.fromkeys(dropper.targets)) == [
        "/tenant%3Bv%3D2/v1/chat/chat_abc-1?limit=20",
        "/tenant%3Bv%3D2/v1/chat/odd%2Fid%20%C3%A9?limit=7",
    ]
