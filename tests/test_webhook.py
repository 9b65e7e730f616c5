"""The webhook sink end to end, in-process: a real simulator upstream, ``App(...).run(stop)``
with a real SQLite state file, a file sink beside the webhook, and a real aiohttp receiver on
127.0.0.1 (``webhook_receiver.Receiver``) that records every request and answers from a script.

Every delivery is checked with the reference ``standardwebhooks`` package. Retry schedules are
fractions of a second (except where whole-second timestamps must differ) and every wait is
bounded (:func:`until`), so a hang fails instead of blocking.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Sequence
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from support import closed_port, logged, running, until
from support import make_settings as fast_settings
from webhook_receiver import SECRET, SECRET_2, Answer, Hit, Receiver, secret_parts, webhook
from webhook_receiver import deliveries as webhook_deliveries

from daemon import __version__
from daemon.app import App
from daemon.errors import SinkDisabledError, SinkError
from daemon.outbox import SinkWorker
from daemon.settings import Settings
from daemon.simulator import Simulator
from daemon.sinks.webhook import WebhookSink

# ---------------------------------------------------------------------------- helpers


def make_settings(
    sim: Simulator, tmp_path: Path, ids: Sequence[str], hook: dict[str, Any], *, grace_s: float = 2.0
) -> Settings:
    """Fast polling against ``sim``; a file sink (``replies.ndjson``) and the webhook ``hook``."""
    return fast_settings(
        sim,
        tmp_path,
        ids,
        sinks=[{"type": "file", "path": tmp_path / "replies.ndjson"}, hook],
        grace_s=grace_s,
    )


def worker(app: App, name: str = "webhook") -> SinkWorker:
    return next(w for w in app.sink_workers if w.sink.name == name)


def file_lines(tmp_path: Path) -> dict[str, bytes]:
    """The file sink's complete lines, by event id (the exact bytes, without the newline)."""
    path = tmp_path / "replies.ndjson"
    if not path.exists():
        return {}
    lines = path.read_bytes().split(b"\n")[:-1]
    return {json.loads(line)["id"]: line for line in lines}


def deliveries(tmp_path: Path) -> list[tuple[str, str, int, str | None]]:
    """(event id, state, attempts, last error) of each webhook delivery, oldest first."""
    return webhook_deliveries(tmp_path / "state.db")


def states(tmp_path: Path) -> list[str]:
    return [state for _, state, _, _ in deliveries(tmp_path)]


def verify(hit: Hit, secret: str = SECRET) -> Any:
    """What a receiver built on the reference package does; raises if the signature is bad."""
    return Webhook(secret).verify(hit.body, hit.headers)


def tampered(body: bytes) -> bytes:
    """``body`` with one ASCII byte (the first letter of the event type) changed."""
    index = body.index(b'"type":"') + len(b'"type":"')
    changed = bytearray(body)
    changed[index] = ord("C") if changed[index] != ord("C") else ord("D")
    return bytes(changed)


def chats(sim: Simulator, count: int, prefix: str = "chat_w", **kwargs: Any) -> list[str]:
    """``count`` conversations whose replies finish at once (``reply_s=0``) unless told otherwise."""
    kwargs.setdefault("reply_s", 0.0)
    return [
        sim.create_chat(f"question {i}", short_id=f"{prefix}{i}", reply=f"answer {i}", **kwargs)
        for i in range(count)
    ]


# ---------------------------------------------------------------------------- 1. signing and bytes


async def test_every_delivery_verifies_and_tampering_fails(
    sim: Simulator, tmp_path: Path, receiver: Receiver
) -> None:
    """1. three replies (one with non-ASCII text) reach the webhook 2. each request verifies with
    ``standardwebhooks.Webhook(secret).verify`` and yields the event 3. changing one byte of the
    body, the id or the timestamp makes verification fail, as does another secret."""
    ids = chats(sim, 2)
    ids.append(sim.create_chat("unicode?", short_id="chat_u", reply='Jä, ✓ — 日本語 "quoted"', reply_s=0))
    async with running(make_settings(sim, tmp_path, ids, webhook(receiver))):
        await until(lambda: len(receiver.acked()) == 3, what="three deliveries")
    assert len(receiver.hits) == 3
    by_id = file_lines(tmp_path)
    for hit in receiver.hits:
        event = verify(hit)
        assert event == json.loads(by_id[hit.id])
        assert event["id"] == hit.id
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(tampered(hit.body), hit.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(hit.body, {**hit.headers, "webhook-id": hit.id + "x"})
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(hit.body, {**hit.headers, "webhook-timestamp": str(hit.timestamp - 1)})
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET_2).verify(hit.body, hit.headers)
    texts = {verify(hit)["data"]["message"]["text"] for hit in receiver.hits}
    assert 'Jä, ✓ — 日本語 "quoted"' in texts


