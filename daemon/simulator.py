"""In-process simulator of QA.tech's chat API, served with aiohttp.

It imitates the three chat endpoints qawatch uses (``GET /v1/chat/{shortId}``,
``POST /v1/chat`` and ``POST /v1/chat/{shortId}``) closely enough for tests, benchmarks,
the demo and ``qawatch simulate``.

No background task drives a reply: each reply is a schedule ``(t0, duration, outcome)``
and its state is computed from the injected clock whenever it is looked at. With a fake
clock a test moves a reply through its phases without sleeping:

* ``t < t0 + 0.1*d``: no assistant message yet (the user's message is newest);
* ``t < t0 + (1 - s)*d``: assistant message, ``INITIATED``, empty text;
* ``t < t0 + d``: ``PARTIAL`` and ``isStreaming``, a growing prefix of the answer;
* ``t >= t0 + d``: the outcome (``COMPLETED``, ``FAILED`` or ``CANCELLED``), final text.

``s`` is the streaming share (:attr:`SimConfig.stream_share`, default 0.7, or per reply): the
last fraction of the reply's duration that streams. The assistant message appears at
``0.1*d``, or when streaming starts if that is earlier.

Faults (5xx, 429, stalls, malformed or wrongly shaped bodies) can be scripted with
:meth:`Simulator.inject` or drawn at random per GET from the seeded configuration.

For benchmarks: the GET body of a conversation is rendered once per phase and reused until
the next phase change (:meth:`Simulator.start` with ``fast=True`` also serves GETs from a
minimal HTTP/1.1 server instead of aiohttp's), ``SimConfig.record_requests=False`` keeps no
per-request records, and :attr:`Simulator.on_request` sees every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import http
import json
import math
import random
import re
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TextIO, cast

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = [
    "OUTCOMES",
    "SAMPLE_QUESTIONS",
    "SHORT_ID_PATTERN",
    "Fault",
    "RequestRecord",
    "SimConfig",
    "Simulator",
    "SimulatorThread",
    "serve",
]

SHORT_ID_PATTERN = re.compile(r"chat(-.+_.+|_.+)")
"""The documented short id pattern ``^chat(-.+_.+|_.+)$`` (use with ``fullmatch``)."""

OUTCOMES = ("COMPLETED", "FAILED", "CANCELLED")
DEFAULT_LIMIT = 20
MAX_LIMIT = 100
DASHBOARD_URL = "https://app.qa.tech/chat/"
FAILED_TEXT = "The assistant could not finish: the test agent hit an internal error."
CANCELLED_TEXT = "Cancelled."

SAMPLE_QUESTIONS = (
    "How do I log in with a magic link?",
    "Does the checkout flow still work after the last deploy?",
    "Which tests failed in the latest run and why?",
    "Can you check that the signup form validates email addresses?",
    "Is the password reset email sent within a minute?",
    "What changed on the pricing page since yesterday?",
)

_APPEAR = 0.1  # fraction of the duration after which the assistant message exists (at the latest)
DEFAULT_STREAM_SHARE = 0.7  # the last fraction of the duration that streams (PARTIAL)
_SHUTDOWN_TIMEOUT = 0.5
_MAX_HEAD = 16 * 1024  # the fast server's limit for a request line and headers
_CHAT_PREFIX = "/v1/chat/"
_JSON_TYPE = "Content-Type: application/json; charset=utf-8\r\n"
_THREAD_TIMEOUT = 5.0

_WRONG_SHAPES = (
    '{"data": [1, 2]}',
    "[1, 2, 3]",
    '{"shortId": 42, "messages": "none"}',
)


@dataclass
class SimConfig:
    """Behaviour of a :class:`Simulator`; mutable while it runs (rates are read per request)."""

    token: str = "sim-token"  # noqa: S105 - the public, well-known token of the simulator
    reply_s: float = 3.0
    fail_rate: float = 0.0
    cancel_rate: float = 0.0
    seed: int | None = None
    # random faults, per GET request, each a probability 0..1, drawn from the seeded RNG
    fault_5xx: float = 0.0  # answers 503
    fault_429: float = 0.0  # answers 429 with Retry-After: retry_after_s (integer s, rounded up)
    retry_after_s: float = 1.0
    fault_timeout: float = 0.0  # stalls stall_s seconds before answering 200
    stall_s: float = 30.0
    fault_malformed: float = 0.0  # 200 with a body that is not JSON, as application/json
    fault_wrong_shape: float = 0.0  # 200 with JSON of the wrong shape
    # a posted message (and so its reply) becomes visible this many seconds after the POST
    visible_lag_s: float = 0.0
    # the last fraction of a reply's duration that streams (PARTIAL); read when a reply is posted
    stream_share: float = DEFAULT_STREAM_SHARE
    # keep a RequestRecord per request in Simulator.requests (off for long benchmarks)
    record_requests: bool = True


@dataclass(frozen=True)
class Fault:
    """A scripted fault for one GET.

    ``status``: answer ``status`` with ``body`` (default ``{"message": <reason>}``) and a
    ``Retry-After`` header when ``retry_after`` is set. ``stall``: wait ``stall_s`` seconds
    (real time), then answer normally. ``malformed``: 200 with a body that is not JSON.
    ``wrong_shape``: 200 with JSON that is not a conversation. ``body`` overrides the body.
    """

    kind: Literal["status", "stall", "malformed", "wrong_shape"]
    status: int = 500
    retry_after: str | None = None
    body: str | None = None
    stall_s: float = 30.0
    chunked: bool = False  # send ``body`` without a Content-Length


@dataclass(frozen=True)
class RequestRecord:
    """One request the simulator answered."""

    at: float  # clock() when received
    method: str
    path: str
    query: dict[str, str]
    status: int  # what was answered (499 if the handler was cancelled)
    headers: dict[str, str]  # request headers, names as the client sent them


@dataclass
class _Reply:
    t0: float
    duration: float
    outcome: str
    answer: str
    appear: float  # clock time the assistant message appears (INITIATED)
    stream: float  # clock time it starts streaming (PARTIAL)

    @property
    def end(self) -> float:
        return self.t0 + self.duration


@dataclass
class _Message:
    id: str
    role: str
    seq: int
    created: float  # clock time the message appears (for a reply: t0 + 0.1 * d)
    text: str = ""
    status: str = "COMPLETED"
    is_streaming: bool = False
    reply: _Reply | None = None  # None: a raw message with fixed fields
    shift: float = 0.0  # shown createdAt minus the real one (the API's order stays the real one)


@dataclass
class _Chat:
    short_id: str
    title: str
    created: float
    updated: float  # latest raw change: creation, user message, add/set_message
    messages: list[_Message]
    hidden: dict[str, int] = field(default_factory=dict)  # message id -> answers left to hide it from
    flip_ties: int = 0  # answers left that list messages with equal createdAt in reverse order
    twice: dict[str, int] = field(default_factory=dict)  # message id -> answers left to list it twice
    #: limit -> (rendered at, valid until, GET body): what GET answers until the next phase change
    bodies: dict[int, tuple[float, float, bytes]] = field(default_factory=dict)

    def changed(self) -> None:
        """Forget the rendered bodies (after any change to the conversation)."""
        self.bodies.clear()


@dataclass(frozen=True)
class _View:
    created: float
    seq: int
    changed: float
    status: str
    text: str
    is_streaming: bool


def _answer_for(question: str) -> str:
    """The deterministic generated answer to ``question``."""
    q = " ".join(question.split())
    if len(q) > 80:
        q = q[:77] + "..."
    return (
        f"Answer to '{q}': I checked this against the application under test. "
        "The flow behaves as expected in the current build and no blocking issue was found. "
        "Ask me to turn it into a test case if you want it covered on every run."
    )


def _title_for(question: str) -> str:
    q = " ".join(question.split())
    return q if len(q) <= 60 else q[:57] + "..."


def _validate_outcome(outcome: str | None) -> None:
    if outcome is not None and outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")


def _validate_reply_s(reply_s: float | None) -> None:
    if reply_s is not None and not reply_s >= 0:
        raise ValueError(f"reply_s must be >= 0, not {reply_s!r}")


def _validate_stream_share(stream_share: float | None) -> None:
    if stream_share is not None and not 0 <= stream_share <= 1:
        raise ValueError(f"stream_share must be from 0 to 1, not {stream_share!r}")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"message": message}, status=status, headers=headers)


@functools.cache
def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Simulated fault"


@dataclass(frozen=True, slots=True)
class _Answer:
    """An answer to a GET, for aiohttp's server and the fast one alike (always JSON)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    chunked: bool = False  # without a Content-Length

    def response(self) -> web.Response:
        response = web.Response(
            status=self.status,
            body=self.body,
            content_type="application/json",
            charset="utf-8",
            headers=dict(self.headers) or None,
        )
        if self.chunked:
            response.enable_chunked_encoding()
        return response

    def wire(self, *, close: bool) -> bytes:
        """The whole HTTP/1.1 response."""
        head = f"HTTP/1.1 {self.status} {_reason(self.status)}\r\n{_JSON_TYPE}"
        for name, value in self.headers:
            head += f"{name}: {value}\r\n"
        body = self.body
        if self.chunked:
            head += "Transfer-Encoding: chunked\r\n"
            body = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        else:
            head += f"Content-Length: {len(body)}\r\n"
        if close:
            head += "Connection: close\r\n"
        return (head + "\r\n").encode("latin-1") + body


