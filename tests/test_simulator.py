"""Tests of the QA.tech chat API simulator, over real HTTP with a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from support import started_sim

from daemon.simulator import (
    Fault,
    SimConfig,
    Simulator,
    SimulatorThread,
    serve,
)

TOKEN = "sim-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = 1000.0
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def set(self, t: float) -> None:
        self.t = t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def ts(value: str) -> datetime:
    assert RFC3339_MS.fullmatch(value), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def seconds_between(a: str, b: str) -> float:
    return (ts(b) - ts(a)).total_seconds()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[Simulator]:
    async with started_sim(SimConfig(reply_s=10.0, seed=1), clock=clock) as simulator:
        yield simulator


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=sim.base_url, headers=AUTH) as session:
        yield session


async def get_json(client: aiohttp.ClientSession, short_id: str, **query: str) -> tuple[int, Any]:
    async with client.get(f"/v1/chat/{short_id}", params=query or None) as resp:
        return resp.status, await resp.json()


async def get_conv(client: aiohttp.ClientSession, short_id: str, **query: str) -> dict[str, Any]:
    status, body = await get_json(client, short_id, **query)
    assert status == 200, body
    assert isinstance(body, dict)
    return body


# --------------------------------------------------------------------------- auth and errors


async def test_token_is_required(sim: Simulator) -> None:
    short_id = sim.create_chat("hello")
    url = f"{sim.base_url}/v1/chat/{short_id}"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 401
            assert await resp.json() == {"message": "Unauthorized"}
        async with session.get(url, headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with session.post(f"{sim.base_url}/v1/chat", json={"message": "x"}) as resp:
            assert resp.status == 401
        async with session.get(url, headers={"Authorization": f"bearer {TOKEN}"}) as resp:
            assert resp.status == 200
    assert [r.status for r in sim.requests] == [401, 401, 401, 200]


async def test_token_can_change_at_runtime(sim: Simulator, client: aiohttp.ClientSession) -> None:
    short_id = sim.create_chat("hello")
    sim.config.token = "rotated"
    status, body = await get_json(client, short_id)
    assert (status, body) == (401, {"message": "Unauthorized"})


async def test_forbidden_mode(sim: Simulator, client: aiohttp.ClientSession) -> None:
    short_id = sim.create_chat("hello")
    sim.forbidden = True
    status, body = await get_json(client, short_id)
    assert status == 403
    assert "message" in body
    async with client.post("/v1/chat", json={"message": "x"}) as resp:
        assert resp.status == 403
    sim.forbidden = False
    status, _ = await get_json(client, short_id)
    assert status == 200


async def test_unknown_conversation_is_404(client: aiohttp.ClientSession) -> None:
    status, body = await get_json(client, "chat_doesnotexist")
    assert status == 404
    assert body == {"message": "Conversation not found"}
    async with client.post("/v1/chat/chat-abc_12", json={"message": "x"}) as resp:
        assert resp.status == 404
        assert "message" in await resp.json()


@pytest.mark.parametrize("bad_id", ["conversation_1", "chat", "chat-abc", "chatx"])
async def test_bad_id_is_400(client: aiohttp.ClientSession, bad_id: str) -> None:
    status, body = await get_json(client, bad_id)
    assert status == 400
    assert bad_id in body["message"]
    async with client.post(f"/v1/chat/{bad_id}", json={"message": "x"}) as resp:
        assert resp.status == 400


@pytest.mark.parametrize("limit", ["0", "101", "abc", "1.5", "-1", "", "20x"])
async def test_bad_limit_is_400(sim: Simulator, client: aiohttp.ClientSession, limit: str) -> None:
    short_id = sim.create_chat("hello")
    status, body = await get_json(client, short_id, limit=limit)
    assert status == 400
    assert "limit" in body["message"]


async def test_limit_bounds_are_accepted(sim: Simulator, client: aiohttp.ClientSession) -> None:
    short_id = sim.create_chat("hello")
    assert len((await get_conv(client, short_id, limit="1"))["messages"]) == 1
    assert len((await get_conv(client, short_id, limit="100"))["messages"]) == 1


async def test_unknown_route_and_method_answer_json(client: aiohttp.ClientSession) -> None:
    async with client.get("/v1/runs") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert await resp.json() == {"message": "Not Found"}
    async with client.delete("/v1/chat/chat_1") as resp:
        assert resp.status == 405
        assert "message" in await resp.json()


async def test_post_bad_body_is_400(sim: Simulator, client: aiohttp.ClientSession) -> None:
    short_id = sim.create_chat()
    for path in ("/v1/chat", f"/v1/chat/{short_id}"):
        async with client.post(path, data=b"{not json") as resp:
            assert resp.status == 400
            assert "JSON" in (await resp.json())["message"]
        for body in ({}, {"message": 5}, {"message": "   "}, ["message"]):
            async with client.post(path, json=body) as resp:
                assert resp.status == 400, body
                assert "message" in (await resp.json())["message"]
    assert sim.conversation_json(short_id)["messages"] == []


# --------------------------------------------------------------------------- lifecycle


async def test_reply_lifecycle_at_each_boundary(
    sim: Simulator, client: aiohttp.ClientSession, clock: FakeClock
) -> None:
    question = "how do I log in?"
    short_id = sim.create_chat(question, reply_s=10.0)

    def assert_user_newest(conv: dict[str, Any]) -> None:
        assert len(conv["messages"]) == 1
        user = conv["messages"][0]
        assert user["role"] == "user"
        assert user["text"] == question
        assert user["status"] == "COMPLETED"
        assert user["isStreaming"] is False
        assert user["createdAt"] == conv["createdAt"]
        assert conv["updatedAt"] == conv["createdAt"]

    conv = await get_conv(client, short_id)
    assert conv["shortId"] == short_id
    assert conv["url"] == f"https://app.qa.tech/chat/{short_id}"
    assert conv["source"] == "api"
    assert conv["title"] == question
    created = conv["createdAt"]
    assert_user_newest(conv)

    clock.set(T0 + 0.999)
    assert_user_newest(await get_conv(client, short_id))

    clock.set(T0 + 1.0)  # 0.1 * d: the assistant message appears
    conv = await get_conv(client, short_id)
    assistant, user = conv["messages"]
    assert user["role"] == "user"
    assert assistant["role"] == "assistant"
    assert assistant["id"] != user["id"]
    assert (assistant["status"], assistant["text"], assistant["isStreaming"]) == (
        "INITIATED",
        "",
        False,
    )
    assert seconds_between(created, assistant["createdAt"]) == 1.0
    assert seconds_between(created, conv["updatedAt"]) == 1.0

    clock.set(T0 + 2.999)
    conv = await get_conv(client, short_id)
    assert conv["messages"][0]["status"] == "INITIATED"

    texts = []
    for t in (3.0, 5.0, 8.0, 9.999):  # 0.3 * d .. d: streaming
        clock.set(T0 + t)
        conv = await get_conv(client, short_id)
        msg = conv["messages"][0]
        assert msg["status"] == "PARTIAL"
        assert msg["isStreaming"] is True
        assert msg["createdAt"] == assistant["createdAt"]
        assert seconds_between(created, conv["updatedAt"]) == 3.0
        texts.append(msg["text"])
    assert all(texts), texts
    assert all(len(a) < len(b) for a, b in itertools.pairwise(texts)), texts

    clock.set(T0 + 10.0)  # d: terminal
    conv = await get_conv(client, short_id)
    final = conv["messages"][0]
    assert (final["status"], final["isStreaming"]) == ("COMPLETED", False)
    assert question in final["text"]
    assert final["text"].startswith("Answer to 'how do I log in?':")
    assert all(final["text"].startswith(t) for t in texts)
    assert len(final["text"]) > len(texts[-1])
    assert seconds_between(created, conv["updatedAt"]) == 10.0

    clock.set(T0 + 100.0)  # nothing changes after the end
    assert await get_conv(client, short_id) == conv


@pytest.mark.parametrize(
    ("outcome", "expected_text"),
    [("FAILED", "The assistant could not finish: "), ("CANCELLED", "Cancelled.")],
)
async def test_failed_and_cancelled_outcomes(
    sim: Simulator,
    client: aiohttp.ClientSession,
    clock: FakeClock,
    outcome: str,
    expected_text: str,
) -> None:
    short_id = sim.create_chat("run the checkout test", outcome=outcome, reply_s=4.0)
    clock.set(T0 + 2.0)
    assert (await get_conv(client, short_id))["messages"][0]["status"] == "PARTIAL"
    clock.set(T0 + 4.0)
    msg = (await get_conv(client, short_id))["messages"][0]
    assert msg["status"] == outcome
    assert msg["isStreaming"] is False
    assert msg["text"].startswith(expected_text)


async def test_reply_override_and_default_duration(
    sim: Simulator, client: aiohttp.ClientSession, clock: FakeClock
) -> None:
    sim.config.reply_s = 2.0
    short_id = sim.create_chat("q", reply="Exactly this text.")
    clock.set(T0 + 1.999)
    assert (await get_conv(client, short_id))["messages"][0]["status"] == "PARTIAL"
    clock.set(T0 + 2.0)
    msg = (await get_conv(client, short_id))["messages"][0]
    assert (msg["status"], msg["text"]) == ("COMPLETED", "Exactly this text.")


async def test_zero_duration_reply_is_done_at_once(sim: Simulator, client: aiohttp.ClientSession) -> None:
    short_id = sim.create_chat("instant?", reply_s=0.0)
    conv = await get_conv(client, short_id)
    assert [m["role"] for m in conv["messages"]] == ["assistant", "user"]
    assert conv["messages"][0]["status"] == "COMPLETED"


async def test_limit_and_newest_first(
    sim: Simulator, client: aiohttp.ClientSession, clock: FakeClock
) -> None:
    short_id = sim.create_chat()
    ids = []
    for i in range(5):
        clock.advance(1.0)
        ids.append(sim.add_message(short_id, "user" if i % 2 == 0 else "assistant", f"m{i}"))
    assert len(set(ids)) == 5
    assert all(re.fullmatch(r"msg_\d+", i) for i in ids)

    conv = await get_conv(client, short_id)
    assert [m["id"] for m in conv["messages"]] == ids[::-1]
    assert [m["text"] for m in conv["messages"]] == ["m4", "m3", "m2", "m1", "m0"]
    stamps = [ts(m["createdAt"]) for m in conv["messages"]]
    assert stamps == sorted(stamps, reverse=True)

    conv = await get_conv(client, short_id, limit="2")
    assert [m["text"] for m in conv["messages"]] == ["m4", "m3"]

    assert sim.conversation_json(short_id, limit=3) == await get_conv(client, short_id, limit="3")


async def test_default_limit_is_20(sim: Simulator, client: aiohttp.ClientSession) -> None:
    short_id = sim.create_chat()
    for i in range(25):
        sim.add_message(short_id, "user", f"m{i}")
    conv = await get_conv(client, short_id)
    assert len(conv["messages"]) == 20
    assert conv["messages"][0]["text"] == "m24"


async def test_post_chat_answers_202_then_user_message_appears(
    sim: Simulator, client: aiohttp.ClientSession, clock: FakeClock
) -> None:
    async with client.post("/v1/chat", json={"message": "Is signup working?"}) as resp:
        assert resp.status == 202
        created = await resp.json()
    short_id = created["shortId"]
    assert re.fullmatch(r"chat_[0-9a-f]{8}", short_id)
    assert created["messages"] == []
    assert created["url"] == f"https://app.qa.tech/chat/{short_id}"
    assert created["source"] == "api"
    assert created["title"] == "Is signup working?"
    assert ts(created["createdAt"]) == ts(created["updatedAt"])

    conv = await get_conv(client, short_id)
    assert [(m["role"], m["text"]) for m in conv["messages"]] == [("user", "Is signup working?")]

    clock.set(T0 + 10.0)  # config.reply_s
    conv = await get_conv(client, short_id)
    assert conv["messages"][0]["role"] == "assistant"
    assert conv["messages"][0]["status"] == "COMPLETED"
    assert "Is signup working?" in conv["messages"][0]["text"]


async def test_follow_up_post(sim: Simulator, client: aiohttp.ClientSession, clock: FakeClock) -> None:
    short_id = sim.create_chat("first question", reply_s=2.0)
    clock.set(T0 + 5.0)
    async with client.post(f"/v1/chat/{short_id}", json={"message": "second question"}) as resp:
        assert resp.status == 202
        assert await resp.json() == {"shortId": short_id, "status": "accepted"}

    # Pitfall: the user's follow-up is newest; the previous reply is finished but stale.
    conv = await get_conv(client, short_id)
    assert [(m["role"], m["status"]) for m in conv["messages"]] == [
        ("user", "COMPLETED"),
        ("assistant", "COMPLETED"),
        ("user", "COMPLETED"),
    ]
    assert conv["messages"][0]["text"] == "second question"
    assert seconds_between(conv["createdAt"], conv["updatedAt"]) == 5.0

    clock.set(T0 + 5.0 + 10.0)
    conv = await get_conv(client, short_id)
    newest = conv["messages"][0]
    assert (newest["role"], newest["status"]) == ("assistant", "COMPLETED")
    assert "second question" in newest["text"]
    assert len(conv["messages"]) == 4
    assert [r.method for r in sim.requests_for(short_id)] == ["POST", "GET", "GET"]


async def test_send_message_helper_schedules_reply(sim: Simulator, clock: FakeClock) -> None:
    short_id = sim.create_chat()
    sim.send_message(short_id, "ping", reply="pong", outcome="COMPLETED", reply_s=1.0)
    assert [m["role"] for m in sim.conversation_json(short_id)["messages"]] == ["user"]
    clock.advance(1.0)
    newest = sim.conversation_json(short_id)["messages"][0]
    assert (newest["text"], newest["status"]) == ("pong", "COMPLETED")
    with pytest.raises(KeyError):
        sim.send_message("chat_missing", "x")


# --------------------------------------------------------------------------- raw state helpers


async def test_empty_chat_and_raw_messages(
    sim: Simulator, client: aiohttp.ClientSession, clock: FakeClock
) -> None:
    short_id = sim.create_chat(short_id="chat-demo_1", title="Demo")
    conv = await get_conv(client, short_id)
    assert (conv["shortId"], conv["title"], conv["messages"]) == ("chat-demo_1", "Demo", [])
    assert conv["updatedAt"] == conv["createdAt"]

    clock.advance(2.0)
    sim.add_message(short_id, "user", "question")
    msg_id = sim.add_message(short_id, "assistant", "half", status="PARTIAL", is_streaming=True)
    conv = await get_conv(client, short_id)
    assert conv["messages"][0] == {
        "id": msg_id,
        "role": "assistant",
        "createdAt": conv["updatedAt"],
        "text": "half",
        "status": "PARTIAL",
        "isStreaming": True,
    }

    clock.advance(3.0)
    sim.set_message(short_id, msg_id, status="THINKING_HARD", is_streaming=False)
    conv = await get_conv(client, short_id)
    assert conv["messages"][0]["status"] == "THINKING_HARD"  # unknown statuses pass through
    assert conv["messages"][0]["text"] == "half"
    assert seconds_between(conv["createdAt"], conv["updatedAt"]) == 5.0

    with pytest.raises(KeyError):
        sim.set_message(short_id, "msg_nope", status="COMPLETED")


async def test_set_message_freezes_a_scheduled_reply(sim: Simulator, clock: FakeClock) -> None:
    short_id = sim.create_chat("q", reply_s=10.0)
    user_id = sim.conversation_json(short_id)["messages"][0]["id"]
    assistant_id = f"msg_{int(user_id.removeprefix('msg_')) + 1}"  # scheduled right after
    with pytest.raises(ValueError, match="not visible"):
        sim.set_message(short_id, assistant_id, status="COMPLETED")
    clock.set(T0 + 5.0)
    sim.set_message(short_id, assistant_id, text="stuck")
    clock.set(T0 + 50.0)
    newest = sim.conversation_json(short_id)["messages"][0]
    assert (newest["id"], newest["status"], newest["text"]) == (assistant_id, "PARTIAL", "stuck")
    assert newest["isStreaming"] is True


async def test_delete_chat(sim: Simulator, client: aiohttp.ClientSession) -> None:
    short_id = sim.create_chat("bye")
    assert (await get_json(client, short_id))[0] == 200
    sim.delete_chat(short_id)
    assert (await get_json(client, short_id))[0] == 404
    with pytest.raises(KeyError):
        sim.delete_chat(short_id)
    with pytest.raises(KeyError):
        sim.conversation_json(short_id)


def test_create_chat_validation() -> None:
    sim = Simulator(SimConfig(seed=3), clock=FakeClock())
    sim.create_chat(short_id="chat_x")
    with pytest.raises(ValueError, match="already exists"):
        sim.create_chat(short_id="chat_x")
    with pytest.raises(ValueError, match="invalid short id"):
        sim.create_chat(short_id="nope")
    with pytest.raises(ValueError, match="outcome"):
        sim.create_chat("q", outcome="DONE")
    with pytest.raises(ValueError, match="reply_s"):
        sim.create_chat("q", reply_s=-1.0)
    with pytest.raises(ValueError, match="need a message"):
        sim.create_chat(reply="r")
    with pytest.raises(RuntimeError):
        _ = sim.base_url


# --------------------------------------------------------------------------- faults


async def test_scripted_faults_are_consumed_in_order(sim: Simulator, client: aiohttp.ClientSession) -> None:
    short_id = sim.create_chat("q")
    sim.inject(
        Fault("status", status=429, retry_after="7"),
        Fault("malformed"),
        Fault("wrong_shape"),
        Fault("status", status=503),
        Fault("status", status=200, body='{"custom": true}'),
    )
    async with client.get(f"/v1/chat/{short_id}") as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"
        assert "message" in await resp.json()
    async with client.get(f"/v1/chat/{short_id}") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        with pytest.raises(json.JSONDecodeError):
            json.loads(await resp.text())
    async with client.get(f"/v1/chat/{short_id}") as resp:
        assert resp.status == 200
        body = await resp.json()
        assert "shortId" not in body
        assert "messages" not in body
    async with client.get(f"/v1/chat/{short_id}") as resp:
        assert resp.status == 503
        assert "Retry-After" not in resp.headers
        assert await resp.json() == {"message": "Service Unavailable"}
    async with client.get(f"/v1/chat/{short_id}") as resp:
        assert await resp.json() == {"custom": True}
    # the queue is empty: normal answers again
    for _ in range(2):
        conv = await get_conv(client, short_id)
        assert conv["shortId"] == short_id
    assert [r.status for r in sim.requests_for(short_id)] == [429, 200, 200, 503, 200, 200, 200]


async def test_faults_scoped_to_a_chat(sim: Simulator, client: aiohttp.ClientSession) -> None:
    a = sim.create_chat("a")
    b = sim.create_chat("b")
    sim.inject(Fault("status", status=500), short_id=b)
    sim.inject(Fault("status", status=502))
    assert (await get_json(client, a))[0] == 502  # the global fault, any chat
    assert (await get_json(client, a))[0] == 200  # b's fault is not a's
    assert (await get_json(client, b))[0] == 500
    assert (await get_json(client, b))[0] == 200


async def test_post_requests_do_not_consume_faults(sim: Simulator, client: aiohttp.ClientSession) -> None:
    short_id = sim.create_chat("a")
    sim.inject(Fault("status", status=500))
    async with client.post(f"/v1/chat/{short_id}", json={"message": "more"}) as resp:
        assert resp.status == 202
    assert (await get_json(client, short_id))[0] == 500


async def test_random_faults_are_seeded(clock: FakeClock) -> None:
    async def statuses(seed: int) -> list[tuple[int, str | None]]:
        config = SimConfig(seed=seed, fault_5xx=0.5, fault_429=0.5, retry_after_s=1.2)
        simulator = Simulator(config, clock=clock)
        await simulator.start()
        try:
            short_id = simulator.create_chat("q")
            async with aiohttp.ClientSession(base_url=simulator.base_url, headers=AUTH) as s:
                out = []
                for _ in range(16):
                    async with s.get(f"/v1/chat/{short_id}") as resp:
                        out.append((resp.status, resp.headers.get("Retry-After")))
                simulator.config.fault_5xx = simulator.config.fault_429 = 0.0
                async with s.get(f"/v1/chat/{short_id}") as resp:
                    assert resp.status == 200  # rates are read per request
                return out
        finally:
            await simulator.stop()

    first = await statuses(11)
    assert set(first) == {(503, None), (429, "2")}
    assert await statuses(11) == first
    assert await statuses(12) != first


async def test_random_body_faults(sim: Simulator, client: aiohttp.ClientSession) -> None:
    short_id = sim.create_chat("q")
    sim.config.fault_malformed = 1.0
    async with client.get(f"/v1/chat/{short_id}") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        with pytest.raises(json.JSONDecodeError):
            json.loads(await resp.text())
    sim.config.fault_malformed = 0.0
    sim.config.fault_wrong_shape = 1.0
    for _ in range(3):
        async with client.get(f"/v1/chat/{short_id}") as resp:
            assert resp.status == 200
            body = await resp.json()
            assert not (
                isinstance(body, dict)
                and isinstance(body.get("shortId"), str)
                and isinstance(body.get("messages"), list)
            )


async def test_random_stall_answers_late(sim: Simulator, client: aiohttp.ClientSession) -> None:
    short_id = sim.create_chat("q")
    sim.config.fault_timeout = 1.0
    sim.config.stall_s = 0.05
    started = time.monotonic()
    conv = await get_conv(client, short_id)
    assert time.monotonic() - started >= 0.05
    assert conv["shortId"] == short_id


async def test_stall_does_not_block_and_stop_is_prompt(sim: Simulator, client: aiohttp.ClientSession) -> None:
    stalled = sim.create_chat("stalled")
    other = sim.create_chat("other")
    sim.inject(Fault("stall", stall_s=30.0), short_id=stalled)

    async def get_with_timeout() -> None:
        timeout = aiohttp.ClientTimeout(total=0.2)
        async with client.get(f"/v1/chat/{stalled}", timeout=timeout) as resp:
            await resp.read()

    with pytest.raises(TimeoutError):
        await get_with_timeout()

    sim.inject(Fault("stall", stall_s=30.0), short_id=stalled)
    pending = asyncio.create_task(get_json(client, stalled))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    conv = await get_conv(client, other)  # not blocked by the stalled request
    assert conv["shortId"] == other
    assert time.monotonic() - started < 1.0

    started = time.monotonic()
    await sim.stop()
    assert time.monotonic() - started < 2.0
    result: tuple[int, Any] | BaseException
    try:
        result = await pending
    except aiohttp.ClientError as exc:
        result = exc
    # released by stop(): a 503 or a dropped connection, never the 30 s stall
    assert isinstance(result, aiohttp.ClientError) or result[0] == 503, result


# --------------------------------------------------------------------------- request log


async def test_request_log_records_query_and_headers(
    sim: Simulator, client: aiohttp.ClientSession, clock: FakeClock
) -> None:
    short_id = sim.create_chat("q")
    clock.set(T0 + 42.0)
    async with client.get(
        f"/v1/chat/{short_id}", params={"limit": "5"}, headers={"User-Agent": "qawatch-test/1.0"}
    ) as resp:
        assert resp.status == 200
    assert len(sim.requests) == 1
    record = sim.requests[0]
    assert record.at == T0 + 42.0
    assert record.method == "GET"
    assert record.path == f"/v1/chat/{short_id}"
    assert record.query == {"limit": "5"}
    assert record.status == 200
    assert record.headers["User-Agent"] == "qawatch-test/1.0"
    assert record.headers["Authorization"] == f"Bearer {TOKEN}"

    await get_json(client, "chat_other")
    assert sim.requests_for(short_id) == [record]
    assert [r.status for r in sim.requests_for("chat_other")] == [404]


# --------------------------------------------------------------------------- seeded outcomes


def _outcomes(seed: int) -> list[tuple[str, str, str]]:
    clock = FakeClock()
    sim = Simulator(SimConfig(seed=seed, fail_rate=0.3, cancel_rate=0.3, reply_s=1.0), clock=clock)
    ids = [sim.create_chat(f"question {i}") for i in range(40)]
    clock.advance(1.0)
    out = []
    for short_id in ids:
        newest = sim.conversation_json(short_id)["messages"][0]
        out.append((short_id, newest["status"], newest["text"]))
    return out


def test_seeded_fail_and_cancel_rates_are_reproducible() -> None:
    first = _outcomes(7)
    assert first == _outcomes(7)
    assert [s for _, s, _ in first] != [s for _, s, _ in _outcomes(8)]
    assert len({short_id for short_id, _, _ in first}) == 40
    by_status: dict[str, list[str]] = {}
    for _, status, text in first:
        by_status.setdefault(status, []).append(text)
    assert set(by_status) == {"COMPLETED", "FAILED", "CANCELLED"}
    assert all(t.startswith("The assistant could not finish: ") for t in by_status["FAILED"])
    assert all(t == "Cancelled." for t in by_status["CANCELLED"])
    assert all(t.startswith("Answer to 'question ") for t in by_status["COMPLETED"])


async def test_seeded_outcomes_over_http(clock: FakeClock) -> None:
    sim = Simulator(SimConfig(seed=5, fail_rate=1.0, reply_s=1.0), clock=clock)
    await sim.start()
    try:
        async with aiohttp.ClientSession(base_url=sim.base_url, headers=AUTH) as session:
            async with session.post("/v1/chat", json={"message": "will fail"}) as resp:
                short_id = (await resp.json())["shortId"]
            clock.advance(1.0)
            conv = await get_conv(session, short_id)
        assert conv["messages"][0]["status"] == "FAILED"
    finally:
        await sim.stop()


# --------------------------------------------------------------------------- threads and serve


def test_simulator_thread_from_sync_code() -> None:
    with SimulatorThread(SimConfig(reply_s=1.0)) as st:
        st.sim.create_chat("sync question", short_id="chat_sync")
        request = urllib.request.Request(f"{st.base_url}/v1/chat/chat_sync?limit=5", headers=AUTH)
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["shortId"] == "chat_sync"
        assert body["messages"][-1]["text"] == "sync question"
        bad = urllib.request.Request(f"{st.base_url}/v1/chat/chat_sync")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(bad, timeout=5)
        assert info.value.code == 401
        info.value.close()
        base_url = st.base_url
    assert [r.status for r in st.sim.requests] == [200, 401]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base_url}/v1/chat/chat_sync", timeout=1)


def test_simulator_thread_with_fake_clock() -> None:
    clock = FakeClock()
    with SimulatorThread(SimConfig(reply_s=4.0), clock=clock) as st:
        short_id = st.sim.create_chat("q")
        clock.set(T0 + 4.0)
        request = urllib.request.Request(f"{st.base_url}/v1/chat/{short_id}", headers=AUTH)
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = json.loads(resp.read())
    assert body["messages"][0]["status"] == "COMPLETED"


async def test_serve_prints_url_and_chats_then_stops_on_cancel() -> None:
    out = io.StringIO()
    task = asyncio.create_task(serve(SimConfig(reply_s=0.0), port=0, chats=2, out=out))
    for _ in range(200):
        if len(out.getvalue().splitlines()) >= 3:
            break
        await asyncio.sleep(0.01)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    match = re.fullmatch(
        r"qawatch simulator listening on (http://127\.0\.0\.1:\d+) \(token: sim-token\)", lines[0]
    )
    assert match
    base_url = match.group(1)
    assert all(re.fullmatch(r"chat_[0-9a-f]{8}", line) for line in lines[1:])
    async with aiohttp.ClientSession(base_url=base_url, headers=AUTH) as session:
        conv = await get_conv(session, lines[1])
        assert conv["messages"][0]["status"] == "COMPLETED"

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"/v1/chat/{lines[1]}")


# --------------------------------------------------------------------------- inconsistent reads


def ids_of(conv: dict[str, Any]) -> list[str]:
    return [m["id"] for m in conv["messages"]]


async def test_hide_leaves_a_message_out_of_the_next_answers_only(
    sim: Simulator, client: aiohttp.ClientSession
) -> None:
    """1. a finished turn 2. hidden from 2 answers 3. the third lists it again; the helper
    conversation_json (not an answer) never uses up the count."""
    short_id = sim.create_chat("q", short_id="chat_hide", reply_s=0.0)
    reply, question = ids_of(await get_conv(client, short_id))
    sim.hide(short_id, reply, answers=2)
    assert ids_of(sim.conversation_json(short_id)) == [reply, question]
    assert ids_of(await get_conv(client, short_id)) == [question]
    assert ids_of(await get_conv(client, short_id)) == [question]
    assert ids_of(await get_conv(client, short_id)) == [reply, question]
    with pytest.raises(KeyError):
        sim.hide(short_id, "msg_nope")


async def test_flip_ties_and_list_twice(sim: Simulator, client: aiohttp.ClientSession) -> None:
    """1. three turns written at once share one createdAt 2. flip_ties lists them in reverse
    for one answer 3. list_twice repeats an id in one answer 4. then all is as written."""
    short_id = sim.create_chat(short_id="chat_ties")
    replies = sim.add_turns(short_id, 3)
    written = ids_of(await get_conv(client, short_id))
    assert written[0] == replies[-1]
    assert len({m["createdAt"] for m in (await get_conv(client, short_id))["messages"]}) == 1
    sim.flip_ties(short_id)
    assert ids_of(await get_conv(client, short_id)) == written[::-1]
    sim.list_twice(short_id, replies[0])
    twice = ids_of(await get_conv(client, short_id))
    assert twice.count(replies[0]) == 2
    assert len(twice) == 7
    assert ids_of(await get_conv(client, short_id)) == written


async def test_add_turns_are_finished_pairs(sim: Simulator, client: aiohttp.ClientSession) -> None:
    """1. add_turns(12) 2. 24 messages, alternating assistant/user, replies COMPLETED with
    the generated answer 3. the default limit shows 20 of them."""
    short_id = sim.create_chat(short_id="chat_many")
    replies = sim.add_turns(short_id, 12)
    conv = await get_conv(client, short_id, limit="100")
    assert [m["role"] for m in conv["messages"]] == ["assistant", "user"] * 12
    assert {m["status"] for m in conv["messages"] if m["role"] == "assistant"} == {"COMPLETED"}
    assert ids_of(conv)[::2] == replies[::-1]
    assert conv["messages"][0]["text"].startswith("Answer to 'Question 12 of 12'")
    assert len((await get_conv(client, short_id))["messages"]) == 20


async def test_visible_lag_delays_a_posted_message_and_its_reply(
    sim: Simulator, client: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """1. visible_lag_s = 2 2. a follow-up is posted 3. for 2 s the answer does not list it
    4. then it is listed, and its reply runs from then."""
    short_id = sim.create_chat("q1", short_id="chat_lag", reply_s=0.0)
    before = ids_of(await get_conv(client, short_id))
    sim.config.visible_lag_s = 2.0
    sim.send_message(short_id, "q2", reply_s=1.0)
    clock.advance(1.9)
    assert ids_of(await get_conv(client, short_id)) == before
    clock.advance(0.1)
    conv = await get_conv(client, short_id)
    assert conv["messages"][0]["role"] == "user"
    assert conv["messages"][0]["text"] == "q2"
    clock.advance(1.0)
    conv = await get_conv(client, short_id)
    assert conv["messages"][0]["status"] == "COMPLETED"


async def test_created_shift_changes_createdat_not_the_order(
    sim: Simulator, client: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """1. a user message, then a reply whose createdAt is shifted 60 s into the past 2. the
    API still lists the reply first, with the older createdAt."""
    short_id = sim.create_chat(short_id="chat_shift")
    sim.add_message(short_id, "user", "q")
    clock.advance(1.0)
    reply = sim.add_message(short_id, "assistant", "a", created_shift_s=-60.0)
    conv = await get_conv(client, short_id)
    assert ids_of(conv)[0] == reply
    assert seconds_between(conv["messages"][0]["createdAt"], conv["messages"][1]["createdAt"]) == 59.0


# --------------------------------------------------------------------------- streaming share


async def test_stream_share_moves_the_streaming_phase(clock: FakeClock) -> None:
    """1. with stream_share 0.2 a 10 s reply is INITIATED from 1 s to 8 s, PARTIAL from 8 s
    2. a reply's own share overrides the configuration's 3. share 1: it streams at once
    4. a share outside 0..1, or one without a message, is refused."""
    sim = Simulator(SimConfig(reply_s=10.0, stream_share=0.2), clock=clock)
    short_id = sim.create_chat("q")
    own = sim.create_chat("q", stream_share=0.5)
    at_once = sim.create_chat("q", stream_share=1.0)

    def newest(chat: str) -> tuple[str, bool]:
        message = sim.conversation_json(chat)["messages"][0]
        return message["status"], message["isStreaming"]

    assert sim.conversation_json(short_id)["messages"][0]["role"] == "user"
    assert newest(at_once) == ("PARTIAL", True)
    for t, phase, phase_own in [
        (1.0, "INITIATED", "INITIATED"),
        (4.999, "INITIATED", "INITIATED"),
        (5.0, "INITIATED", "PARTIAL"),
        (7.999, "INITIATED", "PARTIAL"),
        (8.0, "PARTIAL", "PARTIAL"),
        (10.0, "COMPLETED", "COMPLETED"),
    ]:
        clock.set(T0 + t)
        assert newest(short_id)[0] == phase, t
        assert newest(own)[0] == phase_own, t
    with pytest.raises(ValueError, match="stream_share"):
        sim.create_chat("q", stream_share=1.5)
    with pytest.raises(ValueError, match="stream_share"):
        sim.send_message(short_id, "q", stream_share=-0.1)
    with pytest.raises(ValueError, match="need a message"):
        sim.create_chat(stream_share=0.5)


# --------------------------------------------------------------------------- rendered bodies


async def test_served_bodies_are_always_a_fresh_render(
    sim: Simulator, client: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """1. at every phase boundary and in between, twice in a row (the second from the cache),
    a GET answers exactly what a fresh render says 2. so does it after every kind of change
    (raw message, follow-up, set_message, hide)."""
    short_id = sim.create_chat("q", reply_s=10.0)

    async def check(limit: int = 20) -> bytes:
        expected = json.dumps(sim.conversation_json(short_id, limit)).encode()
        for _ in range(2):
            async with client.get(f"/v1/chat/{short_id}", params={"limit": str(limit)}) as resp:
                assert await resp.read() == expected, clock()
        return expected

    seen = set()
    for t in (0.0, 0.5, 0.999, 1.0, 2.0, 2.999, 3.0, 3.5, 9.999, 10.0, 50.0):
        clock.set(T0 + t)
        seen.add(await check())
        seen.add(await check(limit=1))
    assert len(seen) >= 10
    before = await check()
    message_id = sim.add_message(short_id, "user", "more")
    assert await check() != before
    sim.set_message(short_id, message_id, text="changed")
    assert b"changed" in await check()
    sim.send_message(short_id, "again", reply_s=1.0)
    clock.advance(0.5)
    await check()
    clock.advance(0.5)
    await check()
    sim.hide(short_id, message_id)
    async with client.get(f"/v1/chat/{short_id}") as resp:
        assert message_id not in (await resp.text())
    assert message_id in (await check()).decode()


async def test_request_records_can_be_switched_off_and_observed(clock: FakeClock) -> None:
    """1. record_requests=False keeps no RequestRecord 2. on_request sees every request with
    its method, path, clock and status."""
    seen: list[tuple[str, str, float, int]] = []
    async with started_sim(SimConfig(record_requests=False), clock=clock) as sim:
        sim.on_request = lambda *args: seen.append(args)
        short_id = sim.create_chat("q")
        async with aiohttp.ClientSession(base_url=sim.base_url, headers=AUTH) as client:
            await get_conv(client, short_id)
            await get_json(client, "chat_unknown")
    assert sim.requests == []
    assert seen == [("GET", f"/v1/chat/{short_id}", T0, 200), ("GET", "/v1/chat/chat_unknown", T0, 404)]


# --------------------------------------------------------------------------- fast server


async def _answer(session: aiohttp.ClientSession, path: str, headers: dict[str, str]) -> tuple[Any, ...]:
    async with session.get(path, headers=headers) as resp:
        return (
            resp.status,
            resp.content_type,
            resp.charset,
            resp.headers.get("Retry-After"),
            await resp.read(),
        )


async def test_fast_server_answers_gets_like_aiohttp(clock: FakeClock) -> None:
    """The same GETs (answers, errors, refusals, every fault but stalls) against the aiohttp
    server and the fast one give the same status, content type, Retry-After and body, and the
    same request records."""
    sims = [Simulator(SimConfig(reply_s=10.0, seed=3), clock=clock) for _ in range(2)]
    sims[1]._wall0 = sims[0]._wall0  # the same createdAt for the same clock
    answers: list[list[tuple[Any, ...]]] = []
    for sim, fast in zip(sims, (False, True), strict=True):
        clock.set(T0)
        await sim.start(fast=fast)
        try:
            short_id = sim.create_chat("q")
            done = sim.create_chat("done", reply_s=0.0)
            sim.inject(
                Fault("status", status=429, retry_after="3"),
                Fault("malformed"),
                Fault("wrong_shape"),
                Fault("status", status=503, body='{"message": "busy"}', chunked=True),
                short_id=done,
            )
            requests = [
                (f"/v1/chat/{short_id}", AUTH),
                (f"/v1/chat/{short_id}?limit=1", AUTH),
                (f"/v1/chat/{short_id}?limit=0", AUTH),
                (f"/v1/chat/{short_id}?limit=abc", AUTH),
                ("/v1/chat/chat_unknown", AUTH),
                ("/v1/chat/bad", AUTH),
                ("/v1/other", AUTH),
                (f"/v1/chat/{short_id}", {}),
                (f"/v1/chat/{short_id}", {"Authorization": "Bearer wrong"}),
                *[(f"/v1/chat/{done}", AUTH)] * 5,
            ]
            async with aiohttp.ClientSession(base_url=sim.base_url) as session:
                got = [await _answer(session, path, headers) for path, headers in requests]
                clock.advance(5.0)
                got.append(await _answer(session, f"/v1/chat/{short_id}", AUTH))
                sim.forbidden = True
                got.append(await _answer(session, f"/v1/chat/{short_id}", AUTH))
            answers.append(got)
        finally:
            await sim.stop()
    assert answers[0] == answers[1]
    assert [(r.method, r.path, r.query, r.status, r.at) for r in sims[0].requests] == [
        (r.method, r.path, r.query, r.status, r.at) for r in sims[1].requests
    ]
    assert sims[1].requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5.0)  # until the server closes
    finally:
        writer.close()


async def test_fast_server_over_raw_http(clock: FakeClock) -> None:
    """1. pipelined requests on one connection are answered in order, and Connection: close
    closes after its answer 2. a POST is 405 with Allow: GET 3. HTTP/1.0 closes at once
    4. a request that is not HTTP is 400 and closed."""
    async with contextlib.AsyncExitStack() as stack:
        sim = Simulator(SimConfig(), clock=clock)
        await sim.start(fast=True)
        stack.push_async_callback(sim.stop)
        short_id = sim.create_chat("q")
        port = int(sim.base_url.rsplit(":", 1)[1])
        auth = f"Authorization: Bearer {TOKEN}\r\n"
        get = f"GET /v1/chat/{short_id}?limit=1 HTTP/1.1\r\nHost: x\r\n{auth}"
        post = f"POST /v1/chat/{short_id} HTTP/1.1\r\n{auth}Content-Length: 2\r\n\r\n{{}}"
        raw = await _exchange(
            port,
            f"{get}\r\n{post}{get}Connection: close\r\n\r\n".encode(),
        )
        answers = raw.split(b"HTTP/1.1 ")[1:]
        assert [a.split(b" ", 1)[0] for a in answers] == [b"200", b"405", b"200"]
        assert b"Allow: GET" in answers[1]
        assert answers[0].endswith(json.dumps(sim.conversation_json(short_id, 1)).encode())
        assert b"Connection: close" in answers[2]
        assert (await _exchange(port, f"GET /v1/chat/{short_id} HTTP/1.0\r\n{auth}\r\n".encode())).startswith(
            b"HTTP/1.1 200 OK"
        )
        assert (await _exchange(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400 Bad Request")


async def test_fast_server_stalls_without_blocking_and_stops_promptly(clock: FakeClock) -> None:
    """1. a stalled GET answers after its stall, others are not held up 2. stop() releases a
    30 s stall at once (503 or a dropped connection)."""
    sim = Simulator(SimConfig(), clock=clock)
    await sim.start(fast=True)
    try:
        stalled, other = sim.create_chat("stalled"), sim.create_chat("other")
        sim.inject(Fault("stall", stall_s=0.1), Fault("stall", stall_s=30.0), short_id=stalled)
        async with aiohttp.ClientSession(base_url=sim.base_url, headers=AUTH) as client:
            started = time.monotonic()
            assert (await get_conv(client, stalled))["shortId"] == stalled
            assert time.monotonic() - started >= 0.1
            pending = asyncio.create_task(get_json(client, stalled))
            await asyncio.sleep(0.05)
            assert (await get_conv(client, other))["shortId"] == other
            started = time.monotonic()
            await sim.stop()
            assert time.monotonic() - started < 2.0
            result: tuple[int, Any] | BaseException
            try:
                result = await pending
            except aiohttp.ClientError as exc:
                result = exc
            assert isinstance(result, aiohttp.ClientError) or result[0] == 503, result
    finally:
        await sim.stop()
    assert next(r.status for r in sim.requests_for(stalled)) == 200