async def test_body_is_the_stored_event_json_with_configured_headers(
    sim: Simulator, tmp_path: Path, receiver: Receiver
) -> None:
    """1. a webhook with extra ``headers`` and ``max_concurrency: 1`` gets three replies
    2. each is a POST to the URL's path with content-type application/json, webhook-id = the
    event id, the extra headers and a qawatch user agent 3. the body bytes are exactly the file
    sink's line for that event 4. the deliveries shared one kept-alive connection."""
    ids = chats(sim, 3)
    extra = {"Authorization": "Bearer receiver-token-42", "X-Team": "qa"}
    hook = webhook(receiver, headers=extra, max_concurrency=1)
    async with running(make_settings(sim, tmp_path, ids, hook)):
        await until(lambda: len(receiver.acked()) == 3, what="three deliveries")
        await until(lambda: states(tmp_path) == ["delivered"] * 3, what="acknowledged in the store")
    lines = file_lines(tmp_path)
    assert sorted(lines) == sorted(receiver.ids())
    for hit in receiver.hits:
        assert (hit.method, hit.path) == ("POST", "/hook")
        assert hit.headers["content-type"] == "application/json"
        assert hit.headers["authorization"] == "Bearer receiver-token-42"
        assert hit.headers["x-team"] == "qa"
        assert hit.headers["user-agent"] == f"qawatch/{__version__}"
        assert hit.body == lines[hit.id]
        assert json.loads(hit.body)["id"] == hit.id
        assert hit.headers["webhook-signature"].startswith("v1,")
    assert len({hit.peer for hit in receiver.hits}) == 1, "connections were not kept alive"


async def test_secret_rotation_signs_with_each_secret(
    sim: Simulator, tmp_path: Path, receiver: Receiver
) -> None:
    """1. ``secret: [S1, S2]`` 2. webhook-signature holds two space-separated ``v1,`` signatures
    3. the first verifies with S1 only and the second with S2 only (standardwebhooks)
    4. the whole header verifies with either secret, so receivers on the old or the new one work."""
    ids = chats(sim, 1)
    hook = webhook(receiver, secret=[SECRET, SECRET_2])
    async with running(make_settings(sim, tmp_path, ids, hook)):
        await until(receiver.acked, what="the delivery")
    hit = receiver.hits[0]
    _check_two_signatures(hit, [SECRET, SECRET_2])


async def test_secret_file_with_two_lines_signs_with_each(
    sim: Simulator, tmp_path: Path, receiver: Receiver
) -> None:
    """1. ``secret_file`` holds a comment, the new secret, a blank line and the old secret
    2. webhook-signature holds one signature per secret, in file order, each verifying with
    its own secret only."""
    secret_file = tmp_path / "webhook-secrets"
    secret_file.write_text(f"# rotated: new first\n{SECRET_2}\n\n  {SECRET}  \n", encoding="utf-8")
    hook = webhook(receiver, secret_file=str(secret_file))
    del hook["secret"]
    async with running(make_settings(sim, tmp_path, chats(sim, 1), hook)):
        await until(receiver.acked, what="the delivery")
    _check_two_signatures(receiver.hits[0], [SECRET_2, SECRET])


def _check_two_signatures(hit: Hit, secrets: list[str]) -> None:
    signatures = hit.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(sig.startswith("v1,") for sig in signatures)
    assert signatures[0] != signatures[1]
    for secret in secrets:
        verify(hit, secret)
    for sig, own in zip(signatures, secrets, strict=True):
        alone = {**hit.headers, "webhook-signature": sig}
        Webhook(own).verify(hit.body, alone)
        other = next(s for s in secrets if s != own)
        with pytest.raises(WebhookVerificationError):
            Webhook(other).verify(hit.body, alone)
        with pytest.raises(WebhookVerificationError):
            Webhook(own).verify(tampered(hit.body), alone)