def _json_answer(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> _Answer:
    return _Answer(status, json.dumps({"message": message}).encode(), headers)


def _fault_answer(fault: Fault, short_id: str) -> _Answer:
    """The answer for a fault that is not a stall."""
    if fault.kind == "status":
        headers = () if fault.retry_after is None else (("Retry-After", fault.retry_after),)
        body = fault.body
        if body is None:
            body = json.dumps({"message": _reason(fault.status)})
        return _Answer(fault.status, body.encode(), headers, chunked=fault.chunked)
    if fault.kind == "malformed":
        body = fault.body
        if body is None:
            body = '{"shortId": "' + short_id + '", "messages": [{"id": '
        return _Answer(200, body.encode())
    body = _WRONG_SHAPES[0] if fault.body is None else fault.body
    return _Answer(200, body.encode())


def _stable_until(chat: _Chat, now: float) -> float:
    """Until when a GET of ``chat`` answers what it answers at ``now``: the next phase change
    (``now`` while a reply streams, its text growing; ``inf`` until the chat is changed)."""
    until = math.inf
    for message in chat.messages:
        r = message.reply
        if r is None:
            if now < message.created:
                until = min(until, message.created)
        elif now >= r.end:
            continue
        elif now < r.appear:
            until = min(until, r.appear)
        elif now < r.stream:
            until = min(until, r.stream)
        else:
            return now
    return until


def _parse_limit(raw: str | None) -> int | None:
    if raw is None:
        return DEFAULT_LIMIT
    if not re.fullmatch(r"[0-9]{1,4}", raw):
        return None
    value = int(raw)
    return value if 1 <= value <= MAX_LIMIT else None


class Simulator:
    """QA.tech chat API simulator. State helpers are thread-safe and synchronous."""

    def __init__(
        self, config: SimConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config: SimConfig = config if config is not None else SimConfig()
        self.forbidden: bool = False
        self.requests: list[RequestRecord] = []
        #: called with (method, path, clock at receipt, status) for every request answered
        self.on_request: Callable[[str, str, float, int], None] | None = None
        self._clock = clock
        self._clock0 = clock()
        self._wall0 = datetime.now(UTC)
        self._lock = threading.Lock()
        self._chats: dict[str, _Chat] = {}
        self._counter = 0
        seed = self.config.seed
        # Separate streams so that, e.g., the number of GETs never shifts reply outcomes.
        self._rng = random.Random(seed)
        self._rng_ids = random.Random(None if seed is None else f"{seed}/ids")
        self._rng_faults = random.Random(None if seed is None else f"{seed}/faults")
        self._faults: deque[Fault] = deque()
        self._chat_faults: dict[str, deque[Fault]] = {}
        self._runner: web.AppRunner | None = None
        self._fast_server: asyncio.Server | None = None
        self._connections: set[_FastHttp] = set()
        self._base_url: str | None = None
        self._stopping: asyncio.Event | None = None

    # ------------------------------------------------------------------ time

    def _wall(self, t: float) -> str:
        dt = self._wall0 + timedelta(seconds=t - self._clock0)
        return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    # ------------------------------------------------------------------ state (lock held)

    def _next_seq(self) -> int:
        self._counter += 1
        return self._counter

    def _new_short_id(self) -> str:
        while True:
            short_id = f"chat_{self._rng_ids.getrandbits(32):08x}"
            if short_id not in self._chats:
                return short_id

    def _get_chat(self, short_id: str) -> _Chat:
        try:
            return self._chats[short_id]
        except KeyError:
            raise KeyError(f"no conversation {short_id!r}") from None

    def _message_chat(self, short_id: str, message_id: str) -> _Chat:
        """The chat that has ``message_id``; KeyError for an unknown chat or message."""
        chat = self._get_chat(short_id)
        if not any(m.id == message_id for m in chat.messages):
            raise KeyError(f"no message {message_id!r} in {short_id!r}")
        return chat

    def _post_locked(
        self,
        chat: _Chat,
        message: str,
        now: float,
        *,
        reply: str | None = None,
        outcome: str | None = None,
        reply_s: float | None = None,
        stream_share: float | None = None,
    ) -> None:
        now += self.config.visible_lag_s  # posted now, listed (and answered) from then on
        seq = self._next_seq()
        chat.messages.append(_Message(id=f"msg_{seq}", role="user", seq=seq, created=now, text=message))
        chat.updated = max(chat.updated, now)
        chat.changed()
        duration = self.config.reply_s if reply_s is None else reply_s
        share = self.config.stream_share if stream_share is None else stream_share
        stream = now + round(1.0 - share, 12) * duration  # 0.3, not 0.30000000000000004
        appear = min(now + _APPEAR * duration, stream)
        if outcome is None:
            r = self._rng.random()
            if r < self.config.fail_rate:
                outcome = "FAILED"
            elif r < self.config.fail_rate + self.config.cancel_rate:
                outcome = "CANCELLED"
            else:
                outcome = "COMPLETED"
        answer = _answer_for(message) if reply is None else reply
        seq = self._next_seq()
        chat.messages.append(
            _Message(
                id=f"msg_{seq}",
                role="assistant",
                seq=seq,
                created=appear,
                reply=_Reply(
                    t0=now, duration=duration, outcome=outcome, answer=answer, appear=appear, stream=stream
                ),
            )
        )

    @staticmethod
    def _view(message: _Message, now: float) -> _View | None:
        r = message.reply
        if r is None:
            if now < message.created:
                return None  # posted, not listed yet (SimConfig.visible_lag_s)
            return _View(
                message.created,
                message.seq,
                message.created,
                message.status,
                message.text,
                message.is_streaming,
            )
        appear, stream, end = r.appear, r.stream, r.end
        if now >= end:
            text = {"COMPLETED": r.answer, "FAILED": FAILED_TEXT}.get(r.outcome, CANCELLED_TEXT)
            return _View(message.created, message.seq, end, r.outcome, text, False)
        if now < appear:
            return None
        if now < stream:
            return _View(message.created, message.seq, appear, "INITIATED", "", False)
        progress = (now - stream) / (end - stream)
        n = min(len(r.answer), max(1, int(len(r.answer) * progress)))
        return _View(message.created, message.seq, stream, "PARTIAL", r.answer[:n], True)

    def _payload_locked(self, chat: _Chat, now: float, limit: int, *, served: bool = False) -> dict[str, Any]:
        """The GET body; ``served``: an answer sent to a client, which uses up hide/flip counts."""
        updated = max(chat.updated, chat.created)
        visible: list[tuple[_View, _Message]] = []
        hidden = {mid for mid, left in chat.hidden.items() if left > 0} if served else set()
        for message in chat.messages:
            view = self._view(message, now)
            if view is not None and message.id not in hidden:
                visible.append((view, message))
                updated = max(updated, view.changed)
        flip = served and chat.flip_ties > 0
        twice = {mid for mid, left in chat.twice.items() if left > 0} if served else set()
        if served:
            chat.hidden = {mid: left - 1 for mid, left in chat.hidden.items() if left > 1}
            chat.twice = {mid: left - 1 for mid, left in chat.twice.items() if left > 1}
            chat.flip_ties = max(0, chat.flip_ties - 1)
        # newest first; messages with equal createdAt by when they were written (or reversed)
        visible.sort(key=lambda vm: (vm[0].created, -vm[0].seq if flip else vm[0].seq), reverse=True)
        visible = [copy for vm in visible for copy in ([vm, vm] if vm[1].id in twice else [vm])]
        return {
            "shortId": chat.short_id,
            "url": DASHBOARD_URL + chat.short_id,
            "title": chat.title,
            "createdAt": self._wall(chat.created),
            "updatedAt": self._wall(updated),
            "source": "api",
            "messages": [
                {
                    "id": m.id,
                    "role": m.role,
                    "createdAt": self._wall(v.created + m.shift),
                    "text": v.text,
                    "status": v.status,
                    "isStreaming": v.is_streaming,
                }
                for v, m in visible[:limit]
            ],
        }

    def _create_locked(
        self,
        message: str | None,
        now: float,
        *,
        short_id: str | None = None,
        title: str | None = None,
        reply: str | None = None,
        outcome: str | None = None,
        reply_s: float | None = None,
        stream_share: float | None = None,
    ) -> _Chat:
        if short_id is None:
            short_id = self._new_short_id()
        elif short_id in self._chats:
            raise ValueError(f"conversation {short_id!r} already exists")
        if title is None:
            title = "New conversation" if message is None else _title_for(message)
        chat = _Chat(short_id=short_id, title=title, created=now, updated=now, messages=[])
        self._chats[short_id] = chat
        if message is not None:
            self._post_locked(
                chat, message, now, reply=reply, outcome=outcome, reply_s=reply_s, stream_share=stream_share
            )
        return chat

    # ------------------------------------------------------------------ state helpers

    def create_chat(
        self,
        message: str | None = None,
        *,
        short_id: str | None = None,
        title: str | None = None,
        reply: str | None = None,
        outcome: str | None = None,
        reply_s: float | None = None,
        stream_share: float | None = None,
    ) -> str:
        """Create a conversation; with ``message``, post it and schedule a reply.

        ``message=None`` gives an empty conversation (then ``reply``, ``outcome``, ``reply_s``
        and ``stream_share`` must be None). ``stream_share`` overrides
        :attr:`SimConfig.stream_share` for this reply. Raises ValueError for a bad or taken
        ``short_id``.
        """
        if short_id is not None and not SHORT_ID_PATTERN.fullmatch(short_id):
            raise ValueError(f"invalid short id {short_id!r}")
        if message is None and (reply, outcome, reply_s, stream_share) != (None, None, None, None):
            raise ValueError("reply, outcome, reply_s and stream_share need a message")
        _validate_outcome(outcome)
        _validate_reply_s(reply_s)
        _validate_stream_share(stream_share)
        now = self._clock()
        with self._lock:
            chat = self._create_locked(
                message,
                now,
                short_id=short_id,
                title=title,
                reply=reply,
                outcome=outcome,
                reply_s=reply_s,
                stream_share=stream_share,
            )
            return chat.short_id

    def send_message(
        self,
        short_id: str,
        message: str,
        *,
        reply: str | None = None,
        outcome: str | None = None,
        reply_s: float | None = None,
        stream_share: float | None = None,
    ) -> None:
        """Append a user message now and schedule its reply (``stream_share``: see
        :meth:`create_chat`). KeyError if unknown."""
        _validate_outcome(outcome)
        _validate_reply_s(reply_s)
        _validate_stream_share(stream_share)
        now = self._clock()
        with self._lock:
            chat = self._get_chat(short_id)
            self._post_locked(
                chat, message, now, reply=reply, outcome=outcome, reply_s=reply_s, stream_share=stream_share
            )

    def add_message(
        self,
        short_id: str,
        role: str,
        text: str,
        *,
        status: str = "COMPLETED",
        is_streaming: bool = False,
        created_shift_s: float = 0.0,
    ) -> str:
        """Append a raw message now (no lifecycle, any role/status); return its id.

        ``created_shift_s`` moves the ``createdAt`` it shows (not its place in the API's order):
        a negative shift gives a message listed newest whose createdAt is older than others."""
        now = self._clock()
        with self._lock:
            chat = self._get_chat(short_id)
            seq = self._next_seq()
            message = _Message(
                id=f"msg_{seq}",
                role=role,
                seq=seq,
                created=now,
                text=text,
                status=status,
                is_streaming=is_streaming,
                shift=created_shift_s,
            )
            chat.messages.append(message)
            chat.updated = max(chat.updated, now)
            chat.changed()
            return message.id

    def set_message(
        self,
        short_id: str,
        message_id: str,
        *,
        status: str | None = None,
        text: str | None = None,
        is_streaming: bool | None = None,
    ) -> None:
        """Change a message's fields now and bump updatedAt.

        A scheduled reply is first frozen in its current state (it stops progressing);
        ValueError if it is not visible yet. KeyError for an unknown chat or message.
        """
        now = self._clock()
        with self._lock:
            chat = self._get_chat(short_id)
            message = next((m for m in chat.messages if m.id == message_id), None)
            if message is None:
                raise KeyError(f"no message {message_id!r} in {short_id!r}")
            if message.reply is not None:
                view = self._view(message, now)
                if view is None:
                    raise ValueError(f"message {message_id!r} is not visible yet")
                message.status, message.text = view.status, view.text
                message.is_streaming = view.is_streaming
                message.reply = None
            if status is not None:
                message.status = status
            if text is not None:
                message.text = text
            if is_streaming is not None:
                message.is_streaming = is_streaming
            chat.updated = max(chat.updated, now)
            chat.changed()

    def add_turns(self, short_id: str, turns: int, *, outcome: str = "COMPLETED") -> list[str]:
        """Append ``turns`` finished question/answer pairs at once (all with the same createdAt,
        listed in the order written); return the replies' ids, oldest first."""
        _validate_outcome(outcome)
        now = self._clock()
        replies: list[str] = []
        with self._lock:
            chat = self._get_chat(short_id)
            for turn in range(turns):
                question = f"Question {turn + 1} of {turns}"
                for role, text in (("user", question), ("assistant", _answer_for(question))):
                    seq = self._next_seq()
                    chat.messages.append(
                        _Message(
                            id=f"msg_{seq}",
                            role=role,
                            seq=seq,
                            created=now,
                            text=text,
                            status=outcome if role == "assistant" else "COMPLETED",
                        )
                    )
                replies.append(f"msg_{seq}")
            chat.updated = max(chat.updated, now)
            chat.changed()
        return replies

    def hide(self, short_id: str, message_id: str, *, answers: int = 1) -> None:
        """Leave ``message_id`` out of the next ``answers`` GETs of ``short_id`` (an inconsistent
        read). KeyError for an unknown chat or message."""
        with self._lock:
            chat = self._message_chat(short_id, message_id)
            chat.hidden[message_id] = answers
            chat.changed()

    def list_twice(self, short_id: str, message_id: str, *, answers: int = 1) -> None:
        """List ``message_id`` twice in a row in the next ``answers`` GETs of ``short_id``.
        KeyError for an unknown chat or message."""
        with self._lock:
            chat = self._message_chat(short_id, message_id)
            chat.twice[message_id] = answers
            chat.changed()

    def flip_ties(self, short_id: str, *, answers: int = 1) -> None:
        """List messages that share a createdAt in the reverse order in the next ``answers``
        GETs of ``short_id`` (a server whose sort is not stable). KeyError if unknown."""
        with self._lock:
            chat = self._get_chat(short_id)
            chat.flip_ties = answers
            chat.changed()

    def delete_chat(self, short_id: str) -> None:
        """Forget a conversation (GET answers 404 afterwards). KeyError if unknown."""
        with self._lock:
            self._get_chat(short_id)
            del self._chats[short_id]
            self._chat_faults.pop(short_id, None)

    def inject(self, *faults: Fault, short_id: str | None = None) -> None:
        """Queue faults for the next GETs (of ``short_id`` only, if given).

        A GET takes the first fault queued for its chat, else the first queued for any
        chat; scripted faults are checked before random ones.
        """
        with self._lock:
            if short_id is None:
                self._faults.extend(faults)
            else:
                self._chat_faults.setdefault(short_id, deque()).extend(faults)

    def conversation_json(self, short_id: str, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
        """What a GET with ``limit`` would answer now. KeyError if unknown."""
        now = self._clock()
        with self._lock:
            return self._payload_locked(self._get_chat(short_id), now, limit)

    def requests_for(self, short_id: str) -> list[RequestRecord]:
        """Recorded requests whose path is ``/v1/chat/{short_id}`` (GETs and follow-ups)."""
        path = f"/v1/chat/{short_id}"
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # ------------------------------------------------------------------ faults

    def _random_faults(self) -> bool:
        c = self.config
        return any(
            p > 0 for p in (c.fault_5xx, c.fault_429, c.fault_timeout, c.fault_malformed, c.fault_wrong_shape)
        )

    def _next_fault(self, short_id: str) -> Fault | None:
        with self._lock:
            queue = self._chat_faults.get(short_id)
            if queue:
                return queue.popleft()
            if self._faults:
                return self._faults.popleft()
            if not self._random_faults():
                return None
            c = self.config
            table: list[tuple[float, Fault]] = [
                (c.fault_5xx, Fault("status", status=503)),
                (
                    c.fault_429,
                    Fault("status", status=429, retry_after=str(max(0, math.ceil(c.retry_after_s)))),
                ),
                (c.fault_timeout, Fault("stall", stall_s=c.stall_s)),
                (c.fault_malformed, Fault("malformed")),
                (c.fault_wrong_shape, Fault("wrong_shape")),
            ]
            r = self._rng_faults.random()
            acc = 0.0
            for p, fault in table:
                acc += max(0.0, p)
                if r < acc:
                    if fault.kind == "wrong_shape":
                        return Fault("wrong_shape", body=self._rng_faults.choice(_WRONG_SHAPES))
                    return fault
            return None

    async def _stall(self, fault: Fault) -> _Answer | None:
        """Wait out a stall: None to answer normally after it, or 503 when the simulator stops."""
        stopping = self._stopping
        if stopping is None:
            await asyncio.sleep(fault.stall_s)
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), fault.stall_s)
            return _json_answer(503, "Simulator shutting down")
        return None

    async def _fault_response(self, fault: Fault, short_id: str) -> web.Response | None:
        """The answer for ``fault``, or None to continue normally (after a stall)."""
        answer = await self._stall(fault) if fault.kind == "stall" else _fault_answer(fault, short_id)
        return None if answer is None else answer.response()

    # ------------------------------------------------------------------ GET

    def _answer_get(self, short_id: str, raw_limit: str | None) -> _Answer:
        """The answer to an authorized GET of ``short_id`` without a fault."""
        if not SHORT_ID_PATTERN.fullmatch(short_id):
            return _json_answer(400, f"Invalid conversation id {short_id!r}")
        limit = _parse_limit(raw_limit)
        if limit is None:
            return _json_answer(400, f"limit must be an integer from 1 to {MAX_LIMIT}")
        now = self._clock()
        with self._lock:
            chat = self._chats.get(short_id)
            if chat is None:
                return _json_answer(404, "Conversation not found")
            return _Answer(200, self._body_locked(chat, now, limit))

    def _body_locked(self, chat: _Chat, now: float, limit: int) -> bytes:
        """The GET body as served; rendered once per phase while no hide/flip/twice is pending."""
        if chat.hidden or chat.twice or chat.flip_ties:
            return json.dumps(self._payload_locked(chat, now, limit, served=True)).encode()
        cached = chat.bodies.get(limit)
        if cached is not None and cached[0] <= now < cached[1]:
            return cached[2]
        body = json.dumps(self._payload_locked(chat, now, limit, served=True)).encode()
        until = _stable_until(chat, now)
        if until > now:
            chat.bodies[limit] = (now, until, body)
        return body

    # ------------------------------------------------------------------ HTTP

    def _authorized(self, request: web.Request) -> bool:
        return self._authorized_header(request.headers.get("Authorization", ""))

    def _authorized_header(self, value: str) -> bool:
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.config.token.encode()
        )

    def _record(self, request: web.Request, at: float, status: int) -> None:
        if self.config.record_requests:
            record = RequestRecord(
                at=at,
                method=request.method,
                path=request.path,
                query={str(k): v for k, v in request.query.items()},
                status=status,
                headers={str(k): v for k, v in request.headers.items()},
            )
            with self._lock:
                self.requests.append(record)
        if self.on_request is not None:
            self.on_request(request.method, request.path, at, status)

    async def _dispatch(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.forbidden:
            return _error(403, "Forbidden")
        if not self._authorized(request):
            return _error(401, "Unauthorized")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _error(exc.status, exc.reason, headers)

    async def _handle_get(self, request: web.Request) -> web.Response:
        short_id = request.match_info["short_id"]
        fault = self._next_fault(short_id)
        if fault is not None:
            response = await self._fault_response(fault, short_id)
            if response is not None:
                return response
        return self._answer_get(short_id, request.query.get("limit")).response()

    # ------------------------------------------------------------------ fast HTTP (GET only)

    def _fast_request(self, request: _FastRequest) -> _Answer | Coroutine[Any, Any, _Answer]:
        """The answer to a request on the fast server: at once, or a coroutine after a stall."""
        at = self._clock()
        answer = self._fast_check(request)
        if answer is None:
            fault = self._next_fault(request.short_id)
            if fault is not None and fault.kind == "stall":
                return self._fast_stalled(request, fault, at)
            if fault is not None:
                answer = _fault_answer(fault, request.short_id)
            else:
                answer = self._answer_get(request.short_id, request.first("limit"))
        self._fast_record(request, at, answer.status)
        return answer

    def _fast_check(self, request: _FastRequest) -> _Answer | None:
        """What _dispatch answers before the handler (refusals, unknown routes and methods)."""
        if self.forbidden:
            return _json_answer(403, "Forbidden")
        if not self._authorized_header(request.header("authorization")):
            return _json_answer(401, "Unauthorized")
        if not request.short_id:
            return _json_answer(404, "Not Found")
        if request.method != "GET":
            return _json_answer(405, "Method Not Allowed", (("Allow", "GET"),))
        return None

    async def _fast_stalled(self, request: _FastRequest, fault: Fault, at: float) -> _Answer:
        status = 499
        try:
            answer = await self._stall(fault)
            if answer is None:
                answer = self._answer_get(request.short_id, request.first("limit"))
            status = answer.status
            return answer
        finally:
            self._fast_record(request, at, status)

    def _fast_record(self, request: _FastRequest, at: float, status: int) -> None:
        if self.config.record_requests:
            record = RequestRecord(
                at=at,
                method=request.method,
                path=request.path,
                query=dict(urllib.parse.parse_qsl(request.query, keep_blank_values=True)),
                status=status,
                headers=dict(request.headers),
            )
            with self._lock:
                self.requests.append(record)
        if self.on_request is not None:
            self.on_request(request.method, request.path, at, status)

    @staticmethod
    async def _read_message(request: web.Request) -> str | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Request body must be JSON")
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, str) or not message.strip():
            return _error(400, "Field 'message' must be a non-empty string")
        return message

    async def _handle_create(self, request: web.Request) -> web.Response:
        message = await self._read_message(request)
        if isinstance(message, web.Response):
            return message
        now = self._clock()
        with self._lock:
            chat = self._create_locked(message, now)
            payload = self._payload_locked(chat, now, 0)
        return web.json_response(payload, status=202)

    async def _handle_follow_up(self, request: web.Request) -> web.Response:
        short_id = request.match_info["short_id"]
        if not SHORT_ID_PATTERN.fullmatch(short_id):
            return _error(400, f"Invalid conversation id {short_id!r}")
        with self._lock:
            known = short_id in self._chats
        if not known:
            return _error(404, "Conversation not found")
        message = await self._read_message(request)
        if isinstance(message, web.Response):
            return message
        now = self._clock()
        with self._lock:
            chat = self._chats.get(short_id)
            if chat is None:
                return _error(404, "Conversation not found")
            self._post_locked(chat, message, now)
        return web.json_response({"shortId": short_id, "status": "accepted"}, status=202)

    def build_app(self) -> web.Application:
        """The aiohttp application (usable with any runner or aiohttp's test server)."""
        self._stopping = asyncio.Event()

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            at = self._clock()
            status = 499
            try:
                response = await self._dispatch(request, handler)
                status = response.status
                return response
            finally:
                self._record(request, at, status)

        app = web.Application(middlewares=[middleware])
        app.router.add_get("/v1/chat/{short_id}", self._handle_get, allow_head=False)
        app.router.add_post("/v1/chat", self._handle_create)
        app.router.add_post("/v1/chat/{short_id}", self._handle_follow_up)
        return app

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, fast: bool = False) -> str:
        """Listen on ``host:port`` (0: a free port) and return the base URL.

        ``fast``: serve with a minimal HTTP/1.1 server that answers GETs of conversations
        only (other methods 405): several times less CPU per request than aiohttp's server,
        for benchmarks that must not measure the simulator."""
        if self._runner is not None or self._fast_server is not None:
            raise RuntimeError("simulator already started")
        if fast:
            bound_port = await self._start_fast(host, port)
        else:
            bound_port = await self._start_aiohttp(host, port)
        shown = f"[{host}]" if ":" in host else host
        self._base_url = f"http://{shown}:{bound_port}"
        return self._base_url

    async def _start_aiohttp(self, host: str, port: int) -> int:
        runner = web.AppRunner(self.build_app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        return int(runner.addresses[0][1])

    async def _start_fast(self, host: str, port: int) -> int:
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _FastHttp(self), host, port)
        self._fast_server = server
        return int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening; stalled requests are released at once. Idempotent."""
        runner, self._runner = self._runner, None
        server, self._fast_server = self._fast_server, None
        if self._stopping is not None:
            self._stopping.set()
        if server is not None:
            server.close()
            for connection in list(self._connections):
                connection.close()
            await server.wait_closed()
        if runner is not None:
            await runner.cleanup()
        self._base_url = None

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` while started; RuntimeError otherwise."""
        if self._base_url is None:
            raise RuntimeError("simulator is not started")
        return self._base_url


