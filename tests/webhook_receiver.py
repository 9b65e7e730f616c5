"""A real webhook receiver for tests: an aiohttp web app on 127.0.0.1 that records every
request and answers from a script (status, headers, body, delay, or "hold until released").

Used by ``test_webhook.py`` and ``test_webhook_cli.py``, through the ``receiver`` fixture of
``conftest.py``; a plain module, not a fixture file.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

#: two valid Standard Webhooks secrets (``whsec_`` + base64 of 24 random-looking bytes);
#: distinctive, so that a leak into any output is easy to spot
SECRET = "whsec_" + base64.b64encode(b"qawatch-test-secret-0001").decode()
SECRET_2 = "whsec_" + base64.b64encode(b"qawatch-test-secret-0002").decode()
PATH = "/hook"


def secret_parts(secret: str) -> list[str]:
    """What must never be printed: the whole secret and its base64 key part."""
    return [secret, secret.removeprefix("whsec_")]


def webhook(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    """A webhook sink for ``receiver``: signed with :data:`SECRET`, short retries."""
    return {
        "type": "webhook",
        "url": receiver.url,
        "secret": SECRET,
        "retry_schedule_s": [0.2, 0.2, 0.2],
        "timeout_s": 2,
        **extra,
    }


def deliveries(state: Path, sink: str = "webhook") -> list[tuple[str, str, int, str | None]]:
    """(event id, state, attempts, last error) of every delivery to ``sink`` in the state file,
    oldest event first; none while the daemon has not created the file (never creates it)."""
    if not state.exists():
        return []
    with contextlib.closing(sqlite3.connect(state)) as db:
        try:
            rows = db.execute(
                "SELECT e.id, d.state, d.attempts, d.last_error FROM deliveries d"
                " JOIN events e ON e.seq = d.event_seq WHERE d.sink = ? ORDER BY e.seq",
                (sink,),
            ).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # the daemon is creating the schema
            raise
    return [(str(a), str(b), int(c), d) for a, b, c, d in rows]


@dataclass(frozen=True)
class Answer:
    """How the receiver answers one request."""

    status: int = 200
    body: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    #: wait this long before answering
    delay_s: float = 0.0
    #: never answer until :meth:`Receiver.release` (or the receiver stops)
    hold: bool = False


@dataclass
class Hit:
    """One request the receiver got."""

    #: ``time.time()`` when the request (headers and body) had arrived
    at: float
    method: str
    path: str
    #: header names lower-cased
    headers: dict[str, str]
    body: bytes
    #: the client's (host, port): the same port means the same kept-alive connection
    peer: tuple[str, int]
    answer: Answer
    #: set when the handler returned its answer
    answered_at: float | None = None

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def timestamp(self) -> int:
        return int(self.headers["webhook-timestamp"])

    @property
    def ok(self) -> bool:
        """The receiver answered 2xx (it acknowledged the delivery)."""
        return self.answered_at is not None and 200 <= self.answer.status < 300


class Receiver:
    """``await Receiver(Answer(500), Answer(500)).start()``: answers 500, 500, then ``default``."""

    def __init__(self, *script: Answer, default: Answer | None = None, port: int = 0) -> None:
        self.script: collections.deque[Answer] = collections.deque(script)
        self.default = default or Answer()
        self.hits: list[Hit] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = port
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def answer(self, *answers: Answer) -> None:
        """Queue answers for the next requests (before the default)."""
        self.script.extend(answers)

    def release(self) -> None:
        """Let every held request answer."""
        self._released.set()

    def ids(self) -> list[str]:
        return [hit.id for hit in self.hits]

    def acked(self) -> list[str]:
        """The ``webhook-id`` of every request answered 2xx, in order."""
        return [hit.id for hit in self.hits if hit.ok]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        answer = self.script.popleft() if self.script else self.default
        peer = request.transport.get_extra_info("peername") if request.transport else None
        hit = Hit(
            at=time.time(),
            method=request.method,
            path=request.path,
            headers={name.lower(): value for name, value in request.headers.items()},
            body=body,
            peer=(str(peer[0]), int(peer[1])) if peer else ("", 0),
            answer=answer,
        )
        self.hits.append(hit)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if answer.hold:
                await self._released.wait()
            if answer.delay_s:
                await asyncio.sleep(answer.delay_s)
        finally:
            self.in_flight -= 1
        hit.answered_at = time.time()
        return web.Response(status=answer.status, text=answer.body, headers=dict(answer.headers))

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(runner.addresses[0][1])
        self._runner = runner
        return self

    async def stop(self) -> None:
        """Release held requests and close the port (the receiver goes down)."""
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._released = asyncio.Event()