async def test_unsigned_without_a_secret(tmp_path: Path, receiver: Receiver) -> None:
    """1. a webhook sink without a secret sends an event 2. it carries webhook-id and
    webhook-timestamp but no webhook-signature."""
    sink = WebhookSink("webhook", receiver.url)
    await sink.open()
    try:
        await sink.send("evt_1", '{"id":"evt_1"}')
    finally:
        await sink.close()
    hit = receiver.hits[0]
    assert hit.id == "evt_1"
    assert abs(hit.timestamp - time.time()) < 2
    assert "webhook-signature" not in hit.headers
    assert hit.body == b'{"id":"evt_1"}'


# ---------------------------------------------------------------------------- 2. retries


async def test_500_twice_then_200_is_delivered_once_with_one_id_and_fresh_timestamps(
    sim: Simulator, tmp_path: Path, receiver: Receiver
) -> None:
    """1. the receiver answers 500, 500, then 200; retries come after 1.2 s (±10 %), so each
    attempt falls in a later second 2. three requests, all with the same webhook-id
    3. each webhook-timestamp is its own attempt's second, strictly increasing, and each request
    verifies (signed afresh) 4. acknowledged once; the store says delivered after 3 attempts."""
    receiver.answer(Answer(500, body="oops"), Answer(500))
    hook = webhook(receiver, retry_schedule_s=[1.2, 1.2, 1.2])
    async with running(make_settings(sim, tmp_path, chats(sim, 1), hook)):
        await until(receiver.acked, within=5, what="the delivery after two 500s")
        await until(lambda: states(tmp_path) == ["delivered"], what="acknowledged in the store")
        await asyncio.sleep(0.3)  # a duplicate would show up now
    hits = receiver.hits
    assert [hit.answer.status for hit in hits] == [500, 500, 200]
    assert len({hit.id for hit in hits}) == 1
    assert receiver.acked() == [hits[0].id]
    stamps = [hit.timestamp for hit in hits]
    assert stamps[0] < stamps[1] < stamps[2]
    for hit in hits:
        assert 0 <= hit.at - hit.timestamp < 1.5, (hit.at, hit.timestamp)
        verify(hit)
    assert len({hit.headers["webhook-signature"] for hit in hits}) == 3
    assert all(b.at - a.at >= 1.08 for a, b in itertools.pairwise(hits))
    assert deliveries(tmp_path)[0][1:3] == ("delivered", 3)


async def test_429_retry_after_is_honoured(sim: Simulator, tmp_path: Path, receiver: Receiver) -> None:
    """1. the receiver answers 429 with ``Retry-After: 2`` (the schedule alone would retry after
    0.2 s) 2. no attempt comes within 2 s of it 3. the next one does, and is delivered."""
    receiver.answer(Answer(429, headers={"Retry-After": "2"}))
    async with running(make_settings(sim, tmp_path, chats(sim, 1), webhook(receiver))):
        await until(receiver.acked, within=5, what="the delivery after the 429")
    first, second = receiver.hits
    assert first.answered_at is not None
    assert second.at - first.answered_at >= 2.0
    assert second.at - first.at < 3.0
    assert first.id == second.id


async def test_retry_after_does_not_extend_the_schedule(
    sim: Simulator, tmp_path: Path, receiver: Receiver
) -> None:
    """1. the receiver always answers 503 with ``Retry-After: 0`` 2. with a schedule of two
    retries, the event is dead-lettered after three attempts (Retry-After sets the delay, not
    how many attempts there are) 3. nothing more is sent."""
    receiver.default = Answer(503, headers={"Retry-After": "0"})
    hook = webhook(receiver, retry_schedule_s=[0.2, 0.2])
    async with running(make_settings(sim, tmp_path, chats(sim, 1), hook)):
        await until(lambda: states(tmp_path) == ["dead"], within=3, what="the dead letter")
        await asyncio.sleep(0.3)
    assert len(receiver.hits) == 3
    _, _, attempts, error = deliveries(tmp_path)[0]
    assert attempts == 3
    assert error is not None
    assert "gave up after 3 attempts" in error
    assert "HTTP 503" in error