@dataclass(slots=True)
class _FastRequest:
    """A request as the fast server read it."""

    method: str
    path: str  # percent-decoded, without the query
    query: str  # as sent
    headers: list[tuple[str, str]]  # names as the client sent them
    short_id: str  # "" unless the path is /v1/chat/{shortId}
    fields: dict[str, str]  # lower-case header name -> its first value

    @classmethod
    def build(cls, method: str, target: str, headers: list[tuple[str, str]]) -> _FastRequest:
        raw_path, _, query = target.partition("?")
        path = urllib.parse.unquote(raw_path) if "%" in raw_path else raw_path
        rest = path[len(_CHAT_PREFIX) :] if path.startswith(_CHAT_PREFIX) else ""
        fields = {name.lower(): value for name, value in reversed(headers)}
        return cls(method, path, query, headers, rest if "/" not in rest else "", fields)

    def header(self, name: str) -> str:
        """The first value of header ``name`` (lower-case), or ""."""
        return self.fields.get(name, "")

    def first(self, name: str) -> str | None:
        """The first value of query parameter ``name``."""
        query = self.query
        if not any(c in query for c in "&;%+"):  # one plain parameter (the usual ?limit=20)
            key, _, value = query.partition("=")
            return value if key == name else None
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if key == name:
                return value
        return None