ANSWERS = [
    Answer(503, body="busy"),
    Answer(408),
    Answer(502),
    Answer(501, body="not implemented here"),
    Answer(400, body='{"error": "unknown field \\"x\\""}'),
    Answer(404, body="no such hook"),
    Answer(302, headers={"Location": "/elsewhere"}),
]


@pytest.mark.parametrize("answer", ANSWERS, ids=[str(answer.status) for answer in ANSWERS])
async def test_every_answer_but_2xx_and_410_is_retried(
    sim: Simulator, tmp_path: Path, receiver: Receiver, answer: Answer, debug_logs: list[Any]
) -> None:
    """1. the receiver's first answer is ``answer`` (a 5xx, a 408, a 4xx as a receiver gives
    during its own deploy, a 302 redirect, which is not followed), then 200
    2. the failure is logged with the status and the body excerpt 3. a second attempt with the
    same id is delivered; nothing is dead-lettered and no request reaches a redirect's target."""
    receiver.answer(answer)
    async with running(make_settings(sim, tmp_path, chats(sim, 1), webhook(receiver))):
        await until(receiver.acked, what="the delivery after a retry")
        await until(lambda: states(tmp_path) == ["delivered"], what="acknowledged in the store")
    assert [hit.answer.status for hit in receiver.hits] == [answer.status, 200]
    assert {hit.path for hit in receiver.hits} == {"/hook"}
    event_id, _, attempts, _ = deliveries(tmp_path)[0]
    assert {hit.id for hit in receiver.hits} == {event_id}
    assert attempts == 2
    [failure] = logged(debug_logs, "sink failing; will retry")
    assert f"HTTP {answer.status}" in failure["error"]
    assert answer.body in failure["error"]
    assert logged(debug_logs, "event dead-lettered") == []


async def test_timeout_counts_as_retryable(sim: Simulator, tmp_path: Path, receiver: Receiver) -> None:
    """1. ``timeout_s: 0.3`` and a receiver that never answers the first request 2. the attempt
    times out and is retried (same id) 3. the retry is delivered; acknowledged once."""
    receiver.answer(Answer(hold=True))
    hook = webhook(receiver, timeout_s=0.3)
    async with running(make_settings(sim, tmp_path, chats(sim, 1), hook)):
        await until(receiver.acked, what="the delivery after the timeout")
        await until(lambda: states(tmp_path) == ["delivered"], what="acknowledged in the store")
    first, second = receiver.hits
    assert first.id == second.id
    assert second.at - first.at >= 0.3 + 0.18  # the timeout, then the first retry delay
    assert second.at - first.at < 1.5
    assert first.answered_at is None
    assert deliveries(tmp_path)[0][1:3] == ("delivered", 2)


async def test_max_age_dead_letters_an_old_event(sim: Simulator, tmp_path: Path, receiver: Receiver) -> None:
    """1. ``max_age_s: 0.5``; the receiver answers 503 and the retry is due after 1 s
    2. when it is due the event is older than 0.5 s: dead-lettered without another request,
    last_error naming max_age_s."""
    receiver.default = Answer(503)
    hook = webhook(receiver, max_age_s=0.5, retry_schedule_s=[1.0, 1.0])
    async with running(make_settings(sim, tmp_path, chats(sim, 1), hook)):
        await until(lambda: states(tmp_path) == ["dead"], within=3, what="the dead letter")
    assert len(receiver.hits) == 1
    error = deliveries(tmp_path)[0][3]
    assert error is not None
    assert "max_age_s=0.5" in error


async def test_410_disables_the_sink_keeps_events_pending_and_a_restart_delivers(
    sim: Simulator, tmp_path: Path, debug_logs: list[Any]
) -> None:
    """1. the receiver answers 410 Gone 2. the webhook sink is disabled, with an error logged and
    readiness false; nothing is dead-lettered 3. a later reply still reaches the file sink but
    no request is sent 4. both events stay pending in the store 5. restart (new App) with the
    receiver answering 200: both are delivered, the first with the id it had before."""
    receiver = await Receiver(default=Answer(410, body="gone")).start()
    try:
        short_id = chats(sim, 1)[0]
        settings = make_settings(sim, tmp_path, [short_id], webhook(receiver, max_concurrency=1))
        async with running(settings) as app:
            await until(lambda: worker(app).disabled, what="the sink disabled")
            assert app.readiness_problems() == ["sink webhook is disabled (410)"]
            sim.send_message(short_id, "follow-up", reply="later answer", reply_s=0.0)
            await until(lambda: len(file_lines(tmp_path)) == 2, what="the follow-up in the file")
            await asyncio.sleep(0.5)  # more than two retry delays: any request would show up now
            assert len(receiver.hits) == 1
            assert not worker(app, "file").disabled
        errors = [e for e in debug_logs if e["log_level"] == "error" and "410" in e["event"]]
        assert len(errors) == 1
        assert "HTTP 410" in errors[0]["error"]
        assert states(tmp_path) == ["pending", "pending"]
        assert logged(debug_logs, "event dead-lettered") == []

        receiver.default = Answer(200)
        async with running(settings) as app:
            await until(lambda: len(receiver.acked()) == 2, what="both events after the restart")
            await until(lambda: states(tmp_path) == ["delivered"] * 2, what="acknowledged in the store")
            assert not worker(app).disabled
            assert app.readiness_problems() == []
        event_ids = [event_id for event_id, _, _, _ in deliveries(tmp_path)]
        assert receiver.acked() == event_ids
        assert receiver.hits[0].id == event_ids[0]
        for hit in receiver.hits:
            verify(hit)
    finally:
        await receiver.stop()


# ---------------------------------------------------------------------------- 3. availability


async def test_receiver_down_then_up_gets_everything_exactly_once(sim: Simulator, tmp_path: Path) -> None:
    """1. the webhook URL's port is closed: three events fail to connect, some more than once
    2. the receiver comes up on that port 3. each event arrives and is acknowledged exactly
    once, signed, with its file sink bytes."""
    receiver = Receiver(port=closed_port())
    hook = webhook(receiver, retry_schedule_s=[0.3] * 20)
    try:
        async with running(make_settings(sim, tmp_path, chats(sim, 3), hook)):
            await until(lambda: len(file_lines(tmp_path)) == 3, what="three events")
            await until(
                lambda: min(attempts for _, _, attempts, _ in deliveries(tmp_path)) >= 2,
                what="every event failing at least twice",
            )
            assert all(error and "webhook:" in error for _, _, _, error in deliveries(tmp_path))
            await receiver.start()
            await until(lambda: len(receiver.acked()) == 3, what="three deliveries once up")
            await until(lambda: states(tmp_path) == ["delivered"] * 3, what="acknowledged in the store")
            await asyncio.sleep(0.4)  # a duplicate would show up now
    finally:
        await receiver.stop()
    assert sorted(receiver.ids()) == sorted(file_lines(tmp_path))
    assert len(receiver.hits) == 3
    lines = file_lines(tmp_path)
    for hit in receiver.hits:
        assert hit.body == lines[hit.id]
        verify(hit)


async def test_failing_webhook_does_not_delay_the_file_sink(
    sim: Simulator, tmp_path: Path, receiver: Receiver
) -> None:
    """1. the receiver answers 503; the webhook's retry is 1.5 s away 2. a second reply finishes
    meanwhile: it is in the file at once, while the webhook still waits 3. the receiver recovers:
    both events are delivered."""
    receiver.default = Answer(503)
    first = sim.create_chat("q1", short_id="chat_first", reply="one", reply_s=0.0)
    second = sim.create_chat("q2", short_id="chat_second", reply="two", reply_s=0.6)
    hook = webhook(receiver, retry_schedule_s=[1.5, 1.5])
    async with running(make_settings(sim, tmp_path, [first, second], hook)):
        await until(lambda: receiver.hits, what="the first, failing, attempt")
        await until(lambda: len(file_lines(tmp_path)) == 2, what="the second reply in the file")
        in_file_at = time.time()
        assert len(receiver.hits) == 1  # the webhook is still waiting for its retry
        receiver.default = Answer(200)
        await until(lambda: len(receiver.acked()) == 2, within=5, what="both webhook deliveries")
    assert in_file_at < receiver.hits[1].at
    assert in_file_at - receiver.hits[0].at < 1.2
    assert sorted(receiver.acked()) == sorted(file_lines(tmp_path))