class _FastHttp(asyncio.Protocol):
    """A minimal HTTP/1.1 server for ``GET /v1/chat/{shortId}``: keep-alive, requests on one
    connection answered in order, no request bodies but a Content-Length one (skipped)."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._pending: asyncio.Future[_Answer] | None = None  # a stalled answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._sim._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._sim._connections.discard(self)
        if self._pending is not None:
            self._pending.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._serve()

    def _serve(self) -> None:
        while self._pending is None and self._transport is not None:
            parsed = self._parse()
            if parsed is None:
                return
            request, close = parsed
            answer = self._sim._fast_request(request)
            if isinstance(answer, _Answer):
                self._send(answer, close=close)
            else:
                self._pending = asyncio.ensure_future(answer)
                self._pending.add_done_callback(functools.partial(self._stalled, close=close))

    def _stalled(self, future: asyncio.Future[_Answer], *, close: bool) -> None:
        self._pending = None
        if future.cancelled() or self._transport is None:
            return
        self._send(future.result(), close=close)
        self._serve()

    def _send(self, answer: _Answer, *, close: bool) -> None:
        if self._transport is not None:
            self._transport.write(answer.wire(close=close))
            if close:
                self.close()

    def _parse(self) -> tuple[_FastRequest, bool] | None:
        """The next whole request and whether to close after it; None: not all here yet."""
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD:
                self._send(_json_answer(431, "Request Header Fields Too Large"), close=True)
            return None
        lines = self._buffer[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = [
            (name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines[1:])
        ]
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or any(not name for name, _ in headers):
            self._send(_json_answer(400, "Bad Request"), close=True)
            return None
        request = _FastRequest.build(parts[0], parts[1], headers)
        length = request.header("content-length") or "0"
        if not length.isdigit() or request.header("transfer-encoding"):
            self._send(_json_answer(501, "Not Implemented"), close=True)
            return None
        if len(self._buffer) < end + 4 + int(length):
            return None
        self._buffer = self._buffer[end + 4 + int(length) :]
        connection = request.header("connection").lower()
        close = connection == "close" or (parts[2] == "HTTP/1.0" and connection != "keep-alive")
        return request, close


class SimulatorThread:
    """Runs a Simulator on its own event loop in a daemon thread (for sync tests,
    subprocess tests and benchmarks)."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.sim = Simulator(config, clock=clock)
        self._host = host
        self._port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return self.sim.base_url

    def __enter__(self) -> SimulatorThread:
        if self._thread is not None:
            raise RuntimeError("SimulatorThread is not reentrant")
        self._thread = threading.Thread(target=self._run, name="qawatch-simulator", daemon=True)
        self._thread.start()
        self._ready.wait(_THREAD_TIMEOUT)
        if self._error is not None:
            raise RuntimeError(f"simulator failed to start: {self._error}") from self._error
        if not self._ready.is_set():
            raise RuntimeError("simulator did not start in time")
        return self

    def __exit__(self, *exc: object) -> None:
        loop, event, thread = self._loop, self._stop_event, self._thread
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)
        if thread is not None:
            thread.join(_THREAD_TIMEOUT)
        self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            await self.sim.start(self._host, self._port)
        except OSError as exc:
            self._error = exc
            return
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.sim.stop()


async def serve(
    config: SimConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    chats: int = 0,
    out: TextIO | None = None,
    fast: bool = False,
) -> None:
    """Run a simulator for ``qawatch simulate`` until cancelled.

    Prints ``qawatch simulator listening on URL (token: TOKEN)`` and then one created chat
    id per line to ``out`` (default: the current ``sys.stdout``). ``fast``: see
    :meth:`Simulator.start`.
    """
    stream = sys.stdout if out is None else out
    sim = Simulator(config)
    base_url = await sim.start(host, port, fast=fast)
    try:
        ids = [sim.create_chat(SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)]) for i in range(chats)]
        print(f"qawatch simulator listening on {base_url} (token: {config.token})", file=stream)
        for short_id in ids:
            print(short_id, file=stream)
        stream.flush()
        await asyncio.Event().wait()
    finally:
        await sim.stop()