async def test_max_concurrency_bounds_requests_in_flight(sim: Simulator, tmp_path: Path) -> None:
    """1. ``max_concurrency: 2`` and a receiver taking 0.3 s per answer 2. six events are sent
    3. never more than two requests are in flight, and two are at some point 4. all six arrive."""
    receiver = await Receiver(default=Answer(delay_s=0.3)).start()
    try:
        hook = webhook(receiver, max_concurrency=2)
        async with running(make_settings(sim, tmp_path, chats(sim, 6), hook)):
            await until(lambda: len(receiver.acked()) == 6, what="six deliveries")
    finally:
        await receiver.stop()
    assert receiver.max_in_flight == 2
    assert len(set(receiver.ids())) == 6


async def test_retry_after_is_capped_and_read_as_seconds_or_a_date(receiver: Receiver) -> None:
    """1. 503 with ``Retry-After: 86400``: retryable, the delay capped at one hour 2. 429 with an
    HTTP date 3 s ahead: about 3 s 3. 503 without it: no delay (the schedule decides) 4. 410: the
    sink-disabling error 5. 200: taken."""
    receiver.answer(
        Answer(503, headers={"Retry-After": "86400"}),
        Answer(429, headers={"Retry-After": formatdate(time.time() + 3, usegmt=True)}),
        Answer(503),
        Answer(410),
    )
    sink = WebhookSink("hook", receiver.url, secrets=[SECRET])
    await sink.open()
    try:
        errors: list[SinkError] = []
        for _ in range(4):
            with pytest.raises(SinkError) as caught:
                await sink.send("evt_1", "{}")
            errors.append(caught.value)
        await sink.send("evt_1", "{}")
    finally:
        await sink.close()
    capped, dated, plain, gone = errors
    assert (capped.retryable, capped.retry_after) == (True, 3600.0)
    assert dated.retryable
    assert dated.retry_after is not None
    assert 1.0 <= dated.retry_after <= 3.5
    assert (plain.retryable, plain.retry_after) == (True, None)
    assert isinstance(gone, SinkDisabledError)
    assert len(receiver.hits) == 5


def test_retry_delay_follows_the_schedule_with_jitter_then_gives_up() -> None:
    """1. the default schedule is 5 s, 30 s, 2 min, ... 8 h (±10 %) 2. after its last step the
    sink gives up (None: dead letter)."""
    sink = WebhookSink("hook", "http://127.0.0.1:9/hook")
    rng = random.Random(3)
    expected = [5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800]
    for attempts, base in enumerate(expected, start=1):
        delay = sink.retry_delay(attempts, rng)
        assert delay is not None
        assert base * 0.9 <= delay <= base * 1.1
    assert sink.retry_delay(len(expected) + 1, rng) is None


# ---------------------------------------------------------------------------- 4. secrets


async def test_secrets_never_logged(
    sim: Simulator, tmp_path: Path, receiver: Receiver, debug_logs: list[Any]
) -> None:
    """1. two secrets and a schedule of one retry; the receiver answers 503, times out once,
    then 400: one event is dead-lettered, the other delivered 2. plenty is logged, at debug
    level too 3. no log entry holds either secret or its key part, nor does the settings' or
    the sink's repr."""
    receiver.answer(Answer(503, body="busy"), Answer(hold=True), Answer(400, body="bad"))
    hook = webhook(receiver, secret=[SECRET, SECRET_2], timeout_s=0.3, retry_schedule_s=[0.1])
    settings = make_settings(sim, tmp_path, chats(sim, 2), hook)
    async with running(settings) as app:
        await until(lambda: "dead" in states(tmp_path), what="a dead letter")
        await until(lambda: len(receiver.acked()) == 1, what="the other delivery")
        shown = repr(settings) + str(settings) + repr(app.sinks)
    assert logged(debug_logs, "sink failing; will retry")
    assert logged(debug_logs, "event dead-lettered")
    assert any(e["log_level"] == "debug" for e in debug_logs)
    text = shown + "\n".join(repr(entry) for entry in debug_logs)
    for part in secret_parts(SECRET) + secret_parts(SECRET_2):
        assert part not in text
